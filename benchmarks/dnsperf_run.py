"""DNS at scale through `x2ssh --vpn` (issue 11): lookups per second with a real DNS load client.

Builds its own namespace lab (sshd, dnsmasq on the server answering `lab.test` through the target's),
then measures, in the same run:

1. baseline: Debian's `dnsperf` in the server namespace against the server's own resolver (127.0.0.1),
   i.e. what the resolver can do without any tunnel;
2. tunnel: the same `dnsperf` in the client namespace against the tunnel DNS address (`--vpn-dns remote`:
   through the agent to the same resolver), at the offered rate;
3. fresh sockets: a Python client in the client namespace that sends every lookup from a new UDP socket
   (as a stub resolver does), so every lookup is a new agent flow: this is what the agent's flow cap
   limited while DNS flows lived 10 s; now a DNS flow ends with its answer.

Prints a table and writes JSON (`--json PATH`). No pass/fail: numbers only (the tests own correctness).
Run under the shared lock:  flock /tmp/x2ssh-integration.lock .venv/bin/python -m benchmarks.dnsperf_run
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from benchmarks.lab import Lab
from benchmarks.services import DNS_ZONE, start_target_services
from tests.integration.vpn_runner import TUN_DNS_V4, VpnProcess, wait_until

QUERIES = (f"{DNS_ZONE} A", f"target.{DNS_ZONE} AAAA", f"target.{DNS_ZONE} A")

# One UDP socket per lookup, `rate` lookups per second for `seconds`; prints JSON with the outcome.
FRESH_SOCKETS = r"""
import json, os, select, socket, struct, sys, time
host, rate, seconds, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
names = [b"\x03lab\x04test\x00", b"\x06target\x03lab\x04test\x00"]
poller = select.epoll()
pending = {}  # fd -> (socket, sent_at)
latencies, failed, sent = [], 0, 0
start = time.monotonic()
total = int(rate * seconds)
while sent < total or pending:
    now = time.monotonic()
    while sent < total and start + sent / rate <= now:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        header = struct.pack("!HHHHHH", sent & 0xFFFF, 0x0100, 1, 0, 0, 0)
        query = header + names[sent % 2] + b"\x00\x01\x00\x01"
        s.sendto(query, (host, 53))
        pending[s.fileno()] = (s, now)
        poller.register(s.fileno(), select.EPOLLIN)
        sent += 1
    for fd, (s, at) in list(pending.items()):
        if now - at > timeout:
            failed += 1
            poller.unregister(fd); s.close(); del pending[fd]
    next_send = start + sent / rate if sent < total else now + 0.05
    for fd, _ in poller.poll(max(0.0, min(next_send - time.monotonic(), 0.05))):
        s, at = pending.pop(fd)
        try:
            s.recv(4096)
            latencies.append(time.monotonic() - at)
        except OSError:
            failed += 1
        poller.unregister(fd); s.close()
elapsed = time.monotonic() - start
latencies.sort()
p50 = latencies[len(latencies) // 2] if latencies else None
p99 = latencies[int(len(latencies) * 0.99)] if latencies else None
print(json.dumps({"sent": sent, "answered": len(latencies), "failed": failed, "elapsed": elapsed,
                  "p50_ms": p50 * 1000 if p50 else None, "p99_ms": p99 * 1000 if p99 else None}))
"""


def run_dnsperf(lab: Lab, ns: str, server: str, datafile: Path, qps: int, seconds: int, clients: int) -> dict:
    """dnsperf at `qps` for `seconds` from namespace `ns`: its summary, p50/p99 from its per-query lines."""
    argv = [
        "dnsperf", "-s", server, "-d", str(datafile), "-l", str(seconds), "-Q", str(qps),
        "-c", str(clients), "-q", "500", "-t", "2", "-v",
    ]  # fmt: skip
    done = lab.run(ns, argv, timeout=seconds + 60)
    out = done.stdout
    if done.returncode != 0:
        raise RuntimeError(f"dnsperf failed ({done.returncode}): {done.stderr.strip()}\n{out[-2000:]}")

    def number(label: str) -> float:
        match = re.search(rf"{label}:\s+([0-9.]+)", out)
        return float(match.group(1)) if match else float("nan")

    latencies = sorted(float(m.group(1)) for m in re.finditer(r"^> \S+ \S+ \S+ ([0-9.]+)$", out, re.M))
    return {
        "sent": int(number("Queries sent")),
        "completed": int(number("Queries completed")),
        "lost": int(number("Queries lost")),
        "qps": number("Queries per second"),
        "avg_ms": number(r"Average Latency \(s\)") * 1000,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else None,
    }


def fresh_socket_lookups(lab: Lab, server: str, rate: int, seconds: int) -> dict:
    argv = [sys.executable, "-c", FRESH_SOCKETS, server, str(rate), str(seconds), "2"]
    done = lab.run(lab.client, argv, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"fresh-socket client failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qps", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=20, help="dnsperf client sockets")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results: dict = {"offered_qps": args.qps, "seconds": args.seconds}
    with Lab() as lab:
        start_target_services(lab, big_file_size=1024 * 1024)
        sshd = lab.sshd()
        datafile = lab.workdir / "dnsperf-queries.txt"
        datafile.write_text("\n".join(QUERIES) + "\n")
        results["baseline"] = run_dnsperf(
            lab, lab.server, "127.0.0.1", datafile, args.qps, args.seconds, args.clients
        )
        vpn = VpnProcess(lab, sshd, "--vpn-dns", "remote")
        try:
            vpn.start()
            if not wait_until(lambda: "UDP agent up" in vpn.output, 30):
                raise RuntimeError(f"the agent did not come up{vpn.describe()}")
            time.sleep(1)
            results["tunnel"] = run_dnsperf(
                lab, lab.client, TUN_DNS_V4, datafile, args.qps, args.seconds, args.clients
            )
            results["fresh_sockets"] = fresh_socket_lookups(lab, TUN_DNS_V4, args.qps, args.seconds)
        finally:
            vpn.stop()
    print(f"DNS through x2ssh --vpn, offered {args.qps} queries/s for {args.seconds} s")
    print(f"{'run':<14} {'sent':>7} {'answered':>9} {'lost':>6} {'qps':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name in ("baseline", "tunnel"):
        r = results[name]
        print(
            f"{name:<14} {r['sent']:>7} {r['completed']:>9} {r['lost']:>6} {r['qps']:>8.0f} "
            f"{_ms(r['p50_ms'])} {_ms(r['p99_ms'])}"
        )
    f = results["fresh_sockets"]
    print(
        f"{'fresh sockets':<14} {f['sent']:>7} {f['answered']:>9} {f['failed']:>6} "
        f"{f['answered'] / f['elapsed']:>8.0f} {_ms(f['p50_ms'])} {_ms(f['p99_ms'])}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _ms(value: float | None) -> str:
    return f"{value:>8.2f}" if value is not None else f"{'-':>8}"


if __name__ == "__main__":
    sys.exit(main())
