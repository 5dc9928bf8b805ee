"""Profile and A/B `x2ssh -D`: the -D benchmark scenarios in one lab, with py-spy or against other checkouts.

    python -m benchmarks.profile_socks [--only tcp-up,tcp-down,http-rate] [--seconds 8] [--native]
    python -m benchmarks.profile_socks --compare TREE[,TREE..] [--ssh] [--rounds 3]
    python -m benchmarks.profile_socks --frontend [--seconds 3] [--rounds 3]
    python -m benchmarks.profile_socks --syscalls [--only tcp-up,http-rate] [--ssh] [--sshd]
    python -m benchmarks.profile_socks --cprofile --only tcp-up|http-rate
    python -m benchmarks.profile_socks --callgrind [--only tcp-up,http-rate] [--compare TREE[,..]] [--ssh]
    (any of these with --cpus 1 [--server-cpus 0]: the lab on CPU 1, or its server side on CPU 0)

Profile mode starts `x2ssh -D` (the harness's `x2ssh-D` transport) and, for each scenario, records it with
py-spy (raw collapsed stacks) while the scenario runs, then prints the top functions by own and inclusive
time. Compare mode alternates this checkout, each TREE (another checkout, same venv) and with `--ssh`
OpenSSH's `ssh -D`, scenario by scenario for `--rounds` rounds in one lab, and prints each one's medians:
throughput or rate and client CPU per GB or per connection. Needs root; a tool to see where the time goes
and whether a change helps, not the benchmark (that is `python -m benchmarks`).

Syscalls mode counts the proxy's system calls per GB moved (perf's syscall tracepoints: no ptrace, so the
proxy runs at full speed and its reads are as large as in the benchmark), for x2ssh -D and with `--ssh`
ssh -D in the same lab, with bytes per read and per write call; for http-rate, per connection. With
`--sshd`, of the sshd session serving the proxy instead, with its EVP_Cipher calls (a perf uprobe on
libcrypto, added for the run and removed after it; one call per packet sealed or opened) and its CPU per GB.

Frontend mode measures the proxy's own share of a new connection, without SSH: `SocksServer` in this
process with a backend whose channels open at once and answer a short HTTP response, and a client process
doing SOCKS5 CONNECT + request on a new connection each (as the http-rate scenario's clients do). It
alternates the lean accept path and asyncio's `create_server` and prints CPU per connection of each (no
root needed, loopback only).

Callgrind mode counts the proxy's user-space instructions per GB moved or per connection (valgrind's
callgrind, switched on for the scenario only): the same from run to run, where wall-clock A/Bs on this VM
do not resolve differences under ~10 %. memset/memcpy/memmove are shown apart (valgrind counts a
`rep movsb` per byte). The kernel's share is not in it (see syscalls mode).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import multiprocessing
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.env import BenchEnv, build_env
from benchmarks.lab import Lab, cleanup_stale
from benchmarks.machine import add_cpu_arguments, check_cpu_arguments, use_cpu_arguments
from benchmarks.procstat import ResourceMeter
from benchmarks.profile_connect import summarize
from benchmarks.scenarios import HttpRate, IperfTcp, Scenario, Settings, _server_pids
from benchmarks.transports import SOCKS_PORT, SshDynamic, Transport, X2sshDynamic, _SocksProxy

_SERVER_CPUS: set[int] | None = None  # --server-cpus: where the server and target namespaces' processes run


def _lab_env(lab: Lab, out: Path) -> BenchEnv:
    """The benchmark environment in `lab`, its server side on `--server-cpus` if given."""
    return build_env(lab, out / "logs", 1024 * 1024, _SERVER_CPUS)


class _X2sshDynamicFromTree(X2sshDynamic):
    """The harness's `x2ssh -D` run from the checkout `tree` (same venv; `-m` puts the cwd first)."""

    def __init__(self, tree: str) -> None:
        super().__init__()
        self.tree = tree

    def start(self, env: BenchEnv) -> None:
        _SocksProxy.start(self, env)  # the proxychains configuration
        self._spawn_watched(self._argv(env), r"proxy up", cwd=self.tree)

    def _argv(self, env: BenchEnv) -> list[str]:
        sshd = env.sshd
        return [
            sys.executable, "-m", "x2ssh", "-D", f"127.0.0.1:{SOCKS_PORT}", "-F", str(sshd.ssh_config),
            "-i", str(sshd.client_key), "-p", str(sshd.port), sshd.destination,
        ]  # fmt: skip


