"""A three-namespace network lab: client -- server -- target, built and torn down by `Lab`.

Theory of operation
-------------------
```
  client ns                      server ns                          target ns
  veth-srv 198.18.0.2  <---->  veth-cli 198.18.0.1
           fd58:3278:7373:1::2          fd58:3278:7373:1::1
                                 veth-tgt 198.19.0.1     <---->   veth-srv 198.19.0.2
                                          fd58:3278:7373:2::1              fd58:3278:7373:2::2
```
- client: default routes (v4 and v6) via the server, as behind a router; `/etc/netns/<client>/resolv.conf`
  names the server's address, so a DNS leak shows up on the client link.
- server: runs sshd; IP forwarding OFF (v4 and v6), so the client reaches the target only through a tunnel.
  `/etc/netns/<server>/resolv.conf` names 127.0.0.1 (a dnsmasq started by `services.start_dns`).
- target: services; routes back to the client link via the server, so "client cannot reach target" is
  caused by forwarding being off, not by a missing return route.

Veths are created directly inside the namespaces (never in the root namespace), so interface names never
collide between labs. Namespace names are `x2l-<owner pid>-<random>-<role>`; `cleanup_stale()` removes only
labs whose owner process is gone, so parallel runs never tear each other down.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from benchmarks.procstat import wait_ready_line
from benchmarks.sshd import SshServer

log = logging.getLogger(__name__)

PREFIX = "x2l-"
_lab_serial = itertools.count()  # see Lab.__init__
NETNS_ETC = Path("/etc/netns")
CMD_TIMEOUT = 60.0
KILL_GRACE = 3.0
IMPAIR_SCRIPT = Path(__file__).with_name("impair.py")


class LabError(RuntimeError):
    """The lab could not be built or driven: a fault of this machine's setup (not of the code under test)."""


@dataclass(frozen=True)
class HostAddresses:
    """A host's addresses on one link."""

    v4: str
    v6: str


# Fixed lab addressing (198.18.0.0/15 and a ULA /48: never collides with real networks).
CLIENT_NET_V4 = "198.18.0.0/24"
TARGET_NET_V4 = "198.19.0.0/24"
CLIENT_NET_V6 = "fd58:3278:7373:1::/64"
TARGET_NET_V6 = "fd58:3278:7373:2::/64"
CLIENT_ADDR = HostAddresses("198.18.0.2", "fd58:3278:7373:1::2")
SERVER_CLIENT_SIDE = HostAddresses("198.18.0.1", "fd58:3278:7373:1::1")
SERVER_TARGET_SIDE = HostAddresses("198.19.0.1", "fd58:3278:7373:2::1")
TARGET_ADDR = HostAddresses("198.19.0.2", "fd58:3278:7373:2::2")

_live_labs: set[Lab] = set()
_live_lock = threading.Lock()
_safety_net_installed = False


