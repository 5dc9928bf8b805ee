"""The user side of the privilege boundary: start the privileged helper and ask it for host changes.

`HelperClient.spawn()` starts `python -m x2ssh.host.helper` with one end of a socketpair as its standard
input: through `sudo` when x2ssh runs as a normal user (sudo asks for a password on the terminal if it
must), directly when x2ssh is root. Requests are rare (a handful per run, one per reconnect for the marked
socket), so each is a blocking exchange; the asyncio side runs it in a worker thread.
"""

from __future__ import annotations

import array
import asyncio
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from x2ssh.errors import NotPrivileged, X2sshError
from x2ssh.host import helper_protocol as proto
from x2ssh.host.api import NetworkWatcher, TunHandle

log = logging.getLogger(__name__)

HELPER_MODULE = "x2ssh.host.helper"
STOP_TIMEOUT = 30.0


class HelperError(X2sshError):
    """The privileged helper refused a request or could not carry it out; its exit code travels along."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class HelperGone(HelperError):
    """The privileged helper is not running (sudo refused, it crashed, or it was killed)."""

    exit_code = 77


def helper_argv(
    state_dir: Path, verbose: int, *, euid: int | None = None, interactive: bool = False
) -> list[str]:
    """The command line that starts the helper: through sudo unless we are root already."""
    argv = [sys.executable, "-m", HELPER_MODULE, "--state-dir", str(state_dir)] + ["-v"] * min(verbose, 1)
    if (os.geteuid() if euid is None else euid) == 0:
        return argv
    sudo = shutil.which("sudo") or next(
        (p for p in ("/usr/bin/sudo", "/bin/sudo") if os.access(p, os.X_OK)), None
    )
    if sudo is None:
        raise NotPrivileged(
            "x2ssh --vpn needs root for the TUN device, routes and DNS: install sudo, or run x2ssh as root"
        )
    return [sudo, *([] if interactive else ["-n"]), "--", *argv]


class HelperClient:
    """A running privileged helper and the socket to it. Thread-safe; one request at a time."""

    def __init__(self, sock: socket.socket, process: subprocess.Popen[bytes] | None) -> None:
        self._sock = sock
        self._process = process
        self._lock = threading.Lock()
        self.closed = False

    @classmethod
    def spawn(cls, state_dir: Path, verbose: int = 0) -> HelperClient:
        """Start the helper (through sudo if needed). Nothing on the host changes until it is asked."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = helper_argv(state_dir, verbose, interactive=sys.stdin.isatty())
        log.debug("starting the privileged helper: %s", " ".join(argv))
        try:
            process = subprocess.Popen(argv, stdin=theirs, close_fds=True)
        except OSError as e:
            ours.close()
            raise NotPrivileged(f"cannot start the privileged helper ({argv[0]}): {e.strerror}") from e
        finally:
            theirs.close()
        return cls(ours, process)

    # -- requests --

    def call(self, op: str, **args: Any) -> tuple[dict[str, Any], int | None]:
        """Send one request and wait for its reply; returns (result, passed fd or None)."""
        proto.validate({"op": op, "args": args})  # our own mistakes fail here, before the helper sees them
        with self._lock:
            if self.closed:
                raise HelperGone("the privileged helper has stopped")
            try:
                self._sock.sendmsg([proto.encode({"op": op, "args": args})])
                data, ancdata, _, _ = self._sock.recvmsg(proto.MAX_MESSAGE, socket.CMSG_SPACE(4))
            except OSError as e:
                self.closed = True
                raise HelperGone(self._why_gone(f"lost the privileged helper: {e.strerror}")) from e
        fds = [fd for level, kind, raw in ancdata if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
               for fd in array.array("i", raw[: len(raw) - len(raw) % 4])]  # fmt: skip
        fd = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        if not data:
            self.closed = True
            raise HelperGone(self._why_gone("the privileged helper closed the connection"))
        try:
            reply = proto.decode(data)
        except proto.RequestRejected:
            reply = None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            if fd is not None:
                os.close(fd)
            raise HelperError("the privileged helper sent a malformed reply", 70)
        if not reply["ok"]:
            if fd is not None:
                os.close(fd)
            code = reply.get("code")
            raise HelperError(str(reply.get("error")), code if isinstance(code, int) else 1)
        result = reply.get("result")
        return (result if isinstance(result, dict) else {}), fd

    async def acall(self, op: str, **args: Any) -> tuple[dict[str, Any], int | None]:
        """`call` from asyncio code (the exchange blocks, so it runs in a worker thread)."""
        return await asyncio.to_thread(self.call, op, **args)

    def start(self, tun: str, mtu: int, excludes: Sequence[Any], kill_switch: bool) -> dict[str, Any]:
        """Take the run's lock, undo what crashed runs left, check the TUN name and the kill switch."""
        result, _ = self.call(
            "start",
            version=proto.PROTOCOL_VERSION,
            tun=tun,
            mtu=mtu,
            excludes=[str(n) for n in excludes],
            kill_switch=kill_switch,
        )
        return result

    async def open_tun(self) -> TunHandle:
        """Create the TUN device; its descriptor is ours from now on."""
        result, fd = await self.acall("open_tun")
        if fd is None:
            raise HelperError("the privileged helper did not pass the TUN device", 70)
        os.set_blocking(fd, False)
        v6 = result.get("v6")
        return TunHandle(
            fd=fd,
            name=str(result["name"]),
            mtu=int(result["mtu"]),
            v4=ipaddress.IPv4Interface(result["v4"]),
            v6=ipaddress.IPv6Interface(v6) if v6 else None,
        )

    async def marked_socket(self, family: int, kind: int) -> socket.socket:
        """A new, unconnected socket whose traffic bypasses the tunnel (it carries x2ssh's firewall mark)."""
        _, fd = await self.acall(
            "marked_socket",
            family=6 if family == socket.AF_INET6 else 4,
            type="stream" if kind == socket.SOCK_STREAM else "dgram",
        )
        if fd is None:
            raise HelperError("the privileged helper did not pass the socket", 70)
        return socket.socket(fileno=fd)

    async def routes(self, bypass: Sequence[Any]) -> str:
        """Route everything but the marked sockets into the TUN; returns the routing mode used."""
        result, _ = await self.acall("routes", bypass=[str(a) for a in bypass])
        return str(result.get("mode"))

    async def dns(self, servers: Sequence[Any]) -> str:
        """Point the machine's DNS at `servers`; returns the mechanism used."""
        result, _ = await self.acall("dns", servers=[str(a) for a in servers])
        return str(result.get("backend"))

    async def run_dir(self) -> Path:
        """This run's directory under /run/x2ssh, owned by us (for the control socket)."""
        result, _ = await self.acall("run_dir", uid=os.getuid())
        return Path(str(result["path"]))

    async def kill_switch(self) -> None:
        """Let nothing but the tunnel and the marked sockets leave the machine."""
        await self.acall("kill_switch")

    def cleanup(self) -> list[str]:
        """Undo what crashed runs left behind (for `--vpn-cleanup`)."""
        result, _ = self.call("cleanup")
        return [str(x) for x in result.get("undone", [])]

    def down(self) -> list[str]:
        """Undo everything this run changed and stop the helper. Safe to call when it is gone already."""
        undone: list[str] = []
        if not self.closed:
            try:
                result, _ = self.call("down")
                undone = [str(x) for x in result.get("undone", [])]
            except HelperGone:
                pass
        self.close()
        return undone

    @staticmethod
    def network_watch(on_change: Callable[[str], None], ignore: Callable[[], set[int]]) -> NetworkWatcher:
        """Network changes come from rtnetlink, which needs no privileges: watched on this side."""
        from x2ssh.host.linux.netwatch import NetworkWatch

        return NetworkWatch(on_change, ignore)

    def close(self) -> None:
        """Close the socket (the helper then undoes everything and exits) and wait for it, bounded."""
        with self._lock:
            self.closed = True
            self._sock.close()
        if self._process is not None:
            try:
                self._process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.error("the privileged helper did not stop within %g s", STOP_TIMEOUT)

    def _why_gone(self, otherwise: str) -> str:
        if self._process is not None:
            try:
                code = self._process.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            if code not in (None, 0):
                return (
                    f"the privileged helper exited with status {code} (sudo refused or failed? "
                    "x2ssh needs root for the TUN device, routes and DNS)"
                )
        return otherwise