class _X2sshDynamicUnderCProfile(X2sshDynamic):
    """The harness's `x2ssh -D` run by benchmarks.cprofile_x2ssh (stats written to `out` at exit)."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def start(self, env: BenchEnv) -> None:
        _SocksProxy.start(self, env)
        sshd = env.sshd
        argv = [
            sys.executable, "-m", "benchmarks.cprofile_x2ssh", str(self.out), "-D", f"127.0.0.1:{SOCKS_PORT}",
            "-F", str(sshd.ssh_config), "-i", str(sshd.client_key), "-p", str(sshd.port), sshd.destination,
        ]  # fmt: skip
        self._spawn_watched(argv, r"proxy up", cwd=str(Path(__file__).resolve().parent.parent))


def _under_callgrind(argv: list[str], out: Path) -> list[str]:
    """`argv` under callgrind, counting nothing until `callgrind_control -i on` (see `callgrind`)."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *argv]


class _X2sshDynamicUnderCallgrind(_X2sshDynamicFromTree):
    """The harness's `x2ssh -D` from the checkout `tree`, under callgrind (counts written to `out`)."""

    def __init__(self, tree: str, out: Path) -> None:
        super().__init__(tree)
        self.out = out

    def _argv(self, env: BenchEnv) -> list[str]:
        return _under_callgrind(super()._argv(env), self.out)


class _SshDynamicUnderCallgrind(SshDynamic):
    """The harness's `ssh -D` under callgrind (counts written to `out`)."""

    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out

    def _spawn_ssh(self, args: list[str]) -> None:
        env = self._env()
        with open(self._log_path(), "ab") as log_file:
            argv = _under_callgrind(env.sshd.ssh_command(*args), self.out)
            self.proc = env.lab.popen(env.lab.client, argv, stdout=log_file, stderr=log_file)


SCENARIOS: dict[str, Scenario] = {
    "tcp-up": IperfTcp("tcp-up", "TCP 1 flow upload", reverse=False, flows=1),
    "tcp-down": IperfTcp("tcp-down", "TCP 1 flow download", reverse=True, flows=1),
    "http-rate": HttpRate(),
}


def _run_metered(
    env: BenchEnv, transport: Transport, scenario: Scenario, settings: Settings
) -> tuple[float, float]:
    """(throughput, client CPU s/GB) of an iperf scenario; (rate, client CPU s per 1,000 connections)."""
    if scenario.name != "http-rate":
        values = scenario.run(env, transport, settings)
        server = float(values[f"{scenario.name}-cpu-server"][0] or 0.0)
        print(f"    {transport.name} {scenario.name}: server side CPU {server:.3f} s/GB", flush=True)
        return float(values[scenario.name][0] or 0.0), float(values[f"{scenario.name}-cpu-client"][0] or 0.0)
    with (
        ResourceMeter(transport.client_pids) as meter,
        ResourceMeter(lambda: _server_pids(env)) as server_meter,
    ):
        values = scenario.run(env, transport, settings)
    rate, extra = values["http-rate"]
    requests = extra["requests"] or 1
    server_cpu = server_meter.cpu_seconds / requests * 1e3
    print(f"    {transport.name} http-rate: server side CPU {server_cpu:.3f} s per 1k conn", flush=True)
    return float(rate or 0.0), meter.cpu_seconds / requests * 1e3


