"""How a front end's run ends: SIGINT, SIGTERM and SIGHUP (a closed terminal) all stop it in order.

On Windows there is no SIGHUP, and its event loop cannot watch signals (`add_signal_handler` raises
NotImplementedError): there Ctrl-C (SIGINT) and Ctrl-Break / console close (SIGBREAK) are caught with
`signal.signal` and handed to the loop thread-safely. Not run on Windows (no Windows machine here); the
fallback path is exercised on Linux by the unit tests.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import TracebackType

log = logging.getLogger("x2ssh")

if sys.platform == "win32":
    STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGBREAK)
else:
    STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    """`with StopRequest("restoring routes and DNS") as stop:` inside the event loop; `stop.event` is set by
    a stop signal or by `request()` (e.g. `x2ssh down`); `exit_code()` is what the process returns."""

    def __init__(self, doing: str) -> None:
        self.event = asyncio.Event()
        self.signal = 0
        self._doing = doing
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: dict[signal.Signals, object] = {}  # handlers replaced by the fallback

    def __enter__(self) -> StopRequest:
        loop = self._loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            try:
                loop.add_signal_handler(sig, self.request, sig)
            except NotImplementedError:  # Windows' loops
                self._previous[sig] = signal.signal(sig, self._from_handler)
        return self

    def _from_handler(self, signum: int, frame: object) -> None:
        """A `signal.signal` handler: runs between bytecodes of the main thread, so only schedule."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.request, signum)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None:
            for sig in STOP_SIGNALS:
                if sig in self._previous:
                    signal.signal(sig, self._previous.pop(sig))  # type: ignore[arg-type]
                else:
                    self._loop.remove_signal_handler(sig)

    def request(self, sig: int = signal.SIGTERM) -> None:
        log.info("%s received: %s", signal.Signals(sig).name, self._doing)
        self.signal = sig
        self.event.set()

    def exit_code(self, stopped: bool) -> int:
        """128 + the signal after a signal, 0 after another stop, 1 when reconnecting gave up."""
        if not stopped:
            return 1
        return 128 + self.signal if self.signal else 0
