"""How a front end's run ends: SIGINT, SIGTERM and SIGHUP (a closed terminal) all stop it in order."""

from __future__ import annotations

import asyncio
import logging
import signal
from types import TracebackType

log = logging.getLogger("x2ssh")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    """`with StopRequest("restoring routes and DNS") as stop:` inside the event loop; `stop.event` is set by
    a stop signal or by `request()` (e.g. `x2ssh down`); `exit_code()` is what the process returns."""

    def __init__(self, doing: str) -> None:
        self.event = asyncio.Event()
        self.signal = 0
        self._doing = doing
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> StopRequest:
        self._loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            self._loop.add_signal_handler(sig, self.request, sig)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._loop is not None:
            for sig in STOP_SIGNALS:
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
