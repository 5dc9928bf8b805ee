"""The process on Windows: the Administrator check, and cleanup on Ctrl-C, Ctrl-Break and console close.

Windows calls a console control handler on a thread of its own. For Ctrl-C and Ctrl-Break the run stops
the normal way (`on_interrupt`, which should hand over to the event loop). Without an `on_interrupt`
(how `host.WindowsHost` installs it: the host control does not know the front end), Ctrl-C goes on to
Python's own handler, which raises KeyboardInterrupt, and `asyncio.run` cancels the run, whose tear-down
undoes everything; Ctrl-Break, whose default ends the process, is cleaned up here first.

For CTRL_CLOSE_EVENT (the console window closed), CTRL_LOGOFF_EVENT and CTRL_SHUTDOWN_EVENT the process
is terminated as soon as the handler returns (after about 5 s for close), so the handler runs the undo
itself, synchronously, before returning.

What the handler cannot cover, written down so nobody counts on it (Microsoft's SetConsoleCtrlHandler
docs): interactive processes are not sent CTRL_LOGOFF_EVENT/CTRL_SHUTDOWN_EVENT (only services are), and a
process that loads user32.dll does not get them either. At logoff the process is simply ended. Then the
dynamic WFP session's filters vanish with the process and the Wintun adapter (with its addresses, routes
and DNS setting) goes with its handle; what stays are the host routes pinned through the uplink, which
`--vpn-cleanup` removes from the journal as on Linux.

`CtrlDispatcher` is the logic (tested on Linux); `install` registers it with SetConsoleCtrlHandler.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

from x2ssh.errors import NotPrivileged
from x2ssh.host.windows.prototypes import function as fn

log = logging.getLogger(__name__)

CTRL_C_EVENT, CTRL_BREAK_EVENT, CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT = 0, 1, 2, 5, 6
EVENT_NAMES = {
    CTRL_C_EVENT: "Ctrl-C",
    CTRL_BREAK_EVENT: "Ctrl-Break",
    CTRL_CLOSE_EVENT: "console closed",
    CTRL_LOGOFF_EVENT: "logoff",
    CTRL_SHUTDOWN_EVENT: "shutdown",
}
ENDING = {CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT}

ADMIN_MESSAGE = (
    "x2ssh needs Administrator rights on Windows to create the Wintun adapter, its routes and firewall "
    "filters: run it from an elevated prompt (Run as administrator)"
)


class CtrlDispatcher:
    """Decides what a console control event does; `handle` returns what the handler routine returns."""

    def __init__(self, on_interrupt: Callable[[str], None] | None, cleanup: Callable[[], None]) -> None:
        self.on_interrupt = on_interrupt
        self.cleanup = cleanup
        self._lock = threading.Lock()
        self._cleaned = False

    def handle(self, ctrl_type: int) -> bool:
        """True: handled (Windows calls no further handler); False: let the default handler run."""
        reason = EVENT_NAMES.get(ctrl_type)
        if reason is None:
            return False
        if ctrl_type in ENDING:
            self.cleanup_once(reason)
            return True
        if self.on_interrupt is None:
            if ctrl_type == CTRL_BREAK_EVENT:
                self.cleanup_once(reason)  # the default handler that runs next ends the process
            return False
        try:
            self.on_interrupt(reason)
        except Exception:
            log.exception("stopping on %s failed; cleaning up here", reason)
            self.cleanup_once(reason)
        return True

    def cleanup_once(self, reason: str) -> None:
        """Run the cleanup once, whichever thread asks first; later callers wait for it to finish."""
        with self._lock:
            if self._cleaned:
                return
            self._cleaned = True
            log.info("cleaning up: %s", reason)
            try:
                self.cleanup()
            except Exception:
                log.exception("cleanup on %s failed; `x2ssh --vpn-cleanup` finishes it", reason)


def is_admin() -> bool:
    """True if the process runs elevated (shell32 IsUserAnAdmin)."""
    return bool(fn("IsUserAnAdmin")())


def require_admin(check: Callable[[], bool] = is_admin) -> None:
    """Raise NotPrivileged with a message that says what to do, unless the process is elevated."""
    if not check():
        raise NotPrivileged(ADMIN_MESSAGE)


def install(dispatcher: CtrlDispatcher) -> Any:
    """Register the dispatcher with SetConsoleCtrlHandler; keep the returned callback alive (Windows only)."""
    if sys.platform != "win32":
        raise OSError("console control handlers exist only on Windows")
    routine = ctypes.WINFUNCTYPE(ctypes.c_int32, ctypes.c_uint32)(lambda t: int(dispatcher.handle(t)))
    if not fn("SetConsoleCtrlHandler")(routine, True):
        raise ctypes.WinError(ctypes.get_last_error())
    return routine


def uninstall(routine: Any) -> None:
    """Remove a handler that `install` registered (Windows only; errors are ignored: the run is ending)."""
    if sys.platform == "win32":
        fn("SetConsoleCtrlHandler")(routine, False)
