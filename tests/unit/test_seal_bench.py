"""`python -m benchmarks.seal_bench` runs against this checkout and prints its two figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_seal_bench_times_the_seal_and_the_cipher() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.seal_bench", "--reads", "3", "--repeats", "1"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2], check=True,
    )  # fmt: skip
    found = re.search(r"sealed ([\d.]+) µs, cipher alone ([\d.]+) µs", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) > 0 and float(found.group(2)) > 0
