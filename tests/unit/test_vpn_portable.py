"""x2ssh/frontends/vpn.py's platform guard: glibc's malloc_trim is looked up only on Linux (CDLL(None), the
process's own C library, does not exist on Windows); and sd_notify is silent on Windows. The control socket's
guard is x2ssh.control.start_control's (tests/unit/test_control.py). The static side (no unguarded Linux-only
name on the VPN's import path for win32) is tests/unit/test_windows_typecheck.py's VPN_FILES check."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from x2ssh.frontends import vpn


def test_malloc_trim_is_looked_up_only_on_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cdll(name: object) -> object:
        raise AssertionError(f"CDLL({name!r}) must not be loaded on this platform")

    monkeypatch.setattr(vpn.ctypes, "CDLL", no_cdll)
    for platform in ("win32", "darwin"):
        monkeypatch.setattr(vpn.sys, "platform", platform)
        assert vpn._find_malloc_trim() is None


def test_on_linux_release_free_memory_calls_glibcs_malloc_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    found = vpn._find_malloc_trim()
    libc_has_it = hasattr(ctypes.CDLL(None), "malloc_trim")
    assert (found is not None) == libc_has_it
    calls: list[int] = []
    monkeypatch.setattr(vpn, "_malloc_trim", lambda pad: calls.append(pad) or 1)
    vpn.release_free_memory()
    assert calls == [0]
    monkeypatch.setattr(vpn, "_malloc_trim", None)
    vpn.release_free_memory()  # musl, macOS, Windows: nothing to call, nothing raised


def test_sd_notify_sends_nothing_on_windows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The VPN calls the notifier at each step; on Windows there is no systemd and no AF_UNIX datagram
    socket, so a NOTIFY_SOCKET in the environment is not acted on."""
    import socket

    from x2ssh.sd_notify import Notifier

    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify"))
    receiver.setblocking(False)
    with receiver:
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert notifier.ready(), "a control: on Linux the datagram is sent"
        assert receiver.recv(100) == b"READY=1"
        monkeypatch.setattr("x2ssh.sd_notify.sys.platform", "win32")
        assert notifier.ready() is False
        with pytest.raises(BlockingIOError):
            receiver.recv(100)
        notifier.close()
