"""Profile x2ssh's per-connection path: ApacheBench through `x2ssh --vpn` while py-spy samples the data plane.

    python -m benchmarks.profile_connect [--seconds 8] [--native] [--out DIR]

Builds the namespace lab, starts x2ssh (the harness's `x2ssh` transport), runs `ab -c 50` with one
connection per 1 KiB request, and records the busiest x2ssh process with py-spy (raw collapsed stacks).
Prints the top functions by own time and by inclusive time, as shares of all samples. Needs root and
py-spy; not a benchmark (no baseline), a tool to see where the time goes.

`--compare TREE` runs this checkout and another one alternately in one lab and prints, per connection, the
data plane's user and system CPU and the packets through the TUN each way (the device's counters: every
packet costs x2ssh a system call, and one written to the apps the kernel's delivery as well).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from benchmarks.env import BenchEnv, build_env
from benchmarks.lab import Lab, cleanup_stale
from benchmarks.procstat import ResourceMeter
from benchmarks.scenarios import parse_ab
from benchmarks.transports import REPO_ROOT, X2ssh
from x2ssh.settings import DEFAULT_TUN


class _X2sshFromTree(X2ssh):
    """The harness's x2ssh run from another checkout `tree` (same venv, same native module)."""

    tree = ""

    def start(self, env: BenchEnv) -> None:
        self.env = env
        sshd = env.sshd
        argv = [
            sys.executable, "-m", "x2ssh", "--vpn", "-F", str(sshd.ssh_config), "-i", str(sshd.client_key),
            "-p", str(sshd.port), "--vpn-dns", "off", sshd.destination,
        ]  # fmt: skip
        self._spawn_watched(argv, r"VPN up", cwd=self.tree)  # `-m` puts the working directory first


def compare(tree: Path, rounds: int, seconds: float, concurrency: int, out: Path) -> int:
    """CPU per connection of this checkout and of `tree`, alternating in one lab (same load, same time)."""
    cleanup_stale()
    figures: dict[str, list[tuple[float, float, float, float, float]]] = {"this": [], "other": []}
    with Lab() as lab:
        env = build_env(lab, out / "logs", 1024 * 1024)
        for _ in range(rounds):
            for name in ("this", "other"):
                transport = X2ssh() if name == "this" else _X2sshFromTree()
                transport.tree = str(tree)  # type: ignore[attr-defined]
                transport.start(env)
                try:
                    ep = transport.reach("http")
                    url = f"http://{ep.host}:{ep.port}/1k.bin"
                    lab.run(ep.ns, ["ab", "-q", "-c", "10", "-n", "2000", url], timeout=60)
                    pids = transport.client_pids()
                    before = [_times(pid) for pid in pids]
                    packets_before = _tun_packets(lab)
                    argv = ["ab", "-q", "-r", "-c", str(concurrency), "-t", str(seconds), "-n", "10000000"]
                    ab = parse_ab(lab.run(ep.ns, [*argv, url], timeout=seconds + 60).stdout)
                    packets_after = _tun_packets(lab)
                    after = [_times(pid) for pid in pids]
                finally:
                    transport.stop()
                n = ab["complete"]
                user = sum(a[0] - b[0] for a, b in zip(after, before, strict=True)) / n * 1e6
                system = sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) / n * 1e6
                to_x2ssh, to_apps = ((a - b) / n for a, b in zip(packets_after, packets_before, strict=True))
                figures[name].append((ab["rate"], user, system, to_x2ssh, to_apps))
                print(
                    f"{name}: {ab['rate']:.0f} req/s: user {user:.1f} µs, system {system:.1f} µs, "
                    f"TUN packets per connection {to_x2ssh:.2f} in, {to_apps:.2f} out"
                )
    for name, rows in figures.items():
        rates, users, systems, ins, outs = (sorted(col) for col in zip(*rows, strict=True))
        mid = len(rows) // 2
        print(
            f"median {name}: {rates[mid]:.0f} req/s, user {users[mid]:.1f} µs, system {systems[mid]:.1f} µs, "
            f"TUN packets per connection {ins[mid]:.2f} in, {outs[mid]:.2f} out"
        )
    return 0


