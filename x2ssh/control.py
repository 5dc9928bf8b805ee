"""The control socket: how `x2ssh status` and `x2ssh down` reach the running x2ssh of this network namespace.

Where. One socket per network namespace, `/run/x2ssh/<key>/control.sock`, the key being the namespace's
journal key ("init", "ns-NAME" or "ino-DEV-INO", see x2ssh.host.journal). The directory is created by the
privileged helper, owned by the user the run belongs to, mode 0700; the socket file is 0600. So the file
system already admits only that user and root; the server checks the peer's credentials (SO_PEERCRED) as
well, because a socket may also be placed somewhere less private (tests, a custom run directory).

Protocol. A client connects, sends one request line, reads one reply line; the server then closes.
    request:  {"op": "status"}  or  {"op": "down"}                         (at most MAX_REQUEST bytes)
    reply:    {"ok": true, "result": {...}}  or  {"ok": false, "error": "what went wrong"}
`status` answers with the status document (schema in x2ssh.status_report); `down` asks the run to stop as
SIGTERM does and answers {"stopping": true} at once, before the teardown has finished; the client tells the
end of the run by the server's process going away. A peer that is neither root nor an allowed user gets
{"ok": false, "error": "permission denied"}. A malformed, oversized or late request gets an error reply; no
request ever raises into the session.

Platforms. The peer check uses Linux's SO_PEERCRED; on macOS and the BSDs (not run there) the private 0700
directory is the only gate. Windows has no Unix sockets in asyncio: there is no control socket there, and
`x2ssh status`/`down` say so (`x2ssh -D` runs without one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from x2ssh.errors import X2sshError
from x2ssh.host.rundir import RUN_ROOT, namespace_run_dir

log = logging.getLogger(__name__)

RUN_DIR = RUN_ROOT
SOCKET_NAME = "control.sock"
OPS = ("status", "down")
MAX_REQUEST = 1024
MAX_REPLY = 1 << 20
REQUEST_TIMEOUT = 5.0  # a client that connects and says nothing is dropped after this
MAX_CLIENTS = 16  # concurrent connections; more are closed at once
DENIED = "permission denied"
NO_CONTROL_ON_WINDOWS = "x2ssh status/down need a Unix socket, which x2ssh does not use on Windows yet"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlNotRunning(X2sshError):
    """No x2ssh answers on the control socket of this network namespace."""

    exit_code = 3


class ControlDenied(X2sshError):
    """The control socket belongs to another user (and we are not root)."""

    exit_code = 77  # EX_NOPERM


class ControlFailed(X2sshError):
    """The running x2ssh did not answer properly (timeout, malformed reply, or an error it reported)."""


class ControlSocketBusy(X2sshError):
    """The control socket path is taken: another live x2ssh answers there, or it is not a socket."""

    exit_code = 75  # EX_TEMPFAIL


def control_dir(run_dir: Path = RUN_DIR) -> Path:
    """The directory of the current network namespace's control socket: run_dir/<namespace key>."""
    return namespace_run_dir(run_dir)


def user_run_dir() -> Path:
    """Where a run without root (`x2ssh -D`) keeps its control socket: $XDG_RUNTIME_DIR/x2ssh, else a
    per-user directory in the temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "x2ssh"
    if sys.platform == "win32":
        return Path(tempfile.gettempdir()) / "x2ssh"  # %TEMP% is per user already
    return Path(tempfile.gettempdir()) / f"x2ssh-{os.getuid()}"


def private_control_dir(root: Path) -> Path:
    """Make `root`/<namespace> for this user only (0700, and `root` too); refuse one owned by someone else."""
    if sys.platform == "win32":
        raise ControlFailed(NO_CONTROL_ON_WINDOWS)
    directory = namespace_run_dir(root)
    for path in (root, directory):
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise ControlFailed(f"{path} is not a directory of this user: no control socket there")
        os.chmod(path, 0o700)
    return directory


def control_socket_path(run_dir: Path = RUN_DIR) -> Path:
    """The control socket of the current network namespace: run_dir/<namespace key>/control.sock."""
    return control_dir(run_dir) / SOCKET_NAME


@dataclass(frozen=True)
class PeerCredentials:
    """The process at the other end of a Unix socket, as the kernel saw it at connect time (in our PID
    namespace and user namespace)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """SO_PEERCRED of a connected AF_UNIX socket; None where the platform has no SO_PEERCRED."""
    if sys.platform != "linux":
        return None
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCredentials(pid, uid, gid)


def peer_allowed(uid: int, allowed_uids: set[int] | frozenset[int]) -> bool:
    """Whether a peer with this uid may use the control socket: root always, otherwise only allowed uids."""
    return uid == 0 or uid in allowed_uids


class RequestError(ValueError):
    """A control request that is not one JSON object with a known "op" (the client's fault)."""


def encode_request(op: str) -> bytes:
    """The request line for `op`."""
    if op not in OPS:
        raise ValueError(f"unknown control op {op!r}")
    return json.dumps({"op": op}).encode() + b"\n"


