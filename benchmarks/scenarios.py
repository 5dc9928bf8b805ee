"""Benchmark scenarios: each measures one workload through one transport and returns metric values.

A scenario never asserts on time: it returns numbers (or raises `ScenarioError` saying what went wrong),
and the harness decides how to report them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.env import BenchEnv
from benchmarks.procstat import ResourceMeter, descendants, machine_busy_seconds
from benchmarks.transports import LOSS, SCALE, TCP, UDP, Endpoint, Transport

log = logging.getLogger(__name__)

CLIENTS_SCRIPT = Path(__file__).with_name("clients.py")
GB = 1e9


class ScenarioError(RuntimeError):
    """A measurement could not be taken (tool failed, transport broke); the message says why."""


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: str  # "higher" or "lower"


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one harness run (`quick()` for the smoke run, `full()` otherwise)."""

    repeats: int
    iperf_seconds: int
    http_seconds: float
    http_concurrency: int
    rr_count: int
    dns_count: int
    udp_rates: tuple[str, ...]
    udp_seconds: int
    scale_counts: tuple[int, ...]
    scale_hold: float
    download_size: int
    netem: str
    ab_seconds: float
    nagle_rounds: int
    scan_ports: int
    scan_parallel: int

    @classmethod
    def full(cls) -> Settings:
        return cls(
            repeats=3, iperf_seconds=8, http_seconds=5.0, http_concurrency=50, rr_count=2000, dns_count=1000,
            udp_rates=("50M", "200M"), udp_seconds=5, scale_counts=(1000, 10000), scale_hold=3.0,
            download_size=20 * 1024 * 1024, netem="delay 50ms loss 1%",
            ab_seconds=5.0, nagle_rounds=100, scan_ports=3000, scan_parallel=500,
        )  # fmt: skip

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            repeats=1, iperf_seconds=2, http_seconds=2.0, http_concurrency=50, rr_count=300, dns_count=200,
            udp_rates=("50M",), udp_seconds=2, scale_counts=(200,), scale_hold=1.0,
            download_size=2 * 1024 * 1024, netem="delay 50ms loss 1%",
            ab_seconds=2.0, nagle_rounds=20, scan_ports=1000, scan_parallel=200,
        )  # fmt: skip


Values = dict[str, tuple[float | None, dict[str, Any]]]


class Scenario:
    name: ClassVar[str]
    requires: ClassVar[str]
    description: ClassVar[str]

    def metrics(self, settings: Settings) -> list[Metric]:
        raise NotImplementedError

    def run(self, env: BenchEnv, transport: Transport, settings: Settings) -> Values:
        raise NotImplementedError


# -- helpers -----------------------------------------------------------------------------------------------


def _run_json(env: BenchEnv, ns: str, argv: list[str], timeout: float) -> dict:
    done = env.lab.run(ns, argv, timeout=timeout)
    try:
        data = json.loads(done.stdout) if done.stdout.strip() else {}
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{argv[0]}: unparsable output: {done.stdout[-300:]!r}") from exc
    if done.returncode != 0:
        reason = data.get("error") if isinstance(data, dict) else None
        raise ScenarioError(f"{Path(argv[0]).name} exited {done.returncode}: {reason or done.stderr[-500:]}")
    return data


def _client(env: BenchEnv, ep: Endpoint, args: list[str], timeout: float) -> dict:
    return _run_json(env, ep.ns, ep.argv([sys.executable, str(CLIENTS_SCRIPT), *args]), timeout)


def _iperf3(env: BenchEnv, ep: Endpoint, args: list[str], seconds: int) -> dict:
    argv = [
        "iperf3",
        "-c",
        ep.host,
        "-p",
        str(ep.port),
        "-t",
        str(seconds),
        "-J",
        "--connect-timeout",
        "5000",
    ]
    for attempt in (1, 2):
        try:
            return _run_json(env, ep.ns, ep.argv([*argv, *args]), timeout=seconds + 40)
        except ScenarioError as exc:
            if attempt == 2 or "busy" not in str(exc):
                raise
            log.warning("iperf3 server busy; restarting it")
            env.restart_iperf3()
    raise AssertionError("unreachable")