class _X2sshUnderCProfile(X2ssh):
    """The harness's x2ssh, run by benchmarks.cprofile_x2ssh (stats written to `out` at exit) from checkout
    `tree` (this one by default)."""

    out = ""
    tree = str(REPO_ROOT)

    def start(self, env: BenchEnv) -> None:
        self.env = env
        sshd = env.sshd
        argv = [
            sys.executable, "-m", "benchmarks.cprofile_x2ssh", self.out, "--vpn", "-F", str(sshd.ssh_config),
            "-i", str(sshd.client_key), "-p", str(sshd.port), "--vpn-dns", "off", sshd.destination,
        ]  # fmt: skip
        self._spawn_watched(argv, r"VPN up", cwd=self.tree)


def _times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of `pid` so far ((-1, -1) when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1.0, -1.0
    hz = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / hz, int(fields[12]) / hz


def _tun_packets(lab: Lab) -> tuple[int, int]:
    """Packets the apps sent into x2ssh's TUN and packets x2ssh wrote to them, so far (the device's counters:
    the kernel transmits what the apps send, and receives what x2ssh writes)."""
    counters = []
    for name in ("tx_packets", "rx_packets"):
        path = f"/sys/class/net/{DEFAULT_TUN}/statistics/{name}"
        counters.append(int(lab.run(lab.client, ["cat", path]).stdout))
    return counters[0], counters[1]


def _busiest(pids: list[int]) -> int:
    return max(pids, key=lambda pid: sum(_times(pid)))


def summarize(raw: Path, top: int) -> str:
    """Top entries (own and inclusive time) of py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    lines = [f"{total} samples", "own time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("inclusive time:")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in incl.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_connect", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--cprofile", action="store_true", help="cProfile on CPU time instead of py-spy")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "x2ssh-profile")
    parser.add_argument("--compare", type=Path, default=None, metavar="TREE", help="A/B CPU per connection")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.compare is not None:
        return compare(args.compare, args.rounds, args.seconds, args.concurrency, args.out)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "connect.raw"
    cleanup_stale()
    with Lab() as lab:
        env = build_env(lab, args.out / "logs", 1024 * 1024)
        transport = _X2sshUnderCProfile() if args.cprofile else X2ssh()
        stats = args.out / "connect.pstats"
        transport.out = str(stats)  # type: ignore[attr-defined]
        transport.start(env)
        try:
            ep = transport.reach("http")
            url = f"http://{ep.host}:{ep.port}/1k.bin"
            lab.run(ep.ns, ["ab", "-q", "-c", "10", "-n", "2000", url], timeout=60)  # warm up
            pid = _busiest(transport.client_pids())
            record = (
                ["true"]
                if args.cprofile
                else [spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)), "-r", "500"]
            )
            if not args.cprofile:
                record += ["-f", "raw", "-o", str(raw), "--nonblocking"]
            if args.native and not args.cprofile:
                record.append("--native")
            spy_proc = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            out: dict[str, str] = {}

            def bench() -> None:
                argv = ["ab", "-q", "-r", "-c", str(args.concurrency), "-t", str(args.seconds)]
                argv += ["-n", "10000000"]
                out["ab"] = lab.run(ep.ns, [*argv, url], timeout=args.seconds + 60).stdout

            before = _times(pid)
            with ResourceMeter(transport.client_pids) as meter:
                worker = threading.Thread(target=bench)
                worker.start()
                worker.join()
            after = _times(pid)
            spy_proc.wait(timeout=120)
            ab = parse_ab(out["ab"])
            print(
                f"ab: {ab['rate']:.0f} req/s, p50 {ab['p50']:.0f} ms, {ab['complete']:.0f} requests, "
                f"client CPU {meter.cpu_seconds / ab['complete'] * 1e6:.0f} µs per connection "
                "(under py-spy); "
                f"data plane user {(after[0] - before[0]) / ab['complete'] * 1e6:.0f} µs, "
                f"system {(after[1] - before[1]) / ab['complete'] * 1e6:.0f} µs"
            )
        finally:
            transport.stop()
    if args.cprofile:
        import pstats

        pstats.Stats(str(stats)).sort_stats("tottime").print_stats(args.top)
        pstats.Stats(str(stats)).sort_stats("cumtime").print_stats(args.top)
        return 0
    if spy_proc.returncode != 0 or not raw.exists():
        print(f"py-spy failed: {spy_proc.stderr.read() if spy_proc.stderr else ''}")
        return 1
    print(summarize(raw, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
