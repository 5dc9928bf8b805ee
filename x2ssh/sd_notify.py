"""Telling systemd how the service is doing: the sd_notify(3) protocol without libsystemd.

Theory of operation. A service started with `Type=notify` finds the address of systemd's notification socket
in `NOTIFY_SOCKET`: an absolute path, or `@name` for a name in the abstract namespace (written with a leading
NUL byte on the wire). Each notification is one datagram of newline-separated `KEY=VALUE` assignments sent to
that address from any AF_UNIX datagram socket; the kernel attaches the sender's credentials, which is how
systemd checks `NotifyAccess=main`. Nothing comes back.

- `READY=1`      start-up is complete (for x2ssh: the tunnel carries traffic); `systemctl start` returns;
- `STATUS=TEXT`  one line shown by `systemctl status`;
- `WATCHDOG=1`   keep-alive, expected at least every `WATCHDOG_USEC` microseconds when that is set
                 (`WatchdogSec=` in the unit); `watchdog_loop` sends it at half that interval;
- `STOPPING=1`   shutdown has begun.

Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op. A notification that cannot be sent is logged once
and otherwise ignored: telling systemd is never a reason for the VPN to fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
MAX_STATUS = 1024  # systemd shows one line; a longer STATUS= is only noise in `systemctl status`
_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address named by a NOTIFY_SOCKET value: a path (str), an abstract name (bytes with a
    leading NUL), or None when it is unset or empty. Raises ValueError for a form this module cannot use
    (relative path, `vsock:`, too long)."""
    if not value:
        return None
    if value.startswith("@"):
        address: str | bytes = b"\0" + value[1:].encode()
        size = len(address)
    elif value.startswith("/"):
        address = value
        size = len(os.fsencode(value))
    else:
        raise ValueError(f"unsupported {NOTIFY_SOCKET} {value!r} (an absolute path or @name is needed)")
    if size >= _SUN_PATH_MAX:
        raise ValueError(f"{NOTIFY_SOCKET} {value!r} is longer than a Unix socket address allows")
    return address


class Notifier:
    """Sends sd_notify messages to the socket named by NOTIFY_SOCKET, one datagram per call.

    `environ` defaults to os.environ. With `unset_environment`, NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID
    are removed from it after reading, so that child processes (the privileged helper, ProxyCommands) do not
    inherit them. Every method returns whether the message was sent and never raises.
    """

    def __init__(
        self, environ: MutableMapping[str, str] | None = None, *, unset_environment: bool = False
    ) -> None:
        env = os.environ if environ is None else environ
        self._watchdog = _watchdog_interval(env)
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._complained = False
        try:
            self._address = notify_address(env.get(NOTIFY_SOCKET))
        except ValueError as e:
            self._complain(str(e))
        if self._address is None:
            self._watchdog = None  # nobody to ping
        if unset_environment:
            for name in (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID):
                env.pop(name, None)

    @property
    def enabled(self) -> bool:
        """True when NOTIFY_SOCKET names a usable socket (x2ssh runs as a Type=notify service)."""
        return self._address is not None

    def ready(self) -> bool:
        """Start-up is complete: send READY=1."""
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        """Send STATUS=text (made one line, at most MAX_STATUS characters)."""
        line = " ".join(text.split())[:MAX_STATUS]
        return self.send(f"STATUS={line}")

    def stopping(self) -> bool:
        """Shutdown has begun: send STOPPING=1."""
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """Keep-alive for WatchdogSec=: send WATCHDOG=1."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds within which systemd expects WATCHDOG=1 (from WATCHDOG_USEC), or None when there is
        no watchdog here (unset, invalid, WATCHDOG_PID names another process, no NOTIFY_SOCKET)."""
        return self._watchdog

    def send(self, *assignments: str) -> bool:
        """Send KEY=VALUE assignments as one datagram; False (logged once) if it could not be sent."""
        if sys.platform == "win32":  # no systemd, and no AF_UNIX datagram socket in Python there
            return False
        if self._address is None:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)  # a full queue at systemd must not stall the event loop
            self._sock.sendto(data, self._address)
        except OSError as e:
            self._complain(f"cannot notify systemd at {self._describe()}: {e.strerror or e}")
            return False
        return True

    def close(self) -> None:
        """Release the socket (sending again reopens it)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _describe(self) -> str:
        if isinstance(self._address, bytes):
            return "@" + self._address[1:].decode(errors="replace")
        return str(self._address)

    def _complain(self, message: str) -> None:
        if self._complained:
            log.debug("%s", message)
        else:
            self._complained = True
            log.warning("%s (further failures are logged at debug level)", message)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec = env.get(WATCHDOG_USEC, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get(WATCHDOG_PID)
    if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # the watchdog is meant for another process (e.g. we are a child of the service)
    return int(usec) / 1e6


async def watchdog_loop(notifier: Notifier) -> None:
    """Send WATCHDOG=1 at half the watchdog interval until cancelled; returns at once without a watchdog.

    Run it as a task on the session's event loop: a loop that stops turning stops the pings, and systemd
    restarts the service (WatchdogSec=)."""
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval / 2)
