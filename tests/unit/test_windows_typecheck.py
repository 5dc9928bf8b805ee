"""Static type check of the Windows backend for the win32 platform (mypy --platform win32), kept clean.

The code under x2ssh/host/windows cannot run here; mypy checks it against typeshed's Windows view of the
standard library (ctypes.WinDLL, WinError, get_last_error exist only there). The shared host modules a
Windows run uses (journal, lock, cleanup, the interfaces, the platform factory) and netstack's packet-port
adapter are checked the same way: a Linux-only name there (fcntl.flock, os.O_CLOEXEC, os.geteuid) fails it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED = (
    "x2ssh/host/windows",
    "x2ssh/host/journal.py",
    "x2ssh/host/lock.py",
    "x2ssh/host/cleanup.py",
    "x2ssh/host/api.py",
    "x2ssh/host/platform.py",
    "netstack/port.py",
    "netstack/aio.py",
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None,
    reason="mypy is not installed (pip install -e '.[test]' brings it)",
)


def _mypy(
    root: Path, platform: str, files: tuple[str, ...], *options: str
) -> subprocess.CompletedProcess[str]:
    """mypy on `files` (relative to `root`) as seen on `platform`; imports are followed but not reported."""
    return subprocess.run(
        [
            sys.executable, "-m", "mypy", "--platform", platform, "--follow-imports=silent",
            "--ignore-missing-imports", "--no-incremental", *options, *files,
        ],
        cwd=root, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip


def _platform_errors(root: Path, platform: str, files: tuple[str, ...], python: str = "3.11") -> set[str]:
    """mypy's errors for `files` checked as `platform`, without line numbers (so that sets compare)."""
    result = _mypy(root, platform, files, "--python-version", python, "--no-error-summary")
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 2: mypy itself failed
    return {_without_line(line) for line in result.stdout.splitlines() if ": error: " in line}


def _without_line(error: str) -> str:
    path, _, rest = error.partition(":")
    return path + ":" + rest.partition(":")[2]


def _strict(platform: str) -> subprocess.CompletedProcess[str]:
    return _mypy(ROOT, platform, CHECKED, "--python-version", "3.11", "--strict")


def test_windows_backend_type_checks_clean_for_win32() -> None:
    result = _strict("win32")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_the_platform_flag_matters() -> None:
    """Checked as Linux, the Windows-only ctypes names are missing: proof that the check above looks."""
    result = _strict("linux")
    assert result.returncode == 1
    assert 'Module has no attribute "WinError"' in result.stdout


# ---- the front ends: no Linux-only call reachable on Windows or macOS -------------------------------

PROXY_FILES = (  # `x2ssh -D` is meant to run wherever Python runs: its whole import path
    "x2ssh/cli.py",
    "x2ssh/settings.py",
    "x2ssh/session.py",
    "x2ssh/control.py",
    "x2ssh/status.py",
    "x2ssh/status_command.py",
    "x2ssh/status_report.py",
    "x2ssh/frontends/proxy.py",
    "x2ssh/frontends/stop.py",
    "x2ssh/frontends/socks.py",
    "x2ssh/frontends/socks_backend.py",
    "x2ssh/frontends/socks_protocol.py",
    "x2ssh/frontends/socks_udp.py",
    "x2ssh/host/privileges.py",
    "x2ssh/ssh",
    "x2ssh/flows",
    "x2ssh/agent_client",
)


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_the_proxy_mode_has_no_linux_only_call_on_other_platforms(platform: str) -> None:
    """`x2ssh -D` needs no root and no TUN: nothing on its import path may use a Linux-only name (pwd,
    setresuid, SIGHUP, AF_UNIX's SO_PEERCRED, os.getuid on Windows) without a `sys.platform` guard."""
    only_there = _platform_errors(ROOT, platform, PROXY_FILES) - _platform_errors(ROOT, "linux", PROXY_FILES)
    assert not only_there, "\n".join(sorted(only_there))


# `x2ssh --vpn` on Windows: the VPN front end, the CLI that starts it, the control socket and sd_notify hook
# it calls, and netstack. What they import besides is checked above (PROXY_FILES, CHECKED) or is the
# Windows backend. (mypy reports nothing in a module it only follows: what a check relies on is listed.)
VPN_FILES = ("x2ssh/frontends/vpn.py", "x2ssh/cli.py", "x2ssh/control.py", "x2ssh/sd_notify.py", "netstack")


def test_the_vpn_mode_has_no_linux_only_call_on_windows() -> None:
    """Nothing on `x2ssh --vpn`'s own path may use a Linux-only name (os.getuid for the control socket's
    peers, AF_UNIX) without a `sys.platform` guard."""
    only_there = _platform_errors(ROOT, "win32", VPN_FILES) - _platform_errors(ROOT, "linux", VPN_FILES)
    assert not only_there, "\n".join(sorted(only_there))


@pytest.mark.parametrize("files", [PROXY_FILES, VPN_FILES], ids=["proxy", "vpn"])
def test_the_checks_catch_an_unguarded_linux_call(tmp_path: Path, files: tuple[str, ...]) -> None:
    """Drop the Windows guard of the front ends' shared control socket start (os.getuid for its peers)
    and the proxy's and the VPN's checks above must both fail on win32."""
    for top in ("x2ssh", "netstack"):
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    control = tmp_path / "x2ssh" / "control.py"
    guarded = 'if sys.platform == "win32":  # no AF_UNIX with SO_PEERCRED'
    text = control.read_text()
    assert text.count(guarded) == 1
    control.write_text(text.replace(guarded, "if False:  # no AF_UNIX with SO_PEERCRED"))
    found = _platform_errors(tmp_path, "win32", files) - _platform_errors(tmp_path, "linux", files)
    assert any('control.py: error: Module has no attribute "getuid"' in line for line in found), found


# ---- the agent: no POSIX-only call reachable on its Windows path ----------------------------------------
# The agent (stdlib only, runs on servers) is not typed to --strict, and its data path has type errors of
# its own on every platform. What matters here is the difference: an error that appears only when checked
# as win32 is a POSIX-only name (os.getuid, os.writev, socket.AF_UNIX...) reachable on Windows. Branches
# for one platform test `sys.platform` directly, which mypy understands.
AGENT_FILES = ("agent/agent_main.py", "agent/netio.py", "agent/protocol.py", "agent/zipapp.py")


def _agent_errors(root: Path, platform: str) -> set[str]:
    return _platform_errors(root, platform, AGENT_FILES, python="3.10")  # servers run old Pythons


def test_agent_has_no_posix_only_call_on_its_windows_path() -> None:
    only_windows = _agent_errors(ROOT, "win32") - _agent_errors(ROOT, "linux")
    assert not only_windows, "\n".join(sorted(only_windows))


def test_the_agent_check_catches_an_unguarded_posix_call(tmp_path: Path) -> None:
    """Drop one `sys.platform` guard (the directory check's uid test) and the check above must fail."""
    shutil.copytree(ROOT / "agent", tmp_path / "agent")
    main = tmp_path / "agent" / "agent_main.py"
    guarded = 'if windows or sys.platform == "win32":'
    text = main.read_text()
    assert text.count(guarded) == 1
    main.write_text(text.replace(guarded, "if windows:"))
    only_windows = _agent_errors(tmp_path, "win32") - _agent_errors(tmp_path, "linux")
    assert any('has no attribute "getuid"' in line for line in only_windows), only_windows