def _server_pids(env: BenchEnv) -> list[int]:
    return descendants(env.sshd.pid) if env.sshd.pid else []


@contextmanager
def _metered(env: BenchEnv, transport: Transport) -> Iterator[tuple[ResourceMeter, ResourceMeter] | None]:
    """CPU/RSS meters for the transport's client processes and sshd's sessions (None for `direct`)."""
    if not transport.client_pids():
        yield None
        return
    with ResourceMeter(transport.client_pids) as client, ResourceMeter(lambda: _server_pids(env)) as server:
        yield client, server


# -- scenarios ---------------------------------------------------------------------------------------------


class IperfTcp(Scenario):
    """iperf3 TCP throughput (Mbit/s) with CPU seconds per GB moved on the client and the server side."""

    requires = TCP

    def __init__(self, name: str, label: str, reverse: bool, flows: int) -> None:
        self.name = name
        self.label = label
        self.reverse = reverse
        self.flows = flows
        self.description = label

    def metrics(self, settings: Settings) -> list[Metric]:
        return [
            Metric(self.name, self.label, "Mbit/s", "higher"),
            Metric(f"{self.name}-cpu-client", f"{self.label}: client CPU", "s/GB", "lower"),
            Metric(f"{self.name}-cpu-server", f"{self.label}: server CPU", "s/GB", "lower"),
        ]

    def run(self, env: BenchEnv, transport: Transport, settings: Settings) -> Values:
        ep = transport.reach("iperf3")
        args = (["-R"] if self.reverse else []) + (["-P", str(self.flows)] if self.flows > 1 else [])
        with _metered(env, transport) as meters:
            data = _iperf3(env, ep, args, settings.iperf_seconds)
        received = data["end"]["sum_received"]
        moved_gb = received["bytes"] / GB
        extra = {
            "bytes": received["bytes"],
            "retransmits": data["end"].get("sum_sent", {}).get("retransmits"),
        }
        values: Values = {self.name: (received["bits_per_second"] / 1e6, extra)}
        client_cpu = server_cpu = None
        if meters is not None and moved_gb > 0:
            client_cpu = meters[0].cpu_seconds / moved_gb
            server_cpu = meters[1].cpu_seconds / moved_gb
        values[f"{self.name}-cpu-client"] = (client_cpu, {})
        values[f"{self.name}-cpu-server"] = (server_cpu, {})
        return values


class HttpRate(Scenario):
    name = "http-rate"
    requires = TCP
    description = "short HTTP requests (new connection each), 50 concurrent clients"

    def metrics(self, settings: Settings) -> list[Metric]:
        return [
            Metric("http-rate", f"HTTP requests/s, {settings.http_concurrency} clients", "req/s", "higher"),
            Metric("http-ttfb-p50", "HTTP time to first byte p50", "ms", "lower"),
            Metric("http-ttfb-p99", "HTTP time to first byte p99", "ms", "lower"),
        ]

    def run(self, env: BenchEnv, transport: Transport, settings: Settings) -> Values:
        ep = transport.reach("http")
        args = [
            "http-rate", "--host", ep.host, "--port", str(ep.port), "--path", "/1k.bin",
            "--concurrency", str(settings.http_concurrency), "--duration", str(settings.http_seconds),
        ]  # fmt: skip
        if ep.socks is not None:  # the client speaks SOCKS5 itself (no proxychains in between)
            args += ["--socks", f"{ep.socks[0]}:{ep.socks[1]}"]
            ep = replace(ep, wrapper=())
        data = _client(env, ep, args, timeout=settings.http_seconds + 60)
        if not data["requests"]:
            raise ScenarioError(f"no request succeeded: {data['first_errors']}")
        extra = {"requests": data["requests"], "errors": data["errors"], "first_errors": data["first_errors"]}
        return {
            "http-rate": (data["rate_per_s"], extra),
            "http-ttfb-p50": (data["ttfb_p50_ms"], {}),
            "http-ttfb-p99": (data["ttfb_p99_ms"], {}),
        }


