"""The harness's SOCKS transports end to end: `python -m benchmarks --quick --only tcp-up,tcp-down,http-rate
--transports ssh-D,x2ssh-D` gives real samples through both proxies and rates x2ssh -D against ssh -D.

Checks the harness's correctness only (samples, CPU charged to the proxy, ratio rows), never a time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.lab import list_lab_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TRANSPORTS = ("ssh-D", "x2ssh-D")
SCENARIOS = ("tcp-up", "tcp-down", "http-rate")


@pytest.mark.skipif(shutil.which("proxychains4") is None, reason="needs proxychains4 (scripts/bootstrap.sh)")
def test_socks_transports_measure_through_both_proxies(tmp_path: Path) -> None:
    argv = [
        sys.executable, "-m", "benchmarks", "--quick", "--only", ",".join(SCENARIOS),
        "--transports", ",".join(TRANSPORTS), "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    (result,) = tmp_path.glob("bench-*.json")
    doc = json.loads(result.read_text())
    assert all(t["status"] == "ok" for t in doc["transports"]), doc["transports"]

    def values(metric: str, transport: str) -> list[float]:
        return [s["value"] for s in doc["samples"] if s["metric"] == metric and s["transport"] == transport]

    for sample in doc["samples"]:
        assert sample["error"] is None, sample
    for metric in ("tcp-up", "tcp-down", "http-rate", "tcp-down-cpu-client", "tcp-up-cpu-server"):
        for transport in TRANSPORTS:
            got = values(metric, transport)
            assert got and all(v is not None and v > 0 for v in got), (metric, transport, got)
    rated = {(r["metric"], r["subject"], r["baseline"]) for r in doc["ratios"]}
    assert {"tcp-up", "tcp-down", "http-rate"} <= {m for m, s, b in rated if (s, b) == ("x2ssh-D", "ssh-D")}
    assert not [ns for ns in list_lab_namespaces() if ns.startswith(f"x2l-{proc.pid}-")]
