"""netstack alone: kernel TCP -> TUN -> netstack -> Python sink, beside the kernel's veth path (as root).

`python -m benchmarks.netstack_bench [--repeats 3] [--bytes N] [--idle 10000] [--mtu 65535]`

Both paths use the same client (benchmarks.netstack_tun client) and a Python sink; runs are interleaved so
noise hits both alike. Reports Gbit/s (median and spread) for 1 and 8 flows, the ratio netstack/veth, and
the peak RSS of the netstack process holding N idle flows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.table import Table

TOP = Path(__file__).resolve().parent.parent
MODULE = [sys.executable, "-m", "benchmarks.netstack_tun"]


def _ns(name: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


class Namespaces:
    """`tun` runs the netstack and its client; `a`/`b` are joined by a veth for the baseline."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.tun, self.a, self.b = f"x2b-{tag}-tun", f"x2b-{tag}-a", f"x2b-{tag}-b"

    def __enter__(self) -> Namespaces:
        for ns in (self.tun, self.a, self.b):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", "x2b-va", "netns", self.a, "type", "veth", "peer", "x2b-vb", "netns", self.b)
        _ip("-n", self.a, "addr", "add", "198.18.77.1/24", "dev", "x2b-va")
        _ip("-n", self.b, "addr", "add", "198.18.77.2/24", "dev", "x2b-vb")
        _ip("-n", self.a, "link", "set", "x2b-va", "up")
        _ip("-n", self.b, "link", "set", "x2b-vb", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.tun, self.a, self.b):
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], check=False)


def _start(argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=TOP)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        proc.kill()
        raise RuntimeError(f"server did not start: {argv}")
    return proc


def _stop(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(input="", timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def _client(ns: str, host: str, nbytes: int, flows: int) -> float:
    argv = _ns(ns, *MODULE, "client", host, "5001", "--bytes", str(nbytes // flows), "--flows", str(flows))
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600, cwd=TOP)
    return json.loads(done.stdout)["gbit_s"]


def _idle_rss(ns: str, flows: int, mtu: int) -> dict:
    server = _start(_ns(ns, *MODULE, "serve", "--mode", "hold", "--mtu", str(mtu)))
    holder = subprocess.Popen(
        _ns(ns, *MODULE, "hold", "198.19.99.7", "5001", "--flows", str(flows)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=TOP,
    )
    assert holder.stdout is not None
    opened = json.loads(holder.stdout.readline())["open"]
    time.sleep(1)
    pid = int(
        subprocess.run(
            ["pgrep", "-f", "netstack_tun serve --mode hold"], capture_output=True, text=True
        ).stdout.split()[0]
    )
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss_kib = int(next(line for line in status if line.startswith("VmRSS:")).split()[1])
    holder.communicate(input="\n", timeout=120)
    report = _stop(server)
    return {"flows": opened, "rss_mib": rss_kib / 1024, "peak_rss_mib": report["peak_rss_kib"] / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.netstack_bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=2_000_000_000)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--mtu", type=int, default=65535)
    parser.add_argument("--out", type=Path, default=TOP / "benchmarks" / "results" / "netstack.json")
    args = parser.parse_args(argv)
    console = Console()
    samples: dict[str, list[float]] = {}
    with Namespaces() as ns:
        tun_server = _start(_ns(ns.tun, *MODULE, "serve", "--mode", "sink", "--mtu", str(args.mtu)))
        veth_server = _start(_ns(ns.b, *MODULE, "serve-socket", "--port", "5001"))
        try:
            for repeat in range(args.repeats):
                order = [("netstack", ns.tun, "198.19.99.7"), ("veth", ns.a, "198.18.77.2")]
                if repeat % 2:
                    order.reverse()
                for flows in (1, 8):
                    for name, where, host in order:
                        gbit = _client(where, host, args.bytes, flows)
                        samples.setdefault(f"{name} {flows} flow(s)", []).append(gbit)
                        console.print(f"repeat {repeat + 1}: {name:8} {flows} flow(s): {gbit:6.2f} Gbit/s")
        finally:
            _stop(tun_server)
            _stop(veth_server)
        idle = _idle_rss(ns.tun, args.idle, args.mtu) if args.idle else None
    table = Table(title=f"netstack vs veth (MTU {args.mtu}, {args.bytes / 1e9:.1f} GB per run)")
    for col in ("path", "median Gbit/s", "spread", "ratio to veth"):
        table.add_column(col)
    for flows in (1, 8):
        veth = statistics.median(samples[f"veth {flows} flow(s)"])
        for name in ("netstack", "veth"):
            values = samples[f"{name} {flows} flow(s)"]
            med = statistics.median(values)
            spread = (max(values) - min(values)) / med if med else 0.0
            table.add_row(f"{name}, {flows} flow(s)", f"{med:.2f}", f"{spread:.0%}", f"{med / veth:.2f}x")
    console.print(table)
    if idle:
        console.print(
            f"{idle['flows']} idle flows: netstack process RSS {idle['rss_mib']:.1f} MiB "
            f"(peak {idle['peak_rss_mib']:.1f} MiB)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"mtu": args.mtu, "samples": samples, "idle": idle}, indent=2))
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