class RequestResponse(Scenario):
    name = "rr-latency"
    requires = TCP
    description = "64-byte request/response over one open connection"

    def metrics(self, settings: Settings) -> list[Metric]:
        return [
            Metric("rr-p50", "request/response p50 (64 B, one connection)", "µs", "lower"),
            Metric("rr-p99", "request/response p99 (64 B, one connection)", "µs", "lower"),
        ]

    def run(self, env: BenchEnv, transport: Transport, settings: Settings) -> Values:
        ep = transport.reach("echo")
        args = ["rr", "--host", ep.host, "--port", str(ep.port), "--count", str(settings.rr_count)]
        data = _client(env, ep, args, timeout=120)
        return {"rr-p50": (data["p50_us"], {"count": data["count"]}), "rr-p99": (data["p99_us"], {})}


class LossyDownload(Scenario):
    name = "loss-download"
    requires = LOSS
    description = "download under netem delay/loss on the path's first link (both directions)"

    def metrics(self, settings: Settings) -> list[Metric]:
        size_mb = settings.download_size / (1024 * 1024)
        label = f"{size_mb:g} MiB download, netem {settings.netem} (each way)"
        return [Metric("loss-download", label, "s", "lower")]

    def run(self, env: BenchEnv, transport: Transport, settings: Settings) -> Values:
        ep = transport.reach("http")
        out = env.log_dir / f"download-{transport.name}.bin"
        url = f"http://{ep.host}:{ep.port}/{env.download_file}"
        links = transport.lossy_links()
        try:
            for link_ns, dev in links:
                env.lab.netem(link_ns, dev, settings.netem)
            done = env.lab.run(
                ep.ns,
                ["curl", "-sS", "--fail", "--max-time", "600", "-o", str(out), "-w", "%{time_total}", url],
                timeout=660,
            )
        finally:
            for link_ns, dev in links:
                env.lab.clear_netem(link_ns, dev)
        if done.returncode != 0:
            raise ScenarioError(f"curl exited {done.returncode}: {done.stderr.strip()[-300:]}")
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        out.unlink()
        if digest != env.download_sha256:
            raise ScenarioError("downloaded bytes differ from the served file")
        return {"loss-download": (float(done.stdout.strip()), {"bytes": env.download_size})}


class UdpRates(Scenario):
    name = "udp"
    requires = UDP
    description = "iperf3 -u at fixed offered rates (1200-byte datagrams)"

    def metrics(self, settings: Settings) -> list[Metric]:
        metrics = []
        for rate in settings.udp_rates:
            metrics += [
                Metric(f"udp-{rate}-loss", f"UDP offered {rate}bit/s: loss", "%", "lower"),
                Metric(f"udp-{rate}-recv", f"UDP offered {rate}bit/s: received", "Mbit/s", "higher"),
            ]
        return metrics

    def run(self, env: BenchEnv, transport: Transport, settings: Settings) -> Values:
        ep = transport.reach("iperf3")
        values: Values = {}
        for rate in settings.udp_rates:
            data = _iperf3(env, ep, ["-u", "-b", rate, "-l", "1200"], settings.udp_seconds)
            total = data["end"]["sum"]
            extra = {"packets": total.get("packets"), "lost": total.get("lost_packets")}
            values[f"udp-{rate}-loss"] = (total["lost_percent"], extra)
            received = data["end"].get("sum_received", total)
            values[f"udp-{rate}-recv"] = (received["bits_per_second"] / 1e6, {})
        return values


AGENT_MARK = b"agent.pyz"  # the agent runs as `python3 -I DIR/agent.pyz --dir DIR ...` under sshd