def parse_request(line: bytes) -> str:
    """The op named by one request line; RequestError says what is wrong with it."""
    if not line.strip():
        raise RequestError("empty request")
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"request is not JSON: {e}") from None
    if not isinstance(message, dict) or set(message) != {"op"}:
        raise RequestError('request must be {"op": NAME}')
    op = message["op"]
    if op not in OPS:
        raise RequestError(f"unknown op {op!r} (known: {', '.join(OPS)})")
    return op


def encode_reply(reply: dict[str, Any]) -> bytes:
    """One reply line (compact JSON); ValueError/TypeError if `reply` is not JSON-serialisable."""
    return json.dumps(reply, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def parse_reply(line: bytes) -> dict[str, Any]:
    """The result of a reply line; ControlDenied or ControlFailed for an error reply or a malformed one."""
    if not line:
        raise ControlFailed("x2ssh closed the control connection without an answer")
    try:
        reply = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ControlFailed("x2ssh sent a malformed answer on the control socket") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlFailed("x2ssh sent a malformed answer on the control socket")
    if not reply["ok"]:
        error = str(reply.get("error", "unknown error"))
        if error == DENIED:
            raise ControlDenied("permission denied: this x2ssh was started by another user (try as root)")
        raise ControlFailed(f"x2ssh refused the request: {error}")
    result = reply.get("result")
    if not isinstance(result, dict):
        raise ControlFailed("x2ssh sent a malformed answer on the control socket")
    return result


class ControlServer:
    """Answers `status` and `down` on a Unix socket at `path` (its directory must exist).

    `status()` returns the status document; `down()` must only start the stop (as the SIGTERM handler does)
    and return at once; it may be called more than once. Both run on the event loop. Peers other than root and
    `allowed_uids` are refused. The socket file appears with mode 0600 (bound under a temporary name, then
    renamed) and is removed by `close()` unless another server has replaced it meanwhile.
    """

    def __init__(
        self,
        path: Path,
        status: Callable[[], dict[str, Any]],
        down: Callable[[], None],
        allowed_uids: set[int],
    ) -> None:
        self.path = path
        self._status = status
        self._down = down
        self._allowed = frozenset(allowed_uids)
        self._server: asyncio.Server | None = None
        self._identity: tuple[int, int] | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind and listen. ControlSocketBusy if another live server answers at `path` (a stale socket of a
        dead run is replaced); OSError if the directory is missing or not writable."""
        if sys.platform == "win32":
            raise ControlFailed(NO_CONTROL_ON_WINDOWS)
        await self._clear_stale()
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(temporary))
            os.chmod(temporary, 0o600)
            sock.listen(MAX_CLIENTS)
            os.rename(temporary, self.path)  # appears already 0600: no moment with a wider mode
            st = os.lstat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve_client, sock=sock, limit=MAX_REQUEST)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                temporary.unlink()
            self._unlink_if_ours()
            raise
        log.debug("control socket listening at %s", self.path)

    async def close(self) -> None:
        """Stop listening, let replies in progress finish (bounded), remove the socket file."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        others = self._clients - {asyncio.current_task()}
        if others:
            _, pending = await asyncio.wait(others, timeout=REQUEST_TIMEOUT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), REQUEST_TIMEOUT)
        self._unlink_if_ours()

    async def _clear_stale(self) -> None:
        if sys.platform == "win32":
            return
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketBusy(f"{self.path} exists and is not a socket")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(self.path)), REQUEST_TIMEOUT)
        except (ConnectionRefusedError, FileNotFoundError):
            log.debug("removing the stale control socket %s", self.path)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        except (OSError, TimeoutError) as e:
            raise ControlSocketBusy(f"cannot check the existing control socket {self.path}: {e}") from e
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        raise ControlSocketBusy(f"another x2ssh already answers on {self.path}")

    def _unlink_if_ours(self) -> None:
        if self._identity is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove the control socket %s: %s", self.path, e.strerror)
        self._identity = None

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        try:
            if len(self._clients) >= MAX_CLIENTS:
                log.warning("control socket: too many clients, dropping one")
                return
            if task is not None:
                self._clients.add(task)
            reply = await self._answer(reader, writer.get_extra_info("socket"))
            writer.write(reply)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log.debug("control client went away: %s", e)
        except Exception:  # a bug here must not end the session, nor leave an unretrieved task exception
            log.exception("control socket: internal error answering a client")
        finally:
            self._clients.discard(task)  # type: ignore[arg-type]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, sock: Any) -> bytes:
        peer = peer_credentials(sock)
        # The request is read even from a peer that will be refused: closing with its request unread would
        # reset the connection, and the client could lose the "permission denied" reply.
        problem, line = None, b""
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
        except ValueError:  # StreamReader's limit: longer than MAX_REQUEST without a newline
            problem = f"request longer than {MAX_REQUEST} bytes"
        except TimeoutError:
            problem = f"no request within {REQUEST_TIMEOUT:g} s"
        if peer is not None and not peer_allowed(peer.uid, self._allowed):
            log.warning("control socket: refused uid %d (pid %d)", peer.uid, peer.pid)
            return encode_reply({"ok": False, "error": DENIED})
        if problem is not None:
            return encode_reply({"ok": False, "error": problem})
        try:
            op = parse_request(line)
        except RequestError as e:
            return encode_reply({"ok": False, "error": str(e)})
        if op == "status":
            try:
                return encode_reply({"ok": True, "result": self._status()})
            except Exception as e:
                log.exception("control socket: cannot produce the status")
                return encode_reply({"ok": False, "error": f"status unavailable: {e}"})
        log.info("stop requested on the control socket by uid %d (pid %d)", peer.uid, peer.pid)
        try:
            self._down()
        except Exception as e:
            log.exception("control socket: the stop request failed")
            return encode_reply({"ok": False, "error": f"cannot stop: {e}"})
        return encode_reply({"ok": True, "result": {"stopping": True}})


