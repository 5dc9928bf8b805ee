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


def add_cpu_arguments(parser: argparse.ArgumentParser) -> None:
    """`--cpus` and `--server-cpus`, for the harness and the profilers alike (see `use_cpu_arguments`)."""
    parser.add_argument(
        "--cpus",
        type=cpu_list,
        default=None,
        metavar="N[,..]",
        help="run the whole lab (clients, transports, sshd, servers) on these CPUs only, e.g. 1: one core "
        "makes request/response latency a measure of CPU per round trip, not of the scheduler's placement",
    )
    parser.add_argument(
        "--server-cpus",
        type=cpu_list,
        default=None,
        metavar="N[,..]",
        help="with --cpus: sshd and the target's services run on these CPUs instead, the clients and the "
        "transports' client processes on --cpus, as on two machines (a tunnel's server is not on the "
        "laptop), e.g. --cpus 1 --server-cpus 0",
    )


def check_cpu_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse `--server-cpus` without `--cpus` (the client side's CPUs)."""
    if args.server_cpus is not None and args.cpus is None:
        parser.error("--server-cpus needs --cpus (the client side's CPUs)")


def use_cpu_arguments(args: argparse.Namespace) -> None:
    """Move this process to `--cpus` before any lab exists, so everything it starts inherits them
    (`--server-cpus` is applied by `build_env`)."""
    if args.cpus is not None:
        os.sched_setaffinity(0, args.cpus)


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