def _agent_pids(env: BenchEnv) -> list[int]:
    """The UDP agent's processes among sshd's descendants (empty for transports without one)."""
    found = []
    for pid in _server_pids(env):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if AGENT_MARK in cmdline:
            found.append(pid)
    return found


# Sends a datagram to a UDP echo service every 0.2 s until one comes back (exit 0) or time runs out (exit 1).
_UDP_PROBE = """
import socket, sys, time
host, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(0.2)
while time.monotonic() < deadline:
    sock.sendto(b"probe", (host, port))
    try:
        if sock.recv(64) == b"probe":
            sys.exit(0)
    except OSError:
        pass
sys.exit(1)
"""


def _wait_udp_path(env: BenchEnv, transport: Transport, timeout: float = 30.0) -> None:
    """Wait until UDP crosses the transport (x2ssh's agent starts after the VPN is up)."""
    ep = transport.reach("udp-echo")
    done = env.lab.run(ep.ns, [sys.executable, "-c", _UDP_PROBE, ep.host, str(ep.port), str(timeout)],
                       timeout=timeout + 10)  # fmt: skip
    if done.returncode != 0:
        raise ScenarioError(f"no UDP echo through {transport.name} within {timeout:g} s")


class UdpRate(Scenario):
    """iperf3 -u at high offered rates with 1,400-byte datagrams, both directions, with the CPU it costs.

    CPU is reported in percent of one core over the test: the transport's client processes (x2ssh), the
    UDP agent on the server, and the rest of sshd's session processes (encryption). The `direct` transport
    shows what the lab itself carries; port forwarding (`ssh -L`) has no UDP.
    """

    name = "udp-rate"
    requires = UDP
    description = "iperf3 -u, 1400-byte datagrams, 300/600/1000 Mbit/s offered, up and down"
    datagram = 1400
    socket_buffer = "2M"  # iperf3's own sockets: so its receiver's buffer is not what loses datagrams

    def __init__(self, rates_mbit: tuple[int, ...] = (300, 600, 1000)) -> None:
        self.rates_mbit = rates_mbit

    def _cases(self) -> list[tuple[str, int]]:
        return [(direction, rate) for direction in ("up", "down") for rate in self.rates_mbit]

    def metrics(self, settings: Settings) -> list[Metric]:
        metrics = []
        for direction, rate in self._cases():
            key = f"udp-rate-{direction}-{rate}"
            label = f"UDP {direction} {rate} Mbit/s offered ({self.datagram} B)"
            metrics += [
                Metric(f"{key}-recv", f"{label}: received", "Mbit/s", "higher"),
                Metric(f"{key}-loss", f"{label}: loss", "%", "lower"),
                Metric(f"{key}-cpu-client", f"{label}: client CPU", "% core", "lower"),
                Metric(f"{key}-cpu-agent", f"{label}: agent CPU", "% core", "lower"),
                Metric(f"{key}-cpu-sshd", f"{label}: sshd CPU", "% core", "lower"),
            ]
        return metrics

    def run(self, env: BenchEnv, transport: Transport, settings: Settings) -> Values:
        _wait_udp_path(env, transport)
        ep = transport.reach("iperf3")
        values: Values = {}
        metered = bool(transport.client_pids())
        for direction, rate in self._cases():
            key = f"udp-rate-{direction}-{rate}"
            args = ["-u", "-b", f"{rate}M", "-l", str(self.datagram), "-w", self.socket_buffer]
            args += ["-R"] if direction == "down" else []
            with (
                ResourceMeter(transport.client_pids) as client,
                ResourceMeter(lambda: _agent_pids(env)) as agent,
                ResourceMeter(lambda: _server_pids(env)) as server,
            ):
                started = time.monotonic()
                data = _iperf3(env, ep, args, settings.udp_seconds)
                elapsed = time.monotonic() - started
            total = data["end"]["sum"]
            received = data["end"].get("sum_received", total)
            extra = {"packets": total.get("packets"), "lost": total.get("lost_packets"), "args": args}
            values[f"{key}-recv"] = (received["bits_per_second"] / 1e6, extra)
            values[f"{key}-loss"] = (total["lost_percent"], {})
            if metered:
                agent_cpu = agent.cpu_seconds
                values[f"{key}-cpu-client"] = (client.cpu_seconds / elapsed * 100, {})
                values[f"{key}-cpu-agent"] = (agent_cpu / elapsed * 100, {})
                values[f"{key}-cpu-sshd"] = ((server.cpu_seconds - agent_cpu) / elapsed * 100, {})
            else:
                for suffix in ("cpu-client", "cpu-agent", "cpu-sshd"):
                    values[f"{key}-{suffix}"] = (None, {})
        return values


