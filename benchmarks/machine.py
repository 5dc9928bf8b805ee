"""What the benchmark ran on: CPU, cores, kernel and the versions of every tool involved."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from benchmarks.sshd import sshd_version


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc.__class__.__name__})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_list(text: str) -> set[int]:
    """An argparse type: "0,1" -> {0, 1}, each CPU one this process may run on."""
    try:
        cpus = {int(item) for item in text.split(",") if item.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of CPU numbers: {text!r}") from None
    available = os.sched_getaffinity(0)
    if not cpus or not cpus <= available:
        raise argparse.ArgumentTypeError(f"CPUs {sorted(cpus)} not all available (have {sorted(available)})")
    return cpus


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    """A JSON-ready description of this machine and the tool versions."""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cpus_used": sorted(os.sched_getaffinity(0)),  # `--cpus`: every lab process inherits this set
        "kernel": platform.release(),
        "platform": platform.platform(),
        "versions": {
            "python": sys.version.split()[0],
            "asyncssh": _package_version("asyncssh"),
            "x2ssh": _package_version("x2ssh"),
            "openssh_client": _first_line(["ssh", "-V"]),
            "openssh_server": sshd_version(),
            "iperf3": _first_line(["iperf3", "--version"]),
            "sshuttle": _first_line(["sshuttle", "--version"]),
            "curl": _first_line(["curl", "--version"]),
            "dnsmasq": _first_line(["dnsmasq", "--version"]),
        },
    }