def compare(
    trees: list[str], ssh: bool, only: list[str], rounds: int, settings: Settings, out: Path, trees_only: bool
) -> int:
    """Alternate this checkout (unless `trees_only`), `trees` and with `ssh` ssh -D; print the medians."""
    cleanup_stale()
    names = trees + (["ssh-D"] if ssh else [])
    if not names or trees_only is False:
        names.insert(0, "this")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with Lab() as lab:
        env = _lab_env(lab, out)
        for round_no in range(rounds):
            order = names if round_no % 2 == 0 else names[::-1]
            for name in order:
                if name == "this":
                    transport: Transport = X2sshDynamic()
                elif name == "ssh-D":
                    transport = SshDynamic()
                else:
                    transport = _X2sshDynamicFromTree(name)
                transport.start(env)
                try:
                    for key in only:
                        figure = _run_metered(env, transport, SCENARIOS[key], settings)
                        results.setdefault((name, key), []).append(figure)
                        unit = "s/GB" if key != "http-rate" else "s per 1k conn"
                        line = f"{round_no + 1} {name:>12} {key:>9}: {figure[0]:9.0f}"
                        print(f"round {line}  cpu {figure[1]:.3f} {unit}", flush=True)
                finally:
                    transport.stop()
    print("medians:")
    for key in only:
        for name in names:
            rows = results.get((name, key), [])
            if rows:
                value = statistics.median(r[0] for r in rows)
                cpu = statistics.median(r[1] for r in rows)
                print(f"  {key:>9} {name:>30}: {value:9.0f}  cpu {cpu:.3f}")
    return 0


SYSCALLS = (
    "recvfrom", "recvmsg", "read", "readv", "writev", "write", "sendto", "sendmsg", "epoll_wait", "epoll_ctl",
    "poll", "ppoll", "pselect6", "select", "getrandom", "accept", "accept4", "setsockopt", "getsockopt",
    "ioctl", "fcntl", "shutdown", "close", "getpid", "getsockname", "getpeername",
)  # fmt: skip
_READS = ("recvfrom", "recvmsg", "read", "readv")
_WRITES = ("writev", "write", "sendto", "sendmsg")


_CIPHER_PROBE = "probe_libcrypto:EVP_Cipher"  # OpenSSH seals and opens each packet through EVP_Cipher


