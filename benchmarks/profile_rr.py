"""A/B the 64-byte request/response latency of x2ssh --vpn: this checkout, another one, and `ssh -L`.

    python -m benchmarks.profile_rr [--compare TREE] [--rounds 3] [--count 3000] [--also SCENARIO,..]
                                    [--strace OUT] [--spy] [--cprofile]

Builds the namespace lab once and runs the harness's rr client (64 B, one connection, TCP_NODELAY)
through `ssh -L`, this checkout's x2ssh and, with `--compare`, the x2ssh of another checkout (same venv,
same native module: `git archive REV | tar -x -C TREE` plus a copy of netstack/_native.abi3.so), in
turn, `--rounds` times: the same load and the same sshd for all. Prints each run's p50/p99 and the
median p50 per transport with its ratio to `ssh -L`'s. `--strace OUT` records x2ssh's system calls
(strace -f -tt -T) during one extra run of this checkout: where the time of a round trip goes.
`--also ab-rate,tcp-up` runs those harness scenarios on each transport in each round too (no
regression elsewhere). `--spy` samples one run with py-spy (wall time: on a busy two-core machine it
charges preemption to the system call in progress). `--cprofile` runs this checkout (and `--compare`'s)
under cProfile and prints the Python calls and loop turns per round trip: exact counts, which the shared
machine's load does not blur as it blurs the times (`--rounds 0` skips the timed rounds). The client
CPU column is the transport's own CPU per round trip, from the scheduler's count. Needs root (the lab).
Not a benchmark of record: `python -m benchmarks --only rr-latency` is.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.env import BenchEnv, build_env
from benchmarks.lab import Lab, cleanup_stale
from benchmarks.profile_connect import _busiest, _times, _X2sshFromTree, _X2sshUnderCProfile, summarize
from benchmarks.scenarios import Settings, _client, all_scenarios
from benchmarks.transports import REPO_ROOT, SshLocalForward, Transport, X2ssh


def _run_ns(pid: int) -> int:
    """CPU time of `pid`'s threads so far, in ns (the scheduler's own count, finer than clock ticks)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(stat.read_text().split()[0])
    return total


def _rr(env: object, transport: Transport, count: int) -> dict:
    ep = transport.reach("echo")
    args = ["rr", "--host", ep.host, "--port", str(ep.port), "--count"]
    _client(env, ep, [*args, "300"], timeout=60)  # warm up (new connection, caches)
    pids = transport.client_pids()
    before = [_times(pid) for pid in pids]
    ran = sum(_run_ns(pid) for pid in pids)
    data = _client(env, ep, [*args, str(count)], timeout=120)
    ran = sum(_run_ns(pid) for pid in pids) - ran
    after = [_times(pid) for pid in pids]
    pairs = list(zip(after, before, strict=True))
    data["user_us"] = sum(a[0] - b[0] for a, b in pairs) / count * 1e6
    data["sys_us"] = sum(a[1] - b[1] for a, b in pairs) / count * 1e6
    data["cpu_us"] = ran / count / 1e3
    return data


def _spy(env: object, count: int, out: Path) -> None:
    transport = X2ssh()
    transport.start(env)  # type: ignore[arg-type]
    raw = out / "rr.raw"
    try:
        pid = _busiest(transport.client_pids())
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        argv = [spy, "record", "--pid", str(pid), "-r", "1000", "-f", "raw", "-o", str(raw), "--nonblocking"]
        recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            data = _rr(env, transport, count * 5)
        finally:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(timeout=60)
        print(f"under py-spy: p50 {data['p50_us']:.1f} µs")
    finally:
        transport.stop()
    print(summarize(raw, 40))
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            frame = stack.split(";")[-1]
            own[frame.split(" (")[0] + " " + frame.rsplit(":", 1)[0].split("(")[-1]] += int(n)
            total += int(n)
    print("own time by function:")
    for name, n in own.most_common(40):
        print(f"  {100 * n / total:5.1f}%  {name}")


