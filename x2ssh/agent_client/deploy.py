"""Deploy, start, reach and stop the UDP agent on the SSH server (client side, asyncssh).

`deploy_agent(conn)` does, over the one SSH connection:

1. Probe: run each python candidate (`python3`, `/usr/bin/python3`, `python`) with `-I -c` to print its
   version, `sys.platform` and path, all at once (one exec channel each, no shell syntax beyond a
   plainly quoted argv, so any login shell runs it; `-I` ignores PYTHON* variables and user site).
2. Upload and start in one exec channel: a tiny bootstrap run by the chosen python creates
   `/tmp/.x2ssh-agent-<random>` (mode 0700, `mkdir` fails rather than reuse anything), reads exactly
   the zipapp's size from stdin into `agent.pyz` (O_EXCL|O_NOFOLLOW, 0600) and `exec`s
   `python -I agent.pyz --dir DIR ...`. The agent then reads the token line from the same stdin.
   Why not SFTP: the sftp subsystem is often disabled or chrooted (internal-sftp), so /tmp there may
   not be the /tmp the agent sees; why not `cat >`: it depends on the login shell's redirection syntax
   and cannot create the directory and file atomically with the right modes. Streaming into the same
   python that will run the agent needs nothing but that python, costs one round trip, and keeps the
   exec channel whose closing (stdin EOF) makes the agent clean up and exit.
   The bootstrap also removes stale agent directories of this user (socket present but refusing
   connections: the agent was SIGKILLed), so a new x2ssh never trips over them.
3. Read `X2SSH-AGENT READY <path>` from stdout, open a `direct-streamlocal` channel to that path and
   send HELLO with the token; WELCOME completes the handshake.

Windows servers are a designed seam only: `NamedPipeTransport` raises NotImplementedError, which
`deploy_agent` reports as AgentUnavailable.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import secrets
import shlex
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import asyncssh

from agent import protocol as p
from agent.zipapp import build_zipapp

log = logging.getLogger(__name__)

READY_PREFIX = b"X2SSH-AGENT READY "
ERROR_PREFIX = b"X2SSH-AGENT ERROR "
MIN_PYTHON = (3, 8)
AGENT_DIR_PREFIX = "/tmp/.x2ssh-agent-"
WINDOWS_NOT_IMPLEMENTED = "Windows servers: named pipe transport not implemented yet"

_PROBE_CODE = (
    "import sys;sys.stdout.write('X2SSH-PY %d %d %s %s\\n' % "
    "(sys.version_info[0], sys.version_info[1], sys.platform, sys.executable))"
)

# Runs on the server under the chosen python (3.8+). argv: DIR SIZE AGENT-ARGS...
_BOOTSTRAP = r"""
import glob, os, socket, stat, sys, time
def say(msg):
    sys.stdout.write('X2SSH-AGENT ERROR ' + msg + '\n'); sys.stdout.flush(); sys.exit(3)
def remove(d):
    for name in ('agent.sock', 'agent.pyz'):
        try: os.unlink(os.path.join(d, name))
        except OSError: pass
    try: os.rmdir(d)
    except OSError: pass
def stale(d):
    info = os.lstat(d)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid(): return False
    path = os.path.join(d, 'agent.sock')
    if not os.path.exists(path): return time.time() - info.st_mtime > 600
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try: s.connect(path)
    except ConnectionRefusedError: return True
    except OSError: return False
    finally: s.close()
    return False
d, size = sys.argv[1], int(sys.argv[2])
for old in glob.glob(os.path.join(os.path.dirname(d), '.x2ssh-agent-*')):
    try:
        if stale(old): remove(old)
    except OSError: pass
if not sys.executable: say('python has no sys.executable')
try:
    os.mkdir(d, 0o700); os.chmod(d, 0o700)
except OSError as e:
    say('cannot create %s: %s' % (d, e))
path = os.path.join(d, 'agent.pyz')
try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0), 0o600)
    left = size
    while left:
        chunk = os.read(0, min(left, 65536))
        if not chunk: raise OSError('upload ended after %d of %d bytes' % (size - left, size))
        view = memoryview(chunk)
        while view: view = view[os.write(fd, view):]
        left -= len(chunk)
    os.close(fd)
    os.execv(sys.executable, [sys.executable, '-I', path, '--dir', d] + sys.argv[3:])