@contextlib.contextmanager
def _cipher_probe() -> Iterator[list[str]]:
    """A perf uprobe on libcrypto's EVP_Cipher while the block runs ([its event], or [] where it cannot be
    added); removed afterwards."""
    found = re.search(r"=> (\S*libcrypto\.so\.3)\b", subprocess.run(["ldconfig", "-p"], capture_output=True,
                      text=True).stdout)  # fmt: skip
    added = (
        found is not None
        and subprocess.run(
            ["perf", "probe", "-q", "-x", found.group(1), "--add", "EVP_Cipher"], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield [_CIPHER_PROBE] if added else []
    finally:
        if added:
            subprocess.run(["perf", "probe", "-q", "-d", f"{_CIPHER_PROBE}*"], capture_output=True)


def _count_syscalls(pids: str, seconds: int, run: Any, extra: list[str]) -> tuple[Any, dict[str, int]]:
    """Run `run()` while perf counts the system calls of `pids` (comma-separated; all threads) and the
    `extra` events; (its result, counts by name)."""
    events = ",".join([f"syscalls:sys_enter_{name}" for name in SYSCALLS] + extra)
    with tempfile.NamedTemporaryFile("r", suffix=".perf") as out:
        cmd = ["perf", "stat", "-x", ",", "-e", events, "-p", pids, "-o", out.name]
        perf = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # attached before the flow starts
        try:
            result = run()
        finally:
            perf.send_signal(2)
            perf.wait(timeout=30)
        counts: dict[str, int] = {}
        for line in Path(out.name).read_text().splitlines():
            fields = line.split(",")
            # (a count that is "<not counted>" is left out)
            if len(fields) > 2 and fields[0].isdigit():
                if fields[2].startswith("syscalls:sys_enter_"):
                    counts[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0])
                elif fields[2] in extra:
                    counts[fields[2].split(":")[1]] = int(fields[0])
    return result, counts


def _print_per_connection(round_no: int, name: str, values: Any, counts: dict[str, int]) -> None:
    """The http-rate line of `syscalls`: system calls per connection (one request each)."""
    requests = max(1, values["http-rate"][1]["requests"])
    total = sum(counts.values()) / requests
    print(f"round {round_no + 1} {name:>8} http-rate: {values['http-rate'][0]:.0f} req/s; "
          f"{total:.1f} system calls per connection")  # fmt: skip
    per = {k: v / requests for k, v in counts.items() if v}
    print("   per connection: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items())))


def syscalls(
    only: list[str], ssh: bool, rounds: int, settings: Settings, out: Path, sshd: bool = False
) -> int:
    """Print system calls per GB of x2ssh -D (and ssh -D) for each iperf scenario of `only`, and per
    connection for http-rate; with `sshd`, those of the sshd session that serves the proxy, with its
    EVP_Cipher calls (one per packet sealed or opened) and its CPU per GB."""
    cleanup_stale()
    with Lab() as lab, _cipher_probe() if sshd else contextlib.nullcontext([]) as extra:
        env = _lab_env(lab, out)
        for round_no in range(rounds):
            for transport in [X2sshDynamic()] + ([SshDynamic()] if ssh else []):
                transport.start(env)
                try:
                    pids = _server_pids(env) if sshd else transport.client_pids()[:1]
                    side = "server" if sshd else "client"
                    for key in only:
                        run = functools.partial(SCENARIOS[key].run, env, transport, settings)
                        values, counts = _count_syscalls(
                            ",".join(map(str, pids)), settings.iperf_seconds, run, extra
                        )
                        if key == "http-rate":
                            _print_per_connection(round_no, transport.name, values, counts)
                            continue
                        moved = values[key][1]["bytes"] / 1e9
                        per_gb = {k: v / moved for k, v in counts.items() if v}
                        reads = sum(counts.get(k, 0) for k in _READS)
                        writes = sum(counts.get(k, 0) for k in _WRITES)
                        print(
                            f"round {round_no + 1} {transport.name:>8}{' sshd' if sshd else ''} {key}: "
                            f"{values[key][0]:.0f} Mbit/s, cpu {values[f'{key}-cpu-{side}'][0] or 0:.3f} "
                            "s/GB; "
                            "bytes moved per read call "
                            f"{moved * 1e9 / max(reads, 1):.0f}, per write call "
                            f"{moved * 1e9 / max(writes, 1):.0f}"
                        )
                        print("   per GB: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(per_gb.items())))
                finally:
                    transport.stop()
    return 0


_MEM_OPS = re.compile(r":__(memset|memcpy|memmove|mempcpy)\w*|:(memset|memcpy|memmove)\b")


def _callgrind_counts(out: Path) -> tuple[int, int]:
    """(all instructions, those in memset/memcpy/memmove) of the dump of a callgrind run taken after the
    scenario (the largest of the files `out` and `out.N`; the one written at exit holds next to nothing).

    The memory functions are told apart because valgrind counts each step of a `rep movsb`/`rep stosb`,
    which glibc uses for large blocks, as an instruction: a byte each, where the CPU does a cache line."""
    dumps: list[tuple[int, Path]] = []
    for path in out.parent.glob(out.name + "*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                dumps.append((int(line.split()[1]), path))
    if not dumps:
        return 0, 0
    total, path = max(dumps)
    listing = subprocess.run(
        ["callgrind_annotate", "--threshold=100", str(path)], capture_output=True, text=True, check=True
    ).stdout
    mem = 0
    for line in listing.splitlines():
        fields = line.split()
        if fields and fields[0][:1].isdigit() and _MEM_OPS.search(line):
            mem += int(fields[0].replace(",", ""))
    return total, mem


def callgrind(only: list[str], trees: list[str], ssh: bool, settings: Settings, out: Path) -> int:
    """User-space instructions of the proxy process per GB moved (iperf) or per connection (http-rate),
    counted by callgrind for this checkout, each of `trees` and with `ssh` ssh -D.

    Why. Wall-clock A/Bs on this 2-core VM do not resolve differences under ~10 %; instruction counts are
    the same from run to run whatever the neighbours do. They leave out the kernel (system calls and
    copies: `--syscalls` counts those) and weigh an AES-NI instruction like a move, so they compare the
    user-space work of the two proxies, not their speed. Under valgrind the proxy runs ~50x slower, so its
    reads are full, as in the benchmark's bulk runs."""
    import benchmarks.transports as transports

    cleanup_stale()
    out.mkdir(parents=True, exist_ok=True)
    transports.START_TIMEOUT = 300.0  # Python's imports and the key exchange under valgrind
    names = ["this", *trees] + (["ssh-D"] if ssh else [])
    with Lab() as lab:
        env = _lab_env(lab, out)
        runs = 0
        for name in names:
            for key in only:
                runs += 1
                dump = out / f"callgrind.{runs}.{key}"
                for stale in out.glob(dump.name + "*"):  # an earlier invocation's dumps
                    stale.unlink()
                if name == "ssh-D":
                    transport: Transport = _SshDynamicUnderCallgrind(dump)
                else:
                    tree = str(Path(__file__).resolve().parent.parent) if name == "this" else name
                    transport = _X2sshDynamicUnderCallgrind(tree, dump)
                transport.start(env)
                try:
                    pid = str(transport.proc.pid)  # (ip netns exec execs valgrind: the same process)
                    subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
                    values = SCENARIOS[key].run(env, transport, settings)
                    subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
                    subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
                finally:
                    transport.stop()
                total, mem = _callgrind_counts(dump)
                if key == "http-rate":
                    done = max(1, values[key][1]["requests"])
                    print(f"{name:>30} {key}: {done} connections; instructions per connection "
                          f"{(total - mem) / done:,.0f} + memset/memcpy {mem / done:,.0f}")  # fmt: skip
                else:
                    moved = max(1, values[key][1]["bytes"])
                    rate = values[key][0]
                    print(f"{name:>30} {key}: {moved / 1e6:.0f} MB at {rate:.0f} Mbit/s; G instr. per GB "
                          f"{(total - mem) / moved:.2f} + memset/memcpy {mem / moved:.2f}")  # fmt: skip
    return 0


def cprofile(key: str, settings: Settings, top: int, out: Path) -> int:
    """cProfile (CPU time) of x2ssh -D over one scenario: calls and time per function, per GB moved (iperf) or
    per 1,000 connections (http-rate)."""
    import pstats

    cleanup_stale()
    out.mkdir(parents=True, exist_ok=True)
    stats = out / f"{key}.pstats"
    with Lab() as lab:
        env = _lab_env(lab, out)
        transport = _X2sshDynamicUnderCProfile(stats)
        transport.start(env)
        try:
            values = SCENARIOS[key].run(env, transport, settings)
        finally:
            transport.stop()
    if key == "http-rate":  # per 1,000 connections
        moved = values[key][1]["requests"] / 1e3
        print(f"== {key}: {values[key][0]:.0f} req/s (under cProfile), {moved * 1e3:.0f} connections")
        unit = "1kc"
    else:
        moved = values[key][1]["bytes"] / 1e9
        print(f"== {key}: {values[key][0]:.0f} Mbit/s (under cProfile), {moved:.2f} GB moved")
        unit = "GB"
    table = pstats.Stats(str(stats)).stats  # type: ignore[attr-defined]
    rows = sorted(table.items(), key=lambda item: -item[1][2])[:top]
    print(f"{'calls/' + unit:>10} {'own s/' + unit:>9} {'incl s/' + unit:>9}  function")
    for (path, line, name), (_, calls, own, incl, _) in rows:
        where = f"{Path(path).name}:{line}" if line else path
        print(f"{calls / moved:10.0f} {own / moved:9.3f} {incl / moved:9.3f}  {name} ({where})")
    return 0


def profile(
    only: list[str], settings: Settings, native: bool, perf: bool, top: int, out: Path, ssh: bool = False
) -> int:
    """py-spy (or with `perf` perf record) of x2ssh -D for each scenario; with `ssh` and `perf`, of ssh -D."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not perf and not Path(spy).exists():  # not a dependency of the project: a tool for this mode only
        hint = "`.venv/bin/pip install py-spy`, or use --perf, --cprofile or --callgrind"
        print(f"py-spy is not installed: {hint}", file=sys.stderr)
        return 2
    cleanup_stale()
    out.mkdir(parents=True, exist_ok=True)
    with Lab() as lab:
        env = _lab_env(lab, out)
        transport: Transport = SshDynamic() if ssh and perf else X2sshDynamic()
        transport.start(env)
        try:
            pid = transport.client_pids()[0]
            for key in only:
                raw = out / f"{key}.raw"
                seconds = settings.iperf_seconds if key != "http-rate" else int(settings.http_seconds)
                record = [spy, "record", "--pid", str(pid), "--duration", str(seconds), "-r", "250"]
                record += ["-f", "raw", "-o", str(raw), "--nonblocking"] + (["--native"] if native else [])
                if perf:
                    record = ["perf", "record", "-g", "-p", str(pid), "-o", str(out / f"{key}.perf"), "--"]
                    record += ["sleep", str(seconds)]
                spy_proc = subprocess.Popen(
                    record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                )
                figure = _run_metered(env, transport, SCENARIOS[key], settings)
                spy_proc.wait(timeout=120)
                print(f"== {key}: {figure[0]:.0f}, client cpu {figure[1]:.3f} (under py-spy)")
                if perf:
                    report = ["perf", "report", "-i", str(out / f"{key}.perf"), "--no-children", "--stdio"]
                    report += ["--sort", "dso,symbol", "-g", "none", "--percent-limit", "0.5"]
                    text = subprocess.run(report, capture_output=True, text=True).stdout
                    print("\n".join(line for line in text.splitlines() if line and not line.startswith("#")))
                elif raw.exists():
                    print(summarize(raw, top))
                else:
                    print(f"py-spy failed: {spy_proc.stderr.read() if spy_proc.stderr else ''}")
        finally:
            transport.stop()
    return 0


# -- frontend mode: the proxy without SSH ------------------------------------------------------------------

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"


class _InstantChannel:
    """A channel whose destination answers the first bytes with `_RESPONSE`, then EOF; closes soon."""

    def __init__(self, session: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.session = session
        self.loop = loop
        self.answered = False

    def write(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.session.data_received(_RESPONSE, None)
            self.session.eof_received()

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.loop.call_soon(self.session.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _InstantBackend:
    """Channels open at once, by callback, as the session's backend opens them when connected."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    async def resolve(self, name: str) -> list[str]:
        return ["127.0.0.1"]

    async def open_tcp(self, host: str, port: int, factory: Any, origin: Any) -> tuple[Any, Any]:
        session = factory()
        channel = _InstantChannel(session, self.loop)
        session.connection_made(channel)
        return channel, session

    def open_tcp_now(self, host: str, port: int, factory: Any, origin: Any, on_done: Any) -> Any:
        session = factory()
        channel = _InstantChannel(session, self.loop)
        session.connection_made(channel)
        return self.loop.call_soon(on_done, channel, None)

    def udp_send(self, src: Any, dst: Any, payload: bytes) -> None:
        pass


def _frontend_client(port: int, seconds: float, concurrency: int, done: Any) -> None:
    """`concurrency` loops of SOCKS5 CONNECT + one request on a new connection each, for `seconds`."""

    async def one(stop: float) -> int:
        count = 0
        while time.monotonic() < stop:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x05\x01\x00")
            await reader.readexactly(2)
            writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
            if (await reader.readexactly(10))[1] != 0:
                raise ConnectionError("the proxy refused")
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            if await reader.read() != _RESPONSE:
                raise ConnectionError("the response did not come whole through the proxy")
            writer.close()
            count += 1
        return count

    async def run() -> int:
        stop = time.monotonic() + seconds
        return sum(await asyncio.gather(*(one(stop) for _ in range(concurrency))))

    done.put(asyncio.run(run()))


async def _frontend_round(lean: bool, seconds: float, concurrency: int) -> tuple[int, float, float]:
    """(connections, CPU s and user CPU s of this process per connection) with the lean path or not."""
    from x2ssh.frontends.socks import SocksServer

    server = SocksServer(_InstantBackend(asyncio.get_running_loop()), "127.0.0.1", 0, lean=lean)
    await server.start()
    done: Any = multiprocessing.Queue()
    client = multiprocessing.Process(
        target=_frontend_client, args=(server.addresses[0][1], seconds, concurrency, done)
    )
    before = resource.getrusage(resource.RUSAGE_SELF)
    client.start()
    while client.is_alive():
        await asyncio.sleep(0.05)
    after = resource.getrusage(resource.RUSAGE_SELF)
    await server.close()
    count = max(1, done.get(timeout=10))
    user = after.ru_utime - before.ru_utime
    return count, (user + after.ru_stime - before.ru_stime) / count, user / count


def frontend(seconds: float, rounds: int, concurrency: int = 20) -> int:
    """Alternate the lean accept path and asyncio's create_server; print CPU per connection of each."""
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for round_no in range(rounds):
        for lean in (True, False) if round_no % 2 == 0 else (False, True):
            count, cpu, user = asyncio.run(_frontend_round(lean, seconds, concurrency))
            results[lean].append((cpu, user))
            name = "lean" if lean else "asyncio"
            print(f"round {round_no + 1} {name:>8}: {count} connections, cpu {cpu * 1e6:.1f} us/conn "
                  f"(user {user * 1e6:.1f})", flush=True)  # fmt: skip
    print("medians (CPU of the proxy process per connection, no SSH):")
    for lean in (True, False):
        cpu = statistics.median(r[0] for r in results[lean]) * 1e6
        user = statistics.median(r[1] for r in results[lean]) * 1e6
        print(f"  {'lean' if lean else 'asyncio':>8}: {cpu:.1f} us (user {user:.1f})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_socks", description=__doc__)
    parser.add_argument("--only", default="tcp-up,tcp-down,http-rate")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--perf", action="store_true", help="perf record -g instead of py-spy (C and kernel)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--compare", default=None, metavar="TREE[,TREE..]")
    parser.add_argument("--ssh", action="store_true", help="compare, syscalls: also ssh -D; perf: ssh -D")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trees-only", action="store_true", help="compare: not this checkout")
    parser.add_argument("--frontend", action="store_true", help="the proxy without SSH (no root needed)")
    parser.add_argument(
        "--cprofile",
        action="store_true",
        help="cProfile: calls per GB or per 1k connections (first of --only)",
    )
    parser.add_argument("--syscalls", action="store_true", help="system calls per GB (perf tracepoints)")
    parser.add_argument(
        "--sshd", action="store_true", help="syscalls: of the sshd session, with EVP_Cipher calls"
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="user-space instructions per GB or connection (callgrind; with --compare TREEs, --ssh)",
    )
    add_cpu_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "x2ssh-profile-socks")
    args = parser.parse_args()
    check_cpu_arguments(parser, args)
    use_cpu_arguments(args)
    global _SERVER_CPUS
    _SERVER_CPUS = args.server_cpus
    if args.frontend:
        return frontend(float(args.seconds), args.rounds)
    if os.geteuid() != 0:
        print("needs root (network namespaces)")
        return 2
    only = [k for k in args.only.split(",") if k]
    settings = Settings(**{**Settings.full().__dict__, "iperf_seconds": args.seconds,
                           "http_seconds": float(args.seconds)})  # fmt: skip
    if args.cprofile:
        return cprofile(only[0], settings, args.top, args.out)
    if args.callgrind:
        trees = [t for t in (args.compare or "").split(",") if t]
        return callgrind(only, trees, args.ssh, settings, args.out)
    if args.syscalls:
        return syscalls(only, args.ssh, args.rounds, settings, args.out, args.sshd)
    if args.perf and args.compare is None:
        return profile(only, settings, args.native, args.perf, args.top, args.out, args.ssh)
    if args.compare is not None or args.ssh:
        trees = [t for t in (args.compare or "").split(",") if t]
        return compare(trees, args.ssh, only, args.rounds, settings, args.out, args.trees_only)
    return profile(only, settings, args.native, args.perf, args.top, args.out)


if __name__ == "__main__":
    sys.exit(main())