class DnsLatency(Scenario):
    name = "dns"
    requires = UDP
    description = "sequential A lookups of lab.test against the target's dnsmasq"

    def metrics(self, settings: Settings) -> list[Metric]:
        return [
            Metric("dns-p50", f"DNS lookup p50 ({settings.dns_count} lookups)", "ms", "lower"),
            Metric("dns-p99", f"DNS lookup p99 ({settings.dns_count} lookups)", "ms", "lower"),
        ]

    def run(self, env: BenchEnv, transport: Transport, settings: Settings) -> Values:
        ep = transport.reach("dns")
        data = _client(env, ep, ["dns", "--server", ep.host, "--count", str(settings.dns_count)], timeout=300)
        if not data["answered"]:
            raise ScenarioError(f"no DNS answer in {data['count']} lookups")
        extra = {"answered": data["answered"], "failures": data["failures"]}
        return {"dns-p50": (data["p50_ms"], extra), "dns-p99": (data["p99_ms"], {})}


class IdleFlows(Scenario):
    name = "scale"
    requires = SCALE
    description = "many idle TCP flows held open through the VPN: memory of the VPN process"

    def metrics(self, settings: Settings) -> list[Metric]:
        metrics = []
        for n in settings.scale_counts:
            metrics += [
                Metric(f"scale-{n}-opened", f"{n} idle flows: flows open", "flows", "higher"),
                Metric(f"scale-{n}-rss", f"{n} idle flows: peak RSS of transport", "MiB", "lower"),
                Metric(f"scale-{n}-per-flow", f"{n} idle flows: RSS growth per flow", "KiB", "lower"),
            ]
        return metrics

    def run(self, env: BenchEnv, transport: Transport, settings: Settings) -> Values:
        ep = transport.reach("echo")
        values: Values = {}
        for n in settings.scale_counts:
            with ResourceMeter(transport.client_pids) as meter:
                before = meter.peak_rss_kib
                args = ["idle-flows", "--host", ep.host, "--port", str(ep.port), "--count", str(n)]
                args += ["--hold", str(settings.scale_hold)]
                data = _client(env, ep, args, timeout=600)
            opened = data["opened"]
            growth = (meter.peak_rss_kib - before) / opened if opened else None
            extra = {"failed": data["failed"], "first_errors": data["first_errors"], "open_s": data["open_s"]}
            values[f"scale-{n}-opened"] = (float(opened), extra)
            values[f"scale-{n}-rss"] = (meter.peak_rss_kib / 1024, {"rss_before_kib": before})
            values[f"scale-{n}-per-flow"] = (growth, {})
        return values


_AB_FIELDS = {
    "complete": re.compile(r"^Complete requests:\s+(\d+)", re.M),
    "failed": re.compile(r"^Failed requests:\s+(\d+)", re.M),
    "rate": re.compile(r"^Requests per second:\s+([\d.]+)", re.M),
    "p50": re.compile(r"^\s+50%\s+(\d+)", re.M),
    "p99": re.compile(r"^\s+99%\s+(\d+)", re.M),
    # Connection Times table: min mean [+/-sd] median max; "Waiting" is the time to the first byte.
    "wait_median": re.compile(r"^Waiting:\s+\d+\s+\d+\s+[\d.]+\s+(\d+)", re.M),
}