except OSError as e:
    remove(d)
    say('upload failed: %s' % e)
"""
_BOOTSTRAP_PACKED = base64.b64encode(zlib.compress(_BOOTSTRAP.encode(), 9)).decode()
_BOOTSTRAP_COMMAND = f"import base64,zlib;exec(zlib.decompress(base64.b64decode('{_BOOTSTRAP_PACKED}')))"


class AgentUnavailable(Exception):
    """The UDP agent cannot run on this server (no python3, upload failed, did not start, Windows...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"UDP agent unavailable: {reason}")
        self.reason = reason


class AgentReceiver(Protocol):
    """Who gets what the agent sends (`x2ssh.flows.udp_relay.UdpRelay` implements it)."""

    def datagram_from_agent(self, flow_id: int, source: tuple[str, int], payload: bytes) -> None: ...
    def flow_closed_by_agent(self, flow_id: int, reason: int) -> None: ...
    def agent_lost(self, reason: str) -> None: ...


@dataclass(frozen=True)
class AgentSettings:
    """How the agent is started and what it may use; the timeouts should match the UdpRelay's."""

    idle_timeout: float = 60.0
    dns_idle_timeout: float = 10.0
    max_flows: int = 1024
    max_queue_bytes: int = 256 * 1024
    connect_timeout: float = 30.0  # the agent exits when no client has connected by then
    keepalive_interval: float = 15.0  # the client proves it is alive this often ...
    client_silence_timeout: float = 60.0  # ... and the agent exits after this much silence
    python_candidates: tuple[str, ...] = ("python3", "/usr/bin/python3", "python")
    probe_timeout: float = 15.0
    start_timeout: float = 20.0
    close_timeout: float = 10.0
    max_write_buffer: int = 4 * 1024 * 1024  # datagrams are dropped while more is waiting for the channel
    log_level: str = "INFO"

    def agent_args(self) -> list[str]:
        return [
            "--idle-timeout",
            str(self.idle_timeout),
            "--dns-idle-timeout",
            str(self.dns_idle_timeout),
            "--max-flows",
            str(self.max_flows),
            "--max-queue-bytes",
            str(self.max_queue_bytes),
            "--connect-timeout",
            str(self.connect_timeout),
            "--client-silence-timeout",
            str(self.client_silence_timeout),
            "--log-level",
            self.log_level,
        ]


@dataclass(frozen=True)
class ServerPython:
    """A usable python found on the server."""

    command: str
    version: tuple[int, int]
    platform: str
    executable: str


# --- transport seam ----------------------------------------------------------------------------------


class AgentTransport:
    """How the agent's endpoint is named on the server and reached through SSH."""

    def directory(self, name: str) -> str:
        raise NotImplementedError

    async def open(
        self, conn: asyncssh.SSHClientConnection, endpoint: str, factory: Callable[[], _AgentChannelSession]
    ) -> tuple[asyncssh.SSHUNIXChannel, _AgentChannelSession]:
        raise NotImplementedError


class UnixSocketTransport(AgentTransport):
    """POSIX servers: a Unix socket in a private /tmp directory, reached by OpenSSH streamlocal forwarding."""

    def directory(self, name: str) -> str:
        return AGENT_DIR_PREFIX + name

    async def open(self, conn, endpoint, factory):
        return await conn.create_unix_connection(factory, endpoint)


class NamedPipeTransport(AgentTransport):
    """Windows servers: the agent would listen on a named pipe under %TEMP%\\.x2ssh-agent-<random>.

    Design: OpenSSH for Windows has no streamlocal forwarding to named pipes, so the client would
    instead talk to the agent over the exec channel's stdin/stdout (the same frames), or through a
    `direct-tcpip` channel to a loopback port the agent binds, still authenticated by the token.
    """

    def directory(self, name: str) -> str:
        raise NotImplementedError(WINDOWS_NOT_IMPLEMENTED)

    async def open(self, conn, endpoint, factory):
        raise NotImplementedError(WINDOWS_NOT_IMPLEMENTED)


def transport_for(platform: str) -> AgentTransport:
    """The transport for a server whose python reports `sys.platform` == platform."""
    if platform.startswith(("win", "cygwin", "msys")):
        return NamedPipeTransport()
    return UnixSocketTransport()


# --- the agent connection ----------------------------------------------------------------------------


