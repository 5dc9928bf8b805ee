"""Run `x2ssh --vpn` inside a lab's client namespace and observe what it changes there.

- `VpnProcess`: starts `python -m x2ssh --vpn ...` in the client namespace (through `Lab.popen`), collects
  its output on a thread, waits (bounded) for the one "VPN up" line, and sends it signals.
- `snapshot(lab)`: the client namespace's routes, policy rules, links and resolv.conf bytes, so a test
  compares before and after exactly.
- Probes for the tests: the server namespace's agent processes, a UDP echo exchange run from the client
  namespace, curl, bounded waiting.

Every wait here is bounded; a process that misbehaves fails the test with its collected output.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from benchmarks.lab import Lab
from benchmarks.procstat import descendants, rss_kib
from benchmarks.sshd import SshServer

REPO = Path(__file__).resolve().parents[2]
READY_MARKER = "VPN up"
TUN_NAME = "x2ssh0"
TUN_V4 = "100.100.83.1"
TUN_V6 = "fd78:7832:7373::1"
TUN_DNS_V4 = "100.100.83.53"
TUN_DNS_V6 = "fd78:7832:7373::53"
AGENT_DIR_PREFIX = "/tmp/.x2ssh-agent-"

UP_TIMEOUT = 45.0  # connect + TUN + routes + agent deployment on a busy 2-core machine
EXIT_TIMEOUT = 20.0
CLEANUP_TIMEOUT = 30.0
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class VpnFailure(AssertionError):
    """x2ssh did not do what its contract says (a fault of the program under test); carries its output."""


def x2ssh_env() -> dict[str, str]:
    """Environment for x2ssh child processes: the repository importable, output unbuffered."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def state_dir_for(lab: Lab) -> Path:
    """The x2ssh state directory the tests use for `lab` (private, so parallel labs never share journals)."""
    return lab.workdir / "x2ssh-state"


def vpn_argv(server: SshServer, extra: Sequence[str] = (), state_dir: Path | None = None) -> list[str]:
    """The command line that connects x2ssh to `server` as the lab's user, verifying its host key."""
    argv = [
        sys.executable, "-m", "x2ssh", "--vpn", f"{server.user}@{server.host}",
        "-p", str(server.port), "-i", str(server.client_key),
        "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "StrictHostKeyChecking=yes",
    ]  # fmt: skip
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    return [*argv, *extra]


