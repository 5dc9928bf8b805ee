"""The benchmark harness end to end (`python -m benchmarks --quick`) with the transports that need no x2ssh.

Checks the harness's correctness only (well-formed JSON, real samples, teardown), never a time threshold.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.lab import list_lab_namespaces

pytestmark = [pytest.mark.netns, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TRANSPORTS = ("direct", "ssh-L")


def _harness(out: Path, *args: str) -> subprocess.Popen:
    argv = [
        sys.executable,
        "-m",
        "benchmarks",
        "--quick",
        "--transports",
        ",".join(TRANSPORTS),
        "--out",
        str(out),
    ]
    return subprocess.Popen(
        [*argv, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # as from a terminal: a shell's background job (`cmd &`) passes SIGINT on ignored, and then Ctrl-C
        # could not reach the harness at all
        preexec_fn=_sigint_default,
    )  # fmt: skip


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _namespaces_of(pid: int) -> list[str]:
    return [ns for ns in list_lab_namespaces() if ns.startswith(f"x2l-{pid}-")]


def _result(out: Path) -> dict:
    files = list(out.glob("bench-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_quick_run_writes_well_formed_results(tmp_path: Path) -> None:
    proc = _harness(tmp_path)
    try:
        output, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    doc = _result(tmp_path)

    assert [t["name"] for t in doc["transports"]] == list(TRANSPORTS)
    assert all(t["status"] == "ok" for t in doc["transports"]), doc["transports"]
    machine = doc["machine"]
    assert machine["cores"] >= 1 and machine["kernel"] and machine["cpu_model"]
    for tool in ("python", "asyncssh", "openssh_client", "iperf3", "sshuttle"):
        assert machine["versions"][tool]

    metric_keys = {m["key"] for m in doc["metrics"]}
    assert {"tcp-up", "tcp-down", "tcp-8flows", "http-rate", "rr-p50", "loss-download"} <= metric_keys
    assert {"ab-rate", "ab-cpu-client", "nagle-p50", "scan-download-ratio"} <= metric_keys
    for sample in doc["samples"]:
        assert sample["metric"] in metric_keys
        assert sample["transport"] in TRANSPORTS
        assert sample["error"] is None, sample

    def values(metric: str, transport: str) -> list[float]:
        return [s["value"] for s in doc["samples"] if s["metric"] == metric and s["transport"] == transport]

    # Every TCP scenario produced a positive number through both transports ...
    for metric in (
        "tcp-up", "tcp-down", "tcp-8flows", "http-rate", "rr-p50", "rr-p99", "loss-download",
        "ab-rate", "ab-p50", "nagle-p50",
    ):  # fmt: skip
        for transport in TRANSPORTS:
            got = values(metric, transport)
            assert got and all(v is not None and v > 0 for v in got), (metric, transport, got)
    # ... CPU is charged to ssh-L's processes, and direct has none to charge ...
    assert all(v and v > 0 for v in values("tcp-down-cpu-client", "ssh-L"))
    assert values("tcp-down-cpu-client", "direct") == [None]
    assert all(v and v > 0 for v in values("ab-cpu-client", "ssh-L"))
    assert all(v and v > 0 for v in values("ab-cpu-sshd", "ssh-L") + values("ab-cpu-machine", "ssh-L"))
    # ... and the port scan needs a VPN: neither transport ran it.
    assert not values("scan-download-ratio", "ssh-L") and not values("scan-download-ratio", "direct")
    # ... UDP and DNS ran for direct only (ssh -L cannot carry UDP), and the DNS lookups got answers.
    assert values("dns-p50", "direct")[0] > 0
    assert not values("dns-p50", "ssh-L")
    assert [s["extra"]["failures"] for s in doc["samples"] if s["metric"] == "dns-p50"] == [0]

    ratios = doc["ratios"]
    assert (
        ratios
        and {r["subject"] for r in ratios} == {"ssh-L"}
        and {r["baseline"] for r in ratios} == {"direct"}
    )
    assert all(r["trusted"] is False for r in ratios)  # one repeat can never be trusted
    assert doc["chart"] or "matplotlib" in doc["chart_skipped"]
    assert not _namespaces_of(proc.pid)


def test_ctrl_c_tears_the_lab_down(tmp_path: Path) -> None:
    proc = _harness(tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not _namespaces_of(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _namespaces_of(proc.pid), "the harness never built its lab"
        time.sleep(3)  # let it get into the measurements
        os.kill(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output[-3000:]
    assert not _namespaces_of(proc.pid)
    assert _result(tmp_path)["interrupted"] is True
