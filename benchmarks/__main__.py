"""`python -m benchmarks`: x2ssh against its peers, same machine, same run (needs root; uses namespaces).

Builds a namespace lab (client -- server with a real sshd -- target with services), runs every scenario
through each transport, prints a table of absolute figures and ratios, and writes JSON (every sample, the
machine, versions) and a PNG chart (when matplotlib is installed) to --out.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from benchmarks.machine import add_cpu_arguments, check_cpu_arguments, use_cpu_arguments
from benchmarks.runner import BenchmarkRun
from benchmarks.scenarios import Settings, all_scenarios
from benchmarks.transports import ALL_TRANSPORTS

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    scenario_names = [s.name for s in all_scenarios()]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run: 1 repeat, short, small")
    parser.add_argument(
        "--only", type=_csv, default=None, metavar="SCENARIO[,..]", help=f"from: {', '.join(scenario_names)}"
    )
    parser.add_argument(
        "--transports",
        type=_csv,
        default=list(ALL_TRANSPORTS),
        metavar="NAME[,..]",
        help=f"from: {', '.join(ALL_TRANSPORTS)} (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="override the number of repeats")
    add_cpu_arguments(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory [{DEFAULT_OUT}]")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    unknown = [n for n in args.transports if n not in ALL_TRANSPORTS]
    if unknown:
        parser.error(f"unknown transport(s) {unknown}; choose from {list(ALL_TRANSPORTS)}")
    if args.only:
        unknown = [n for n in args.only if n not in scenario_names]
        if unknown:
            parser.error(f"unknown scenario(s) {unknown}; choose from {scenario_names}")
    check_cpu_arguments(parser, args)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped/logged output: don't wrap the tables at 80 columns
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    if os.geteuid() != 0:
        console.print("[red]the benchmark needs root (it builds network namespaces)[/red]")
        return 2
    use_cpu_arguments(args)
    settings = Settings.quick() if args.quick else Settings.full()
    if args.repeats is not None:
        settings = Settings(**{**settings.__dict__, "repeats": args.repeats})
    scenarios = [s for s in all_scenarios() if args.only is None or s.name in args.only]
    command = ["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)]
    run = BenchmarkRun(scenarios, args.transports, settings, args.out, console, command, args.server_cpus)
    try:
        run.execute()
    except (KeyboardInterrupt, SystemExit):
        run.interrupted = True
        console.print("[yellow]interrupted: lab torn down; writing partial results[/yellow]")
        run.finish()
        return 130
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
