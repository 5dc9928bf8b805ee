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


def _mypy(platform: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "mypy", "--platform", platform, "--python-version", "3.11", "--strict",
            "--follow-imports=silent", "--ignore-missing-imports", "--no-incremental", *CHECKED,
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip


def test_windows_backend_type_checks_clean_for_win32() -> None:
    result = _mypy("win32")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_the_platform_flag_matters() -> None:
    """Checked as Linux, the Windows-only ctypes names are missing: proof that the check above looks."""
    result = _mypy("linux")
    assert result.returncode == 1
    assert 'Module has no attribute "WinError"' in result.stdout


# ---- the agent: no POSIX-only call reachable on its Windows path ----------------------------------------
# The agent (stdlib only, runs on servers) is not typed to --strict, and its data path has type errors of
# its own on every platform. What matters here is the difference: an error that appears only when checked
# as win32 is a POSIX-only name (os.getuid, os.writev, socket.AF_UNIX...) reachable on Windows. Branches
# for one platform test `sys.platform` directly, which mypy understands.

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
AGENT_FILES = ("agent/agent_main.py", "agent/netio.py", "agent/protocol.py", "agent/zipapp.py")


def _platform_errors(root: Path, platform: str, files: tuple[str, ...]) -> set[str]:
    """mypy's errors for `files` checked as `platform`, without line numbers (so that sets compare)."""
    result = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--platform", platform, "--python-version", "3.11",
            "--follow-imports=silent", "--ignore-missing-imports", "--no-incremental", "--no-error-summary",
            *files,
        ],
        cwd=root, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return {_without_line(line) for line in result.stdout.splitlines() if ": error: " in line}


def _without_line(error: str) -> str:
    path, _, rest = error.partition(":")
    return path + ":" + rest.partition(":")[2]


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_the_proxy_mode_has_no_linux_only_call_on_other_platforms(platform: str) -> None:
    """`x2ssh -D` needs no root and no TUN: nothing on its import path may use a Linux-only name (pwd,
    setresuid, SIGHUP, AF_UNIX's SO_PEERCRED, os.getuid on Windows) without a `sys.platform` guard."""
    only_there = _platform_errors(ROOT, platform, PROXY_FILES) - _platform_errors(ROOT, "linux", PROXY_FILES)
    assert not only_there, "\n".join(sorted(only_there))


def test_the_proxy_check_catches_an_unguarded_linux_call(tmp_path: Path) -> None:
    """Drop the Windows guard of the proxy's control socket and the check above must fail on win32."""
    shutil.copytree(ROOT / "x2ssh", tmp_path / "x2ssh")
    proxy = tmp_path / "x2ssh" / "frontends" / "proxy.py"
    guarded = 'if sys.platform == "win32":\n            log.info("no control socket on Windows'
    text = proxy.read_text()
    assert text.count(guarded) == 1
    proxy.write_text(text.replace(guarded, 'if False:\n            log.info("no control socket on Windows'))
    linux = _platform_errors(tmp_path, "linux", PROXY_FILES)
    found = _platform_errors(tmp_path, "win32", PROXY_FILES) - linux
    assert any('has no attribute "getuid"' in line for line in found), found


# `x2ssh --vpn` on Windows: the VPN front end, the CLI that starts it, the sd_notify hook it calls and
# netstack. What they import besides is checked above (PROXY_FILES, CHECKED) or is the Windows backend.
VPN_FILES = ("x2ssh/frontends/vpn.py", "x2ssh/cli.py", "x2ssh/sd_notify.py", "netstack")


def test_the_vpn_mode_has_no_linux_only_call_on_windows() -> None:
    """Nothing on `x2ssh --vpn`'s own path may use a Linux-only name (os.getuid for the control socket's
    peers, AF_UNIX) without a `sys.platform` guard."""
    only_there = _platform_errors(ROOT, "win32", VPN_FILES) - _platform_errors(ROOT, "linux", VPN_FILES)
    assert not only_there, "\n".join(sorted(only_there))


def test_the_vpn_check_catches_an_unguarded_linux_call(tmp_path: Path) -> None:
    """Drop the Windows guard of the VPN's control socket and the check above must fail on win32."""
    for top in ("x2ssh", "netstack"):
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    vpn = tmp_path / "x2ssh" / "frontends" / "vpn.py"
    guarded = 'if sys.platform == "win32":  # AF_UNIX with SO_PEERCRED and uids'
    text = vpn.read_text()
    assert text.count(guarded) == 1
    vpn.write_text(text.replace(guarded, "if False:  # AF_UNIX with SO_PEERCRED and uids"))
    linux = _platform_errors(tmp_path, "linux", VPN_FILES)
    found = _platform_errors(tmp_path, "win32", VPN_FILES) - linux
    assert any('has no attribute "getuid"' in line for line in found), found


def _agent_errors(root: Path, platform: str) -> set[str]:
    result = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--platform", platform, "--python-version", "3.10",
            "--follow-imports=silent", "--ignore-missing-imports", "--no-incremental", "--no-error-summary",
            *AGENT_FILES,
        ],
        cwd=root, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 2: mypy itself failed
    return {line for line in result.stdout.splitlines() if ": error: " in line}


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
