"""StopRequest: a real signal sets the stop event and the exit code, with the loop's signal handlers and
with the `signal.signal` fallback used where the loop cannot watch signals (Windows)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from x2ssh.frontends.stop import STOP_SIGNALS, StopRequest


async def _stop_by(sig: int, stop: StopRequest) -> int:
    os.kill(os.getpid(), sig)
    await asyncio.wait_for(stop.event.wait(), 10)
    return stop.exit_code(stopped=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_sets_the_event_and_the_exit_code(sig):
    async def main() -> int:
        with StopRequest("testing") as stop:
            return await _stop_by(sig, stop)

    assert asyncio.run(main()) == 128 + sig


def test_without_loop_signal_support_the_fallback_handlers_stop_and_are_restored(monkeypatch):
    """Windows' loops raise NotImplementedError from add_signal_handler: the same signal must still stop
    the run, through a plain handler that schedules on the loop, and the old handlers come back after."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def unsupported(self, *args):
        raise NotImplementedError

    monkeypatch.setattr(asyncio.unix_events._UnixSelectorEventLoop, "add_signal_handler", unsupported)

    async def main() -> tuple[int, object]:
        with StopRequest("testing") as stop:
            installed = signal.getsignal(signal.SIGTERM)
            return await _stop_by(signal.SIGTERM, stop), installed

    code, installed = asyncio.run(main())
    assert code == 128 + signal.SIGTERM
    assert installed is not before[signal.SIGTERM]  # the fallback really was in place
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before