class Lab:
    """Builds the client/server/target namespaces on `__enter__` (or `build()`), removes them on `close()`.

    Attributes: `client`, `server`, `target` (namespace names); `client_addr`, `server_client_side`,
    `server_target_side`, `target_addr` (`HostAddresses`); veth names `client_if` (the client's "physical"
    interface: use it for tcpdump/netem), `server_client_if`, `server_target_if`, `target_if`; `workdir`.
    """

    client_if = "veth-srv"
    server_client_if = "veth-cli"
    server_target_if = "veth-tgt"
    target_if = "veth-srv"
    client_addr = CLIENT_ADDR
    server_client_side = SERVER_CLIENT_SIDE
    server_target_side = SERVER_TARGET_SIDE
    target_addr = TARGET_ADDR

    def __init__(self, workdir: Path | None = None) -> None:
        # A serial number makes the names unique within this process (two random bytes alone once
        # collided, and the second lab, failing to build, tore down the first's namespaces); the pid
        # keeps processes apart.
        tag = f"{PREFIX}{os.getpid()}-{next(_lab_serial):x}{secrets.token_hex(2)}"
        self.client = f"{tag}-cli"
        self.server = f"{tag}-srv"
        self.target = f"{tag}-tgt"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        self._procs: list[subprocess.Popen[Any]] = []
        self._servers: list[SshServer] = []
        self._built = False
        self._closed = False
        self._created: list[str] = []  # namespaces this lab added: close() deletes these and no others
        self._impairments: dict[tuple[str, str], tuple[subprocess.Popen, int, HostAddresses]] = {}
        self._impairment_ids = itertools.count(1)
        self.netem_backend = "none"

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.client, self.server, self.target)

    # -- build / teardown ----------------------------------------------------------------------------------

    def build(self) -> Lab:
        """Create namespaces, links, addresses, routes and resolv.conf files. Undoes itself on failure."""
        _install_safety_net()
        with _live_lock:
            _live_labs.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        self._built = True
        log.info("lab up: %s", ", ".join(self.namespaces))
        return self

    def _build(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "add", ns)  # fails if the name is taken: then it is not ours to delete
            self._created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip(
            "-n", self.client, "link", "add", self.client_if, "type", "veth",
            "peer", "name", self.server_client_if, "netns", self.server,
        )  # fmt: skip
        _ip(
            "-n", self.server, "link", "add", self.server_target_if, "type", "veth",
            "peer", "name", self.target_if, "netns", self.target,
        )  # fmt: skip
        self._sysctl(self.server, "net.ipv4.ip_forward", "0")
        self._sysctl(self.server, "net.ipv6.conf.all.forwarding", "0")
        for ns in self.namespaces:
            self._sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")
            self._sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
        self._address(self.client, self.client_if, self.client_addr)
        self._address(self.server, self.server_client_if, self.server_client_side)
        self._address(self.server, self.server_target_if, self.server_target_side)
        self._address(self.target, self.target_if, self.target_addr)
        _ip("-n", self.client, "route", "add", "default", "via", self.server_client_side.v4)
        _ip("-n", self.client, "-6", "route", "add", "default", "via", self.server_client_side.v6)
        _ip("-n", self.target, "route", "add", CLIENT_NET_V4, "via", self.server_target_side.v4)
        _ip("-n", self.target, "-6", "route", "add", CLIENT_NET_V6, "via", self.server_target_side.v6)
        self._resolv_conf(self.client, [self.server_client_side.v4, self.server_client_side.v6])
        self._resolv_conf(self.server, ["127.0.0.1"])

    def close(self) -> None:
        """Kill every tracked process and everything still running in the namespaces, delete the
        namespaces and their /etc/netns directories. Safe to call twice and after a partial build, which
        removes only the namespaces this lab itself added (a name already in use is someone else's)."""
        if self._closed:
            return
        self._closed = True
        for server in self._servers:
            with contextlib.suppress(Exception):
                server.stop()
        for proc in self._procs:
            _terminate(proc)
        for ns in self._created:
            _kill_namespace_pids(ns)
            if _netns_exists(ns):
                done = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=30)
                if done.returncode != 0:
                    log.warning("ip netns del %s: %s", ns, done.stderr.strip())
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        with _live_lock:
            _live_labs.discard(self)
        log.info("lab down: %s", ", ".join(self.namespaces))

    def __enter__(self) -> Lab:
        return self.build()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- running things ------------------------------------------------------------------------------------

    def ns_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed so it runs inside namespace `ns` (with its /etc/netns files mounted)."""
        self._check_ns(ns)
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """`subprocess.run` inside `ns`; bounded by `timeout` (default 60 s). Output captured as text unless
        the caller says otherwise."""
        kw.setdefault("timeout", CMD_TIMEOUT)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.ns_argv(ns, argv), **kw)

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """`subprocess.Popen` inside `ns`, in its own process group; killed at teardown."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.ns_argv(ns, argv), **kw)
        self._procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen, grace: float = KILL_GRACE) -> None:
        """Stop a process started by `popen`: SIGTERM to its group, SIGKILL after `grace` seconds."""
        _terminate(proc, grace)

    def sshd(self, extra_config: str = "", **kw: Any) -> SshServer:
        """Start a real sshd in the server namespace on the server's client-link addresses (v4 and v6)."""
        index = len(self._servers)
        server = SshServer(
            self.workdir / f"sshd{index}",
            host=self.server_client_side.v4,
            port=kw.pop("port", 22),
            netns=self.server,
            extra_config=extra_config,
            also_listen=kw.pop("also_listen", (self.server_client_side.v6,)),
            **kw,
        )
        self._servers.append(server)
        server.start()
        return server

    # -- link conditions -----------------------------------------------------------------------------------

    def netem(self, ns: str, dev: str, spec: str) -> None:
        """Impair egress of `dev` in `ns` like `tc netem` (e.g. "delay 50ms loss 1%"), replacing any previous
        impairment. Kernels built without sch_netem get the userspace stand-in of `benchmarks/impair.py`
        (delay and loss only, for traffic to the link's peer); `netem_backend` says which one is in use."""
        self.clear_netem(ns, dev)
        done = self.run(ns, ["tc", "qdisc", "replace", "dev", dev, "root", "netem", *spec.split()])
        if done.returncode == 0:
            self.netem_backend = "kernel sch_netem"
            return
        if "unknown" not in done.stderr.lower():
            raise LabError(f"tc netem {spec!r} on {dev} in {ns}: {done.stderr.strip()}")
        delay_ms, loss = _parse_netem(spec)
        self._impair_userspace(ns, dev, delay_ms, loss)
        self.netem_backend = "userspace (benchmarks/impair.py; kernel lacks sch_netem)"

    def clear_netem(self, ns: str, dev: str) -> None:
        """Remove any impairment of `dev` in `ns` (no error when none is set)."""
        self.run(ns, ["tc", "qdisc", "del", "dev", dev, "root"])
        impairment = self._impairments.pop((ns, dev), None)
        if impairment is None:
            return
        proc, table, peer = impairment
        self.run(ns, ["ip", "rule", "del", "priority", "5", "to", f"{peer.v4}/32", "lookup", str(table)])
        self.run(
            ns, ["ip", "-6", "rule", "del", "priority", "5", "to", f"{peer.v6}/128", "lookup", str(table)]
        )
        _terminate(proc)  # its TUN, and the routes through it, go with it

    def _link_peer(self, ns: str, dev: str) -> tuple[str, str, HostAddresses]:
        peers = {
            (self.client, self.client_if): (self.server, self.server_client_if, self.server_client_side),
            (self.server, self.server_client_if): (self.client, self.client_if, self.client_addr),
            (self.server, self.server_target_if): (self.target, self.target_if, self.target_addr),
            (self.target, self.target_if): (self.server, self.server_target_if, self.server_target_side),
        }
        try:
            return peers[(ns, dev)]
        except KeyError:
            raise LabError(f"{dev} in {ns} is not one of the lab's links") from None

    def _impair_userspace(self, ns: str, dev: str, delay_ms: float, loss: float) -> None:
        peer_ns, peer_dev, peer = self._link_peer(ns, dev)
        shown = subprocess.run(
            ["ip", "-n", peer_ns, "-j", "link", "show", peer_dev], capture_output=True, text=True, timeout=30
        )
        peer_mac = json.loads(shown.stdout)[0]["address"]
        index = next(self._impairment_ids)
        tun, table = f"imp{index}", 1000 + index
        argv = [
            sys.executable, str(IMPAIR_SCRIPT), "--tun", tun, "--dev", dev, "--peer-mac", peer_mac,
            "--delay-ms", str(delay_ms), "--loss", str(loss),
        ]  # fmt: skip
        proc = self.popen(ns, argv, stdout=subprocess.PIPE)
        self._impairments[(ns, dev)] = (proc, table, peer)
        try:
            wait_ready_line(proc, "impair.py")
            _ip("-n", ns, "link", "set", tun, "up")
            _ip("-n", ns, "route", "add", f"{peer.v4}/32", "dev", tun, "table", str(table))
            _ip("-n", ns, "-6", "route", "add", f"{peer.v6}/128", "dev", tun, "table", str(table))
            _ip("-n", ns, "rule", "add", "priority", "5", "to", f"{peer.v4}/32", "lookup", str(table))
            _ip("-n", ns, "-6", "rule", "add", "priority", "5", "to", f"{peer.v6}/128", "lookup", str(table))
        except (RuntimeError, LabError):
            self.clear_netem(ns, dev)
            raise

    def link_down(self, ns: str, dev: str) -> None:
        _ip("-n", self._check_ns(ns), "link", "set", dev, "down")

    def link_up(self, ns: str, dev: str) -> None:
        _ip("-n", self._check_ns(ns), "link", "set", dev, "up")

    def pin_remote(self, cpus: set[int]) -> int:
        """Move every thread now running in the server and target namespaces (sshd and its sessions, the
        target's services) onto `cpus`; returns how many threads moved. What they fork later inherits it
        (sshd's sessions); a service started again must be moved again (`BenchEnv.restart_iperf3` does).
        The client side keeps the CPUs it was started on: two CPU sets stand for two machines."""
        moved = 0
        for ns in (self.server, self.target):
            for pid in _namespace_pids(ns):
                for task in Path(f"/proc/{pid}/task").glob("*"):
                    with contextlib.suppress(ProcessLookupError, FileNotFoundError, ValueError):
                        os.sched_setaffinity(int(task.name), cpus)
                        moved += 1
        return moved

    # -- internals -----------------------------------------------------------------------------------------

    def _check_ns(self, ns: str) -> str:
        if ns not in self.namespaces:
            raise LabError(f"{ns!r} is not one of this lab's namespaces {self.namespaces}")
        return ns

    def _tc(self, ns: str, args: list[str]) -> None:
        done = self.run(ns, ["tc", *args])
        if done.returncode != 0:
            raise LabError(f"tc {' '.join(args)} in {ns}: {done.stderr.strip()}")

    def _sysctl(self, ns: str, key: str, value: str) -> None:
        done = self.run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])
        if done.returncode != 0:
            raise LabError(f"sysctl {key}={value} in {ns}: {done.stderr.strip()}")

    def _address(self, ns: str, dev: str, addr: HostAddresses) -> None:
        _ip("-n", ns, "addr", "add", f"{addr.v4}/24", "dev", dev)
        _ip("-n", ns, "addr", "add", f"{addr.v6}/64", "dev", dev, "nodad")
        _ip("-n", ns, "link", "set", dev, "up")

    def _resolv_conf(self, ns: str, nameservers: list[str]) -> None:
        directory = NETNS_ETC / ns
        directory.mkdir(parents=True, exist_ok=True)
        lines = "".join(f"nameserver {ns_addr}\n" for ns_addr in nameservers)
        (directory / "resolv.conf").write_text(f"# x2ssh lab {ns}\n{lines}")