def parse_ab(output: str) -> dict[str, float]:
    """The figures the harness uses from ApacheBench's report (ms for times); KeyError when one is missing."""
    found = {}
    for key, regex in _AB_FIELDS.items():
        match = regex.search(output)
        if match is None:
            raise KeyError(f"ApacheBench output has no {key!r} line")
        found[key] = float(match.group(1))
    return found


class ApacheBenchRate(Scenario):
    """New-connection HTTP rate measured with a C client (ab), plus the transport's CPU per connection."""

    name = "ab-rate"
    requires = TCP
    description = "ApacheBench: 1 KiB answers, one connection per request, 50 concurrent"

    def metrics(self, settings: Settings) -> list[Metric]:
        c = settings.http_concurrency
        return [
            Metric("ab-rate", f"ab -c {c}, new connection per 1 KiB request", "req/s", "higher"),
            Metric("ab-p50", f"ab -c {c}: request time p50", "ms", "lower"),
            Metric("ab-wait-p50", f"ab -c {c}: time to first byte, median", "ms", "lower"),
            Metric("ab-cpu-client", f"ab -c {c}: transport CPU per connection", "µs", "lower"),
            Metric("ab-cpu-sshd", f"ab -c {c}: sshd CPU per connection", "µs", "lower"),
            Metric("ab-cpu-machine", f"ab -c {c}: whole machine's CPU per connection", "µs", "lower"),
        ]

    def run(self, env: BenchEnv, transport: Transport, settings: Settings) -> Values:
        ep = transport.reach("http")
        if ep.socks is not None:
            raise ScenarioError("ab cannot speak SOCKS (and through proxychains it measures its stalls)")
        netloc = f"[{ep.host}]" if ":" in ep.host else ep.host
        argv = [
            "ab", "-q", "-r", "-s", "10", "-c", str(settings.http_concurrency),
            "-t", str(settings.ab_seconds), "-n", "10000000", f"http://{netloc}:{ep.port}/1k.bin",
        ]  # fmt: skip
        busy = machine_busy_seconds()
        with _metered(env, transport) as meters:
            done = env.lab.run(ep.ns, ep.argv(argv), timeout=settings.ab_seconds + 60)
        busy = machine_busy_seconds() - busy  # ab, web server, sshd, transport, kernel
        if done.returncode != 0:
            raise ScenarioError(f"ab exited {done.returncode}: {(done.stderr or done.stdout)[-400:]}")
        ab = parse_ab(done.stdout)
        if not ab["complete"]:
            raise ScenarioError("ab completed no request")
        per_conn = 1e6 / ab["complete"]
        cpu = None if meters is None else meters[0].cpu_seconds * per_conn
        sshd = None if meters is None else meters[1].cpu_seconds * per_conn
        extra = {"complete": ab["complete"], "failed": ab["failed"], "p99_ms": ab["p99"]}
        return {
            "ab-rate": (ab["rate"], extra),
            "ab-p50": (ab["p50"], {}),
            "ab-wait-p50": (ab["wait_median"], {}),
            "ab-cpu-client": (cpu, {}),
            "ab-cpu-sshd": (sshd, {}),
            "ab-cpu-machine": (busy * per_conn, {}),
        }


class NaglePattern(Scenario):
    """write, write, read with Nagle on: exposes a peer that delays its ACKs."""

    name = "nagle"
    requires = TCP
    description = "HTTP keep-alive requests sent as two writes with Nagle on, then read the answer"

    def metrics(self, settings: Settings) -> list[Metric]:
        return [
            Metric("nagle-p50", "write, write, read with Nagle on: round p50", "ms", "lower"),
            Metric("nagle-p99", "write, write, read with Nagle on: round p99", "ms", "lower"),
        ]

    def run(self, env: BenchEnv, transport: Transport, settings: Settings) -> Values:
        ep = transport.reach("http")
        args = ["nagle", "--host", ep.host, "--port", str(ep.port), "--rounds", str(settings.nagle_rounds)]
        data = _client(env, ep, args, timeout=settings.nagle_rounds * 1.0 + 60)
        return {"nagle-p50": (data["p50_ms"], {"rounds": data["rounds"]}), "nagle-p99": (data["p99_ms"], {})}