def _cprofile(env: BenchEnv, count: int, out: Path, trees: dict[str, str]) -> None:
    """Per round trip: Python calls, loop turns and socket/TUN system calls, for each checkout (exact
    counts, unlike the times); then this checkout's top functions by own CPU time."""
    for name, tree in trees.items():
        transport = _X2sshUnderCProfile()
        transport.tree = tree
        stats = out / f"rr-{name}.pstats"
        transport.out = str(stats)  # type: ignore[attr-defined]
        transport.start(env)
        try:
            _rr(env, transport, 300)  # warm-up, then the counted run: the difference is the run's
            data = _rr(env, transport, count)
        finally:
            transport.stop()
        profile = pstats.Stats(str(stats))
        calls = sum(nc for (_, _, _), (_, nc, _, _, _) in profile.stats.items())  # type: ignore[attr-defined]
        turns = sum(
            nc
            for (f, _, fn), (_, nc, _, _, _) in profile.stats.items()  # type: ignore[attr-defined]
            if fn == "_run_once" and f.endswith("base_events.py")
        )
        total = count + 600  # the warm-ups' round trips count too (each _rr warms up with 300)
        print(
            f"{name}: {calls / total:.0f} Python calls and {turns / total:.2f} loop turns per round trip "
            f"(whole run incl. start-up, {total} round trips); p50 under cProfile {data['p50_us']:.0f} µs"
        )
    pstats.Stats(str(out / "rr-this.pstats")).sort_stats("tottime").print_stats(30)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_rr", description=__doc__)
    parser.add_argument("--compare", type=Path, default=None, metavar="TREE")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--strace", type=Path, default=None, metavar="OUT")
    parser.add_argument("--also", default="", metavar="SCENARIO[,..]", help="harness scenarios to A/B too")
    parser.add_argument("--spy", action="store_true", help="py-spy (raw, own and inclusive top) of one run")
    parser.add_argument("--cprofile", action="store_true", help="cProfile (CPU time, calls) of one run")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "x2ssh-profile-rr")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = (["ssh-L", "this"] + (["other"] if args.compare else [])) if args.rounds else []
    p50s: dict[str, list[float]] = {name: [] for name in names}
    also = [s for s in all_scenarios() if s.name in args.also.split(",")]
    settings = Settings.full()
    figures: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    cleanup_stale()
    with Lab() as lab:
        env = build_env(lab, args.out / "logs", 1024 * 1024)
        for _ in range(args.rounds):
            for name in names:
                transport: Transport
                if name == "ssh-L":
                    transport = SshLocalForward()
                elif name == "this":
                    transport = X2ssh()
                else:
                    transport = _X2sshFromTree()
                    transport.tree = str(args.compare)  # type: ignore[attr-defined]
                transport.start(env)
                try:
                    data = _rr(env, transport, args.count)
                    for scenario in also:
                        values = scenario.run(env, transport, settings)
                        for metric, (value, _) in values.items():
                            if value is not None:
                                figures[(metric, name)].append(value)
                        shown = {k: round(v[0], 1) for k, v in values.items() if v[0] is not None}
                        print(f"{name:6s} {scenario.name}: {shown}", flush=True)
                finally:
                    transport.stop()
                p50s[name].append(data["p50_us"])
                print(
                    f"{name:6s} p50 {data['p50_us']:6.1f} µs  p99 {data['p99_us']:7.1f} µs  "
                    f"client CPU {data['cpu_us']:5.1f} µs per round trip "
                    f"(user {data['user_us']:4.0f}, sys {data['sys_us']:4.0f})",
                    flush=True,
                )
        if args.strace is not None:
            transport = X2ssh()
            transport.start(env)
            try:
                pid = _busiest(transport.client_pids())
                strace = shutil.which("strace") or "strace"
                tracer = subprocess.Popen([strace, "-f", "-tt", "-T", "-o", str(args.strace), "-p", str(pid)])
                try:
                    data = _rr(env, transport, min(args.count, 500))
                finally:
                    tracer.terminate()
                    tracer.wait(timeout=30)
                print(f"under strace: p50 {data['p50_us']:.1f} µs; trace in {args.strace}")
            finally:
                transport.stop()
        if args.spy:
            _spy(env, args.count, args.out)
        if args.cprofile:
            trees = {"this": str(REPO_ROOT)} | ({"other": str(args.compare)} if args.compare else {})
            _cprofile(env, args.count, args.out, trees)
    if not names:
        return 0
    for (metric, name), values in sorted(figures.items()):
        print(f"median {metric} {name}: {statistics.median(values):.1f}")
    base = statistics.median(p50s["ssh-L"])
    for name, values in p50s.items():
        mid = statistics.median(values)
        print(f"median {name:6s} p50 {mid:6.1f} µs  ({mid / base:.2f}x ssh -L)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