# -- module helpers ----------------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=CMD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"ip {' '.join(args)}: {exc}") from exc
    if done.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _parse_netem(spec: str) -> tuple[float, float]:
    """(delay ms, loss %) from a netem spec such as "delay 50ms loss 1%" (the userspace subset)."""
    words = spec.split()
    delay_ms = loss = 0.0
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    i = 0
    while i < len(words):
        key, value = words[i], words[i + 1] if i + 1 < len(words) else ""
        if key == "delay":
            number = value.rstrip("usm")
            unit = value[len(number) :] or "us"  # netem's default unit is microseconds
            if unit not in units:
                raise LabError(f"netem delay {value!r}: unknown unit")
            delay_ms = float(number) * units[unit]
        elif key == "loss":
            loss = float(value.rstrip("%"))
        else:
            raise LabError(f"netem option {key!r} is not supported by the userspace fallback")
        i += 2
    return delay_ms, loss


def _netns_exists(ns: str) -> bool:
    return (Path("/run/netns") / ns).exists()


def list_lab_namespaces() -> list[str]:
    """Names of every lab namespace on this machine (any owner)."""
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    names = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX)]


def _terminate(proc: subprocess.Popen, grace: float = KILL_GRACE) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=KILL_GRACE)


def _namespace_pids(ns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _kill_namespace_pids(ns: str) -> None:
    """Kill whatever still runs inside `ns` (sshd sessions, daemons that detached): they were started by the
    lab, and a namespace with live processes would linger after `ip netns del`."""
    if not _netns_exists(ns):
        return
    pids = _namespace_pids(ns)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + KILL_GRACE
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            time.sleep(0.05)
        if not pids:
            return


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _owner_alive(ns: str) -> bool:
    parts = ns[len(PREFIX) :].split("-")
    if not parts or not parts[0].isdigit():
        return False
    return Path(f"/proc/{parts[0]}").exists()


def cleanup_stale(force: bool = False) -> list[str]:
    """Delete leftover `x2l-*` namespaces (and their /etc/netns dirs) whose owning process is gone; with
    `force`, delete every lab namespace. Returns the names removed."""
    removed = []
    for ns in list_lab_namespaces():
        if not force and _owner_alive(ns):
            continue
        _kill_namespace_pids(ns)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        removed.append(ns)
    if NETNS_ETC.is_dir():
        for leftover in NETNS_ETC.glob(f"{PREFIX}*"):
            if force or not _owner_alive(leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)
    if removed:
        log.info("removed stale lab namespaces: %s", ", ".join(removed))
    return removed


def _close_all_labs() -> None:
    with _live_lock:
        labs = list(_live_labs)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.close()


def _on_terminate(signum: int, frame: object) -> None:
    # Turn SIGTERM/SIGHUP into SystemExit so `with Lab()` blocks and finally clauses run their teardown.
    raise SystemExit(128 + signum)


def _install_safety_net() -> None:
    """atexit closes any lab still open; SIGTERM/SIGHUP (when nobody else handles them) exit cleanly."""
    global _safety_net_installed
    if _safety_net_installed:
        return
    _safety_net_installed = True
    atexit.register(_close_all_labs)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _on_terminate)