class _AgentChannelSession(asyncssh.SSHUNIXSession):
    def __init__(self, handle: AgentHandle) -> None:
        self._handle = handle

    def connection_made(self, chan: asyncssh.SSHUNIXChannel) -> None:
        self._handle._chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._handle._data_received(data)

    def eof_received(self) -> bool:
        self._handle._stream_ended("the agent closed its connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._handle._stream_ended(f"connection lost: {exc}" if exc else "connection closed")


class AgentHandle:
    """A running agent and the framed connection to it; an `AgentLink` for `UdpRelay`."""

    def __init__(
        self,
        process: asyncssh.SSHClientProcess,
        directory: str,
        socket_path: str,
        python: ServerPython,
        token: bytes,
        settings: AgentSettings,
        stderr_tail: collections.deque[str],
        stderr_task: asyncio.Task[None] | None = None,
    ) -> None:
        self.process = process
        self._stderr_task = stderr_task  # forwards the agent's log lines; referenced so it is not collected
        self.directory = directory
        self.socket_path = socket_path
        self.python = python
        self.settings = settings
        self.version = 0
        self.software = ""
        self.max_flows = 0
        self.drops: collections.Counter[str] = collections.Counter()
        self._token = token
        self._stderr_tail = stderr_tail
        self._chan: asyncssh.SSHUNIXChannel | None = None
        self._decoder = p.Decoder()
        self._receiver: AgentReceiver | None = None
        self._welcome: asyncio.Future[p.Welcome] = asyncio.get_running_loop().create_future()
        # Nobody may be waiting when the link fails (deployment gave up earlier, or the handshake timed
        # out): mark the outcome as seen so asyncio never logs "Future exception was never retrieved".
        self._welcome.add_done_callback(_consume_outcome)
        self._closed = asyncio.Event()
        self._closing = False
        self._keepalive_replies = 0
        # Frames written in one event-loop turn (a netstack batch) leave as one channel write: far fewer
        # SSH packets than one per datagram.
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    # --- AgentLink ------------------------------------------------------------------------------------

    def set_receiver(self, receiver: AgentReceiver | None) -> None:
        self._receiver = receiver

    def open_flow(self, flow_id: int, destination: tuple[str, int]) -> None:
        self._write(p.encode(p.OpenFlow(flow_id, destination)))

    def send_datagram(self, flow_id: int, payload: bytes) -> bool:
        """Queue a datagram for the agent; False (dropped) when the link is gone or backed up."""
        chan = self._chan
        if chan is None or self._closed.is_set():
            return False
        if chan.get_write_buffer_size() + self._pending_bytes > self.settings.max_write_buffer:
            self.drops["write_buffer_full"] += 1
            return False
        self._write(p.encode_datagram(flow_id, payload))
        return True

    def close_flow(self, flow_id: int) -> None:
        self._write(p.encode(p.CloseFlow(flow_id, p.CLOSE_NORMAL)))

    def send_keepalive(self, nonce: int) -> None:
        self._write(p.encode(p.Keepalive(nonce & 0xFFFFFFFF, False)))

    @property
    def keepalive_replies(self) -> int:
        return self._keepalive_replies

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        """Say GOODBYE and wait (bounded) until the agent has removed its files and exited."""
        self._closing = True
        if self._chan is not None and not self._closed.is_set():
            self._write(p.encode(p.Goodbye()))
            self._flush()
            self._chan.write_eof()
        try:
            await asyncio.wait_for(self.process.wait(), self.settings.close_timeout)
        except (TimeoutError, asyncssh.Error, OSError) as exc:
            log.warning("UDP agent did not exit cleanly within %g s: %s", self.settings.close_timeout, exc)
        finally:
            self._shutdown("closed")
            self.process.close()

    async def _handshake(self, timeout: float) -> None:
        self._write(p.encode(p.Hello(p.MIN_VERSION, p.MAX_VERSION, self._token)))
        welcome = await asyncio.wait_for(asyncio.shield(self._welcome), timeout)
        self.version, self.max_flows, self.software = welcome.version, welcome.max_flows, welcome.software

    def _write(self, data: bytes) -> None:
        if self._chan is not None and not self._closed.is_set():
            if not self._pending:
                asyncio.get_running_loop().call_soon(self._flush)
            self._pending.append(data)
            self._pending_bytes += len(data)

    def _flush(self) -> None:
        if not self._pending:
            return  # already flushed (close() flushes at once)
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if self._chan is not None and not self._closed.is_set():
            try:
                self._chan.write(data)
            except (BrokenPipeError, asyncssh.Error) as exc:  # the channel closed under us
                self._shutdown(f"agent channel closed: {exc}")

    def _shutdown(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if not self._welcome.done():
            self._welcome.set_exception(AgentUnavailable(f"agent connection ended before WELCOME: {reason}"))
        if self._chan is not None:
            self._chan.close()
        receiver, self._receiver = self._receiver, None
        if receiver is not None and not self._closing:
            receiver.agent_lost(reason)

    def _stream_ended(self, reason: str) -> None:
        if not self._closed.is_set():
            try:
                self._decoder.eof()
            except p.ProtocolError as exc:
                reason = f"{reason} ({exc.reason})"
            if not self._closing:
                log.warning("UDP agent connection ended: %s", reason)
            self._shutdown(reason)

    def _data_received(self, data: bytes) -> None:
        try:
            for frame in self._decoder.feed(data):
                self._handle_frame(frame)
        except p.ProtocolError as exc:
            log.error("protocol error from the UDP agent: %s; closing the agent connection", exc.reason)
            self._write(p.encode(p.Error(exc.code, exc.reason)))
            self._flush()  # the agent should learn why before the channel closes
            self._shutdown(f"protocol error: {exc.reason}")

    def _handle_frame(self, frame: p.Frame) -> None:
        kind = type(frame)
        receiver = self._receiver
        if kind is p.Datagram:
            if frame.peer is None:
                raise p.ProtocolError("DATAGRAM from the agent without a source", p.ERR_UNEXPECTED_FRAME)
            if receiver is None:
                self.drops["no_receiver"] += 1
            else:
                receiver.datagram_from_agent(frame.flow_id, frame.peer, frame.payload)
        elif kind is p.CloseFlow:
            if receiver is not None:
                receiver.flow_closed_by_agent(frame.flow_id, frame.reason)
        elif kind is p.Keepalive:
            if frame.is_reply:
                self._keepalive_replies += 1
            else:
                self._write(p.encode(p.Keepalive(frame.nonce, True)))
        elif kind is p.Welcome and not self._welcome.done():
            self._welcome.set_result(frame)
        elif kind is p.Error:
            log.error("UDP agent reported error %d: %s", frame.code, frame.message)
            if not self._welcome.done():
                self._welcome.set_exception(
                    AgentUnavailable(f"agent refused the connection: {frame.message}")
                )
        else:
            raise p.ProtocolError(f"unexpected {kind.__name__} frame from the agent", p.ERR_UNEXPECTED_FRAME)


def _consume_outcome(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()


# --- deployment --------------------------------------------------------------------------------------


async def probe_python(
    conn: asyncssh.SSHClientConnection, candidates: Sequence[str], timeout: float
) -> tuple[ServerPython | None, list[str]]:
    """Find the first candidate that is Python >= 3.8; also return what was found for each (for errors)."""

    async def probe(command: str) -> ServerPython | str:
        try:
            result = await conn.run(shlex.join([command, "-I", "-c", _PROBE_CODE]), timeout=timeout)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            return f"{command}: {exc}"
        for line in str(result.stdout or "").splitlines():
            fields = line.split(" ", 4)
            if len(fields) == 5 and fields[0] == "X2SSH-PY":
                version = (int(fields[1]), int(fields[2]))
                return ServerPython(command, version, fields[3], fields[4])
        if result.exit_status == 127:
            return f"{command}: not found"
        stderr = str(result.stderr or "").strip().splitlines()
        return f"{command}: exit status {result.exit_status}" + (f" ({stderr[-1]})" if stderr else "")

    results = await asyncio.gather(*(probe(command) for command in candidates))
    found = None
    notes = []
    for result in results:
        if isinstance(result, str):
            notes.append(result)
        elif result.version < MIN_PYTHON:
            notes.append(f"{result.command}: Python {result.version[0]}.{result.version[1]} is too old")
        else:
            found = found or result
    return found, notes


async def _server_is_windows(conn: asyncssh.SSHClientConnection, timeout: float) -> bool:
    try:
        uname = await conn.run("uname -s", timeout=timeout)
        if uname.exit_status == 0:
            return False
        ver = await conn.run("cmd /c ver", timeout=timeout)
    except (asyncssh.Error, OSError, TimeoutError):
        return False
    return "windows" in str(ver.stdout or "").lower()


async def deploy_agent(
    conn: asyncssh.SSHClientConnection, settings: AgentSettings | None = None
) -> AgentHandle:
    """Upload and start the UDP agent on the server of `conn` and connect to it.

    Raises AgentUnavailable with a clear reason when no python >= 3.8 is found, the upload fails, the
    agent does not come up within `settings.start_timeout`, or the server is Windows (not yet supported).
    """
    settings = settings or AgentSettings()
    python, notes = await probe_python(conn, settings.python_candidates, settings.probe_timeout)
    if python is None:
        if await _server_is_windows(conn, settings.probe_timeout):
            raise AgentUnavailable(WINDOWS_NOT_IMPLEMENTED)
        raise AgentUnavailable(
            f"no Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} on the server ({'; '.join(notes)}); "
            "TCP still works, DNS falls back to DNS over TCP"
        )
    transport = transport_for(python.platform)
    try:
        directory = transport.directory(secrets.token_hex(8))
    except NotImplementedError as exc:
        raise AgentUnavailable(str(exc)) from exc
    log.info(
        "starting the UDP agent with %s (Python %d.%d) in %s", python.command, *python.version, directory
    )

    zipapp = build_zipapp()
    token = secrets.token_bytes(p.TOKEN_SIZE)
    command = shlex.join(
        [python.command, "-I", "-c", _BOOTSTRAP_COMMAND, directory, str(len(zipapp)), *settings.agent_args()]
    )
    try:
        process = await conn.create_process(command, encoding=None)
    except (asyncssh.Error, OSError) as exc:
        raise AgentUnavailable(f"cannot start the agent: {exc}") from exc
    stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
    stderr_task = asyncio.create_task(_forward_stderr(process, stderr_tail))
    handle = None
    try:
        process.stdin.write(zipapp + token.hex().encode() + b"\n")
        socket_path = await asyncio.wait_for(_read_ready_line(process, stderr_tail), settings.start_timeout)
        handle = AgentHandle(
            process, directory, socket_path, python, token, settings, stderr_tail, stderr_task
        )
        try:
            await transport.open(conn, socket_path, lambda: _AgentChannelSession(handle))
        except (asyncssh.Error, OSError) as exc:
            raise AgentUnavailable(
                f"cannot reach the agent socket through SSH ({exc}); is AllowStreamLocalForwarding enabled?"
            ) from exc
        await handle._handshake(settings.start_timeout)
    except (TimeoutError, AgentUnavailable, asyncssh.Error, OSError) as exc:
        process.close()  # stdin EOF: an agent that did start removes its files and exits
        if handle is not None:
            handle._shutdown("deployment failed")
        if isinstance(exc, AgentUnavailable):
            raise
        if isinstance(exc, TimeoutError):
            raise AgentUnavailable(
                f"the agent did not come up within {settings.start_timeout:g} s{_tail(stderr_tail)}"
            ) from None
        raise AgentUnavailable(f"agent deployment failed: {exc}{_tail(stderr_tail)}") from exc
    log.info("UDP agent up: %s, protocol %d, socket %s", handle.software, handle.version, socket_path)
    return handle


async def _read_ready_line(process: asyncssh.SSHClientProcess, stderr_tail: collections.deque[str]) -> str:
    # Login shells may print banners first: look for our marker rather than trusting the first line.
    while True:
        line = await process.stdout.readline()
        if not line:
            await asyncio.sleep(0.05)  # let the stderr forwarder catch the agent's last words
            raise AgentUnavailable(f"the agent exited before it was ready{_tail(stderr_tail)}")
        if line.startswith(READY_PREFIX):
            return line[len(READY_PREFIX) :].decode("utf-8", "replace").strip()
        if line.startswith(ERROR_PREFIX):
            raise AgentUnavailable(line[len(ERROR_PREFIX) :].decode("utf-8", "replace").strip())


async def _forward_stderr(process: asyncssh.SSHClientProcess, tail: collections.deque[str]) -> None:
    try:
        async for raw in process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                tail.append(line)
                log.info("agent: %s", line)
    except (asyncssh.Error, OSError):
        pass


def _tail(lines: collections.deque[str]) -> str:
    return (": " + " | ".join(list(lines)[-3:])) if lines else ""