async def start_control(
    directory: Callable[[], Awaitable[Path]],
    status: Callable[[], dict[str, Any]],
    down: Callable[[], None],
) -> ControlServer | None:
    """A run's control socket in `await directory()`, answering this user (and root), or None.

    Every front end starts it this way: `x2ssh status`/`down` are a convenience, so a run goes on without
    them (it logs why) when the directory or the socket cannot be had, and on Windows, where AF_UNIX with
    peer uids does not exist, nothing is attempted.
    """
    if sys.platform == "win32":  # no AF_UNIX with SO_PEERCRED, no uids: nothing to attempt
        log.info("no control socket on Windows: x2ssh status/down do not reach this run")
        return None
    try:
        server = ControlServer(await directory() / SOCKET_NAME, status, down, {os.getuid()})
        await server.start()
    except Exception as exc:
        log.warning("no control socket (x2ssh status/down will not reach this run): %s", exc)
        return None
    return server


@dataclass(frozen=True)
class Exchange:
    """A control request's result and the server's process ID (None if unknown), as seen from here."""

    result: dict[str, Any]
    server_pid: int | None


async def request(path: Path, op: str, *, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """Send `op` to the control socket at `path` and return the reply's result.

    Raises ControlNotRunning (no socket, or nobody listens), ControlDenied, or ControlFailed."""
    if sys.platform == "win32":
        raise ControlFailed(NO_CONTROL_ON_WINDOWS)
    data = encode_request(op)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=MAX_REPLY), timeout
        )
    except OSError as e:
        raise _connect_error(path, e) from e
    except TimeoutError:
        raise ControlFailed(f"x2ssh did not accept a connection on {path} within {timeout:g} s") from None
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):  # a refused peer may be closed already: read the reply
            await asyncio.wait_for(writer.drain(), timeout)
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        raise ControlFailed(f"x2ssh did not answer on {path} within {timeout:g} s") from None
    except ValueError:
        raise ControlFailed("x2ssh sent an oversized answer on the control socket") from None
    except OSError as e:
        raise ControlFailed(f"control connection to x2ssh failed: {e.strerror or e}") from e
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return parse_reply(line)


def request_sync(path: Path, op: str, *, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """Blocking `request` for the command line."""
    return exchange_sync(path, op, timeout=timeout).result


def exchange_sync(path: Path, op: str, *, timeout: float = REQUEST_TIMEOUT) -> Exchange:
    """Blocking request that also reports the server's PID (from SO_PEERCRED, in our PID namespace)."""
    if sys.platform == "win32":
        raise ControlFailed(NO_CONTROL_ON_WINDOWS)
    data = encode_request(op)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except TimeoutError:
            raise ControlFailed(f"x2ssh did not accept a connection on {path} within {timeout:g} s") from None
        except OSError as e:
            raise _connect_error(path, e) from e
        try:
            peer = peer_credentials(sock)
            pid: int | None = peer.pid if peer is not None and peer.pid else None
        except OSError:
            pid = None
        try:
            with contextlib.suppress(ConnectionError):  # a refused peer may be closed already
                sock.sendall(data)
            line = _read_line(sock)
        except TimeoutError:
            raise ControlFailed(f"x2ssh did not answer on {path} within {timeout:g} s") from None
        except OSError as e:
            raise ControlFailed(f"control connection to x2ssh failed: {e.strerror or e}") from e
    return Exchange(parse_reply(line), pid)


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            break
        if size > MAX_REPLY:
            raise ControlFailed("x2ssh sent an oversized answer on the control socket")
    return b"".join(chunks).split(b"\n", 1)[0]


def _connect_error(path: Path, e: OSError) -> X2sshError:
    if isinstance(e, FileNotFoundError | ConnectionRefusedError | NotADirectoryError):
        return ControlNotRunning("no x2ssh is running in this network namespace")
    if isinstance(e, PermissionError):
        return ControlDenied(
            f"permission denied on {path}: this x2ssh was started by another user (try as root)"
        )
    return ControlFailed(f"cannot reach x2ssh on {path}: {e.strerror or e}")
