"""Console control events and the Administrator check on Windows, with the OS calls faked."""

from __future__ import annotations

import sys
import threading

import pytest

from x2ssh.errors import NotPrivileged
from x2ssh.host.windows import console as C


class Calls:
    def __init__(self) -> None:
        self.interrupts: list[str] = []
        self.cleanups = 0

    def interrupt(self, reason: str) -> None:
        self.interrupts.append(reason)

    def cleanup(self) -> None:
        self.cleanups += 1


@pytest.mark.parametrize(
    ("event", "reason"), [(C.CTRL_C_EVENT, "Ctrl-C"), (C.CTRL_BREAK_EVENT, "Ctrl-Break")]
)
def test_interrupts_stop_the_run_the_normal_way(event: int, reason: str) -> None:
    calls = Calls()
    d = C.CtrlDispatcher(calls.interrupt, calls.cleanup)
    assert d.handle(event) is True
    assert calls.interrupts == [reason] and calls.cleanups == 0


@pytest.mark.parametrize("event", [C.CTRL_CLOSE_EVENT, C.CTRL_LOGOFF_EVENT, C.CTRL_SHUTDOWN_EVENT])
def test_ending_events_clean_up_before_returning_and_only_once(event: int) -> None:
    calls = Calls()
    d = C.CtrlDispatcher(calls.interrupt, calls.cleanup)
    assert d.handle(event) is True
    assert d.handle(C.CTRL_CLOSE_EVENT) is True
    assert calls.cleanups == 1 and calls.interrupts == []


def test_without_an_interrupt_hook_ctrl_c_goes_on_to_python_and_ctrl_break_cleans_up_first() -> None:
    calls = Calls()
    d = C.CtrlDispatcher(None, calls.cleanup)
    assert d.handle(C.CTRL_C_EVENT) is False  # Python's handler: KeyboardInterrupt, the orderly tear-down
    assert calls.cleanups == 0
    assert d.handle(C.CTRL_BREAK_EVENT) is False  # the default handler ends the process: undone before
    assert calls.cleanups == 1
    assert d.handle(C.CTRL_CLOSE_EVENT) is True and calls.cleanups == 1


def test_unknown_event_goes_to_the_default_handler() -> None:
    calls = Calls()
    assert C.CtrlDispatcher(calls.interrupt, calls.cleanup).handle(99) is False


def test_failing_interrupt_falls_back_to_cleanup_and_failing_cleanup_does_not_raise() -> None:
    def boom(reason: str) -> None:
        raise RuntimeError("loop closed")

    def bad_cleanup() -> None:
        raise OSError(5, "access denied")

    d = C.CtrlDispatcher(boom, bad_cleanup)
    assert d.handle(C.CTRL_C_EVENT) is True  # nothing escapes into Windows' handler thread


def test_concurrent_events_clean_up_once() -> None:
    started, release = threading.Event(), threading.Event()
    count = []

    def slow_cleanup() -> None:
        count.append(1)
        started.set()
        release.wait(5)

    d = C.CtrlDispatcher(lambda r: None, slow_cleanup)
    t = threading.Thread(target=d.handle, args=(C.CTRL_CLOSE_EVENT,))
    t.start()
    started.wait(5)
    second = threading.Thread(target=d.handle, args=(C.CTRL_LOGOFF_EVENT,))
    second.start()
    release.set()
    t.join(5)
    second.join(5)
    assert count == [1]


def test_require_admin() -> None:
    C.require_admin(lambda: True)
    with pytest.raises(NotPrivileged, match="Run as administrator") as info:
        C.require_admin(lambda: False)
    assert info.value.exit_code == 77


@pytest.mark.skipif(sys.platform == "win32", reason="checks the refusal off Windows")
def test_install_is_refused_off_windows() -> None:
    with pytest.raises(OSError, match="only on Windows"):
        C.install(C.CtrlDispatcher(lambda r: None, lambda: None))
