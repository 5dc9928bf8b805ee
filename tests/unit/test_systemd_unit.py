"""contrib/systemd/x2ssh@.service: the settings the service relies on; systemd's own parser accepts it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "x2ssh@.service"


def unit_settings() -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (systemd allows repeated keys, so configparser does not fit)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_service_settings() -> None:
    service = unit_settings()["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]  # only x2ssh itself, not the helper or ssh children
    assert service["ExecStart"] == ["/usr/bin/env x2ssh --vpn --config /etc/x2ssh/%i.toml"]
    assert service["Restart"] == ["on-failure"]
    assert service["WatchdogSec"] == ["30"]
    assert service["KillMode"] == ["mixed"]  # SIGTERM to x2ssh first: its helper undoes before the rest dies
    assert service["SuccessExitStatus"] == ["143"]
    assert unit_settings()["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    shutil.copy(UNIT, tmp_path / UNIT.name)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "x2ssh@demo.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # "Failed to parse ..., ignoring" is only a warning for systemd: any output is a defect here
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
