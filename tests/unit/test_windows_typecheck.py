"""Static type check of the Windows backend for the win32 platform (mypy --platform win32), kept clean.

The code under x2ssh/host/windows cannot run here; mypy checks it against typeshed's Windows view of the
standard library (ctypes.WinDLL, WinError, get_last_error exist only there). The shared host modules a
Windows run uses (journal, lock, cleanup, the interfaces, the platform factory) and netstack's packet-port
adapter are checked the same way: a Linux-only name there (fcntl.flock, os.O_CLOEXEC, os.geteuid) fails it.
"""

from __future__ import annotations

import importlib.util
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