SCAN_FIRST_PORT = 20000  # nothing listens on the target from here on


class PortScanDuringDownload(Scenario):
    """A download's throughput alone and while a port scan of closed ports runs through the same VPN."""

    name = "port-scan"
    requires = SCALE
    description = "iperf3 download alone, then alongside a scan of closed ports (many SYNs, all refused)"

    def metrics(self, settings: Settings) -> list[Metric]:
        n = settings.scan_ports
        return [
            Metric("scan-download-alone", "download without a scan", "Mbit/s", "higher"),
            Metric("scan-download-with", f"download during a scan of {n} closed ports", "Mbit/s", "higher"),
            Metric("scan-download-ratio", "download during the scan / without", "ratio", "higher"),
            Metric("scan-refused-rate", "scan: closed ports refused per second", "1/s", "higher"),
            Metric(
                "scan-unanswered", "scan: attempts that timed out or failed otherwise", "attempts", "lower"
            ),
            Metric("scan-rss", "scan: peak RSS of the transport", "MiB", "lower"),
        ]

    def run(self, env: BenchEnv, transport: Transport, settings: Settings) -> Values:
        ep = transport.reach("iperf3")
        target = transport.reach("http")
        alone = _iperf3(env, ep, ["-R"], settings.iperf_seconds)["end"]["sum_received"]["bits_per_second"]
        scan_seconds = settings.iperf_seconds + 2
        scan_argv = [
            sys.executable, str(CLIENTS_SCRIPT), "port-scan", "--host", target.host,
            "--first-port", str(SCAN_FIRST_PORT), "--ports", str(settings.scan_ports),
            "--parallel", str(settings.scan_parallel), "--duration", str(scan_seconds),
        ]  # fmt: skip
        with ResourceMeter(transport.client_pids) as meter:
            scan = env.lab.popen(ep.ns, scan_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                with_scan = _iperf3(env, ep, ["-R"], settings.iperf_seconds)
            finally:
                out, err = scan.communicate(timeout=scan_seconds + 60)
        if scan.returncode != 0:
            raise ScenarioError(f"port scan exited {scan.returncode}: {err[-400:]}")
        result = json.loads(out)
        during = with_scan["end"]["sum_received"]["bits_per_second"]
        unanswered = result["timeout"] + result["other"]
        extra = {k: result[k] for k in ("refused", "connected", "timeout", "other", "attempts")}
        return {
            "scan-download-alone": (alone / 1e6, {}),
            "scan-download-with": (during / 1e6, extra),
            "scan-download-ratio": (during / alone if alone else None, {}),
            "scan-refused-rate": (result["refused"] / result["elapsed_s"], {}),
            "scan-unanswered": (float(unanswered), {}),
            "scan-rss": (meter.peak_rss_kib / 1024, {}),
        }


def all_scenarios() -> list[Scenario]:
    """Every scenario, in the order the harness runs them."""
    return [
        IperfTcp("tcp-up", "TCP 1 flow upload", reverse=False, flows=1),
        IperfTcp("tcp-down", "TCP 1 flow download", reverse=True, flows=1),
        IperfTcp("tcp-8flows", "TCP 8 flows download", reverse=True, flows=8),
        HttpRate(),
        ApacheBenchRate(),
        RequestResponse(),
        NaglePattern(),
        LossyDownload(),
        UdpRates(),
        UdpRate(),
        DnsLatency(),
        IdleFlows(),
        PortScanDuringDownload(),
    ]