def run_cleanup(lab: Lab, state_dir: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m x2ssh --vpn-cleanup` in the client namespace (bounded)."""
    argv = [sys.executable, "-m", "x2ssh", "--vpn-cleanup"]
    if state_dir is not None:
        argv += ["--state-dir", str(state_dir)]
    return lab.run(lab.client, argv, cwd=REPO, env=x2ssh_env(), timeout=CLEANUP_TIMEOUT)


class VpnProcess:
    """One `x2ssh --vpn` run in the client namespace of `lab`.

    `ip netns exec` execs x2ssh, so `pid` is x2ssh's own process and `returncode` its exit status
    (negative: killed by that signal). stdout and stderr are merged into `output`.
    """

    def __init__(
        self,
        lab: Lab,
        server: SshServer,
        *extra: str,
        state_dir: Path | None = None,
        argv: Sequence[str] | None = None,
    ) -> None:
        self.lab = lab
        self.state_dir = state_dir if state_dir is not None else state_dir_for(lab)
        self.argv = list(argv) if argv is not None else vpn_argv(server, extra, self.state_dir)
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._up = threading.Event()
        self._reader: threading.Thread | None = None
        self.started_at = 0.0
        self.up_after: float | None = None  # seconds from start to the "VPN up" line

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self, wait_up: bool = True, up_timeout: float = UP_TIMEOUT) -> VpnProcess:
        """Start x2ssh; unless `wait_up` is false, return only once it printed "VPN up"."""
        if self._proc is not None:
            raise RuntimeError("already started")
        resolv = Path("/etc/netns") / self.lab.client / "resolv.conf"
        if not resolv.is_file():  # else x2ssh would edit the host's own /etc/resolv.conf
            raise RuntimeError(f"{resolv} missing: refusing to run x2ssh outside a lab namespace")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.monotonic()
        self._proc = self.lab.popen(
            self.lab.client,
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=x2ssh_env(),
        )
        self._reader = threading.Thread(target=self._collect, name=f"x2ssh-{self._proc.pid}", daemon=True)
        self._reader.start()
        if wait_up:
            self.wait_up(up_timeout)
        return self

    def wait_up(self, timeout: float = UP_TIMEOUT) -> None:
        """Wait (bounded) for the "VPN up" line; VpnFailure with the output if it exits or times out first."""
        proc = self._started()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._up.wait(0.1):
                return
            if proc.poll() is not None:
                self._join_reader()
                if self._up.is_set():
                    return
                raise VpnFailure(f"x2ssh exited with {proc.returncode} before '{READY_MARKER}'{self._tail()}")
        raise VpnFailure(f"no '{READY_MARKER}' line within {timeout:g} s{self._tail()}")

    def interrupt(self) -> None:
        """SIGINT, as Ctrl-C would send."""
        self.send_signal(signal.SIGINT)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: x2ssh gets no chance to clean up."""
        self.send_signal(signal.SIGKILL)

    def send_signal(self, signum: int) -> None:
        proc = self._started()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait (bounded) for x2ssh to exit and return its exit status; VpnFailure if it does not."""
        proc = self._started()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VpnFailure(
                f"x2ssh still running {timeout:g} s after being asked to stop{self._tail()}"
            ) from None
        self._join_reader()
        return code

    def stop(self) -> None:
        """Teardown: end x2ssh however it is (SIGTERM, then SIGKILL) and undo its leftovers. Never raises."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        with contextlib.suppress(Exception):
            run_cleanup(self.lab, self.state_dir)
        self._join_reader()

    # -- observation ---------------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    @property
    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def rss_kib(self) -> int:
        """x2ssh's resident set size in KiB (0 once it is gone)."""
        return rss_kib(self.pid)

    def describe(self) -> str:
        """The command and everything x2ssh printed so far, for assertion messages."""
        return f"\ncommand: {' '.join(self.argv)}{self._tail(200)}"

    # -- internals -----------------------------------------------------------------------------------------

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("VpnProcess not started")
        return self._proc

    def _collect(self) -> None:
        proc = self._started()
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._lock:
                self._lines.append(line)
            if READY_MARKER in line and not self._up.is_set():
                self.up_after = time.monotonic() - self.started_at
                self._up.set()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)

    def _tail(self, count: int = 60) -> str:
        lines = self.lines
        shown = "\n".join(lines[-count:]) if lines else "(no output)"
        return f"\n--- x2ssh output (last {min(count, len(lines))} of {len(lines)} lines) ---\n{shown}"


class VpnLauncher:
    """Starts `x2ssh --vpn` runs in the client namespace and stops every one of them at test teardown."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.started: list[VpnProcess] = []

    def start(self, server: SshServer, *extra: str, wait_up: bool = True) -> VpnProcess:
        """Start x2ssh against `server` with extra options; waits for "VPN up" unless `wait_up` is false."""
        vpn = VpnProcess(self.lab, server, *extra)
        self.started.append(vpn)
        return vpn.start(wait_up=wait_up)

    def stop_all(self) -> None:
        """Stop every run; then fail (VpnFailure) if any of them logged an unhandled asyncio exception."""
        for vpn in reversed(self.started):
            vpn.stop()
        run_cleanup(self.lab, state_dir_for(self.lab))
        for vpn in self.started:
            assert_no_unhandled_exceptions(vpn)


# asyncio's words for an exception nobody awaited (a Future's or a Task's): always a bug in x2ssh.
UNHANDLED_MARKERS = ("exception was never retrieved",)


def unhandled_exceptions(lines: Iterable[str]) -> list[str]:
    """The output lines where asyncio reports a Future or Task exception that was never retrieved."""
    return [line for line in lines if any(marker in line for marker in UNHANDLED_MARKERS)]


def assert_no_unhandled_exceptions(vpn: VpnProcess) -> None:
    """VpnFailure when x2ssh's output shows "Future/Task exception was never retrieved" (issue 11)."""
    found = unhandled_exceptions(vpn.lines)
    if found:
        raise VpnFailure(f"unhandled asyncio exception in x2ssh's output: {found[0]}{vpn.describe()}")


# -- the client namespace's network state -----------------------------------------------------------------


@dataclass(frozen=True)
class NetSnapshot:
    """What x2ssh may change in the client namespace, as the kernel and the file show it."""

    routes_v4: str
    routes_v6: str
    all_tables_v4: str
    all_tables_v6: str
    rules_v4: str
    rules_v6: str
    links: tuple[str, ...]
    resolv_conf: bytes

    def differences(self, other: NetSnapshot) -> str:
        """A readable diff of every field that differs from `other` ("" when equal)."""
        parts = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine == theirs:
                continue
            a, b = (_as_lines(v) for v in (mine, theirs))
            diff = difflib.unified_diff(a, b, "before", "after", lineterm="")
            parts.append(f"[{f.name}]\n" + "\n".join(diff))
        return "\n".join(parts)


def _as_lines(value: str | bytes | tuple[str, ...]) -> list[str]:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value.splitlines()


def _client_output(lab: Lab, argv: Sequence[str]) -> str:
    done = lab.run(lab.client, argv, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {lab.client}: {done.stderr.strip()}")
    return done.stdout


def snapshot(lab: Lab) -> NetSnapshot:
    """The client namespace's routes (main table and all tables), rules, link names and resolv.conf bytes."""
    links = json.loads(_client_output(lab, ["ip", "-j", "link", "show"]))
    resolv = lab.run(lab.client, ["cat", "/etc/resolv.conf"], text=False, timeout=30)
    if resolv.returncode != 0:
        raise RuntimeError(f"cannot read resolv.conf in {lab.client}: {resolv.stderr!r}")
    return NetSnapshot(
        routes_v4=_client_output(lab, ["ip", "route"]),
        routes_v6=_client_output(lab, ["ip", "-6", "route"]),
        all_tables_v4=_client_output(lab, ["ip", "-4", "route", "show", "table", "all"]),
        all_tables_v6=_without_link_local_hosts(
            _client_output(lab, ["ip", "-6", "route", "show", "table", "all"])
        ),
        rules_v4=_client_output(lab, ["ip", "rule"]),
        rules_v6=_client_output(lab, ["ip", "-6", "rule"]),
        links=tuple(sorted(link["ifname"] for link in links)),
        resolv_conf=resolv.stdout,
    )


def _without_link_local_hosts(routes: str) -> str:
    # The kernel adds a veth's link-local address (and its local-table host route) whenever the link comes
    # up, a moment after the lab is built: that is the kernel's doing, never x2ssh's.
    return "".join(line for line in routes.splitlines(keepends=True) if not line.startswith("local fe80:"))


def route_get(lab: Lab, address: str) -> str:
    """`ip route get ADDRESS` in the client namespace (no packet is sent)."""
    return _client_output(lab, ["ip", "route", "get", address]).strip()


# -- probes ------------------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate` until it is true (True) or `timeout` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def curl(lab: Lab, url: str, *extra: str, max_time: float = 30.0) -> subprocess.CompletedProcess:
    """curl in the client namespace with bounded connect and total time; `extra` are more curl options."""
    argv = [
        "curl", "--silent", "--show-error", "--globoff", "--connect-timeout", str(min(max_time, 15.0)),
        "--max-time", str(max_time), *extra, url,
    ]  # fmt: skip
    return lab.run(lab.client, argv, timeout=max_time + 15)


@dataclass(frozen=True)
class AgentProcess:
    """A UDP agent running in the server namespace."""

    pid: int
    directory: str


def agent_processes(lab: Lab) -> list[AgentProcess]:
    """The x2ssh agents running in the server namespace, found by their `--dir /tmp/.x2ssh-agent-*`.

    /tmp is shared by every namespace of this machine, so agents are told apart by namespace, not by path.
    """
    done = subprocess.run(["ip", "netns", "pids", lab.server], capture_output=True, text=True, timeout=30)
    found = []
    for pid in (int(p) for p in done.stdout.split() if p.isdigit()):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "--dir" not in args[:-1]:
            continue
        directory = args[args.index("--dir") + 1]
        if directory.startswith(AGENT_DIR_PREFIX):
            found.append(AgentProcess(pid, directory.rstrip("/")))
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# Runs in the client namespace: for each size, send a fresh random payload to the echo service and wait for
# the same bytes back (a few attempts: UDP may lose a datagram). Prints {size: "ok" | what went wrong}.
_UDP_ECHO_PROBE = r"""
import json, os, socket, sys
host, port, attempts, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sizes = [int(s) for s in sys.argv[5:]]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
results = {}
for size in sizes:
    outcome = "no reply"
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        for _ in range(attempts):
            payload = os.urandom(size)
            try:
                sock.sendto(payload, (host, port))
                while True:
                    reply, _source = sock.recvfrom(70000)
                    if reply == payload:
                        outcome = "ok"
                        break
                    outcome = "wrong reply (%d bytes)" % len(reply)
            except socket.timeout:
                continue
            except OSError as e:
                outcome = "error: %s" % e
                continue
            if outcome == "ok":
                break
    results[size] = outcome
print(json.dumps(results))
"""


def udp_echo(
    lab: Lab, host: str, port: int, sizes: Iterable[int], attempts: int = 3, timeout: float = 2.0
) -> dict[int, str]:
    """Exchange one datagram of each size with a UDP echo service from the client namespace.

    Returns size -> "ok" or what went wrong ("no reply", "wrong reply (N bytes)", "error: ...").
    """
    sizes = list(sizes)
    argv = [sys.executable, "-c", _UDP_ECHO_PROBE, host, str(port), str(attempts), str(timeout)]
    bound = attempts * timeout * len(sizes) + 30
    done = lab.run(lab.client, [*argv, *map(str, sizes)], timeout=bound)
    if done.returncode != 0:
        raise RuntimeError(f"udp echo probe failed: {done.stderr.strip()}")
    return {int(k): v for k, v in json.loads(done.stdout).items()}


# -- faults ------------------------------------------------------------------------------------------------


def kill_connection(server: SshServer) -> None:
    """SIGKILL the per-connection sshd processes (children of the listener): the SSH connection dies as if
    the server side crashed. Their own children (session shells, the agent) are left to notice by
    themselves: a shell SIGKILLed inside root's ~/.bashrc would leave pyenv's rehash lock behind and stall
    every later SSH session on this machine for a minute."""
    assert server.pid is not None
    connections = [pid for pid in descendants(server.pid) if _parent(pid) == server.pid]
    assert connections, "no sshd connection process to kill"
    kill_pids(connections)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
