"""The ways a benchmark client reaches the target: x2ssh and its baselines.

Each transport has `start(env)` / `stop()`, says where a client must run and what it must dial to reach a
target service (`reach`), which link the loss scenario degrades (`lossy_links`) and which local processes it
costs (`client_pids`). A transport that cannot run raises `TransportUnavailable` from `start`; the harness
records the reason and carries on. Nothing is ever faked.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from benchmarks.env import BenchEnv
from benchmarks.procstat import OutputWatcher, with_descendants
from benchmarks.services import ServiceError, wait_tcp_port

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
FORWARD_SCRIPT = Path(__file__).with_name("asyncssh_forward.py")
START_TIMEOUT = 40.0
STOP_GRACE = 15.0

# Capabilities a scenario may require.
TCP, UDP, LOSS, SCALE = "tcp", "udp", "loss", "scale"

# Local ports used by the port-forwarding baselines, per target service.
FORWARDED_PORTS = {"http": 18080, "echo": 18007, "iperf3": 15201}


# x2ssh's first choice (x2ssh.ssh.connect). Every SSH baseline is given it too (OpenSSH's default is
# chacha20-poly1305, which costs OpenSSH about twice the CPU per byte here), so a ratio compares the
# implementations, not the ciphers.
BASELINE_CIPHER = "aes128-gcm@openssh.com"


class TransportUnavailable(RuntimeError):
    """This transport cannot run on this machine or did not come up; the message says why."""


@dataclass(frozen=True)
class Endpoint:
    """Where a client runs (`ns`) and what it dials (`host`, `port`) to reach a target service.

    `wrapper` goes before the client's argv (a SOCKS transport's `proxychains4 -f CONF`); `socks` is that
    transport's SOCKS5 proxy, for clients that speak SOCKS themselves."""

    ns: str
    host: str
    port: int
    wrapper: tuple[str, ...] = ()
    socks: tuple[str, int] | None = None

    def argv(self, argv: list[str]) -> list[str]:
        """The client command as this endpoint needs it run."""
        return [*self.wrapper, *argv]


class Transport:
    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]]
    description: ClassVar[str]

    def __init__(self) -> None:
        self.env: BenchEnv | None = None
        self.proc: subprocess.Popen | None = None

    def start(self, env: BenchEnv) -> None:
        self.env = env

    def stop(self) -> None:
        if self.proc is not None and self.env is not None:
            self.env.lab.kill(self.proc)
        self.proc = None

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def reach(self, service: str) -> Endpoint:
        """Client namespace + address for `service` ("http", "echo", "iperf3", "udp-echo", "dns")."""
        env = self._env()
        return Endpoint(env.lab.client, env.lab.target_addr.v4, env.service_ports[service])

    def lossy_links(self) -> list[tuple[str, str]]:
        """(namespace, device) pairs whose egress the loss scenario degrades: the client-server link."""
        lab = self._env().lab
        return [(lab.client, lab.client_if), (lab.server, lab.server_client_if)]

    def client_pids(self) -> list[int]:
        """The transport's own processes on the client side (CPU and memory are charged to these)."""
        return with_descendants([self.proc.pid]) if self.proc and self.proc.poll() is None else []

    def _env(self) -> BenchEnv:
        if self.env is None:
            raise RuntimeError(f"transport {self.name} used before start()")
        return self.env

    def _log_path(self) -> Path:
        return self._env().log_dir / f"transport-{self.name}.log"

    def _spawn_ssh(self, args: list[str]) -> None:
        """OpenSSH's client with `args`, to the lab's sshd, in the client namespace; output to the log."""
        env = self._env()
        with open(self._log_path(), "ab") as log_file:  # the child keeps its own copy of the descriptor
            self.proc = env.lab.popen(
                env.lab.client, env.sshd.ssh_command(*args), stdout=log_file, stderr=log_file
            )

    def _spawn_watched(self, argv: list[str], pattern: str, **kw: object) -> OutputWatcher:
        """Start argv in the client namespace and wait (bounded) for a line matching `pattern`."""
        env = self._env()
        self.proc = env.lab.popen(
            env.lab.client, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw
        )
        watcher = OutputWatcher(self.proc, self._log_path(), pattern)
        if not watcher.wait(START_TIMEOUT):
            code = self.proc.poll()
            state = f"exited with {code}" if code is not None else f"no {pattern!r} within {START_TIMEOUT}s"
            self.stop()
            raise TransportUnavailable(f"{state}; last output:\n{watcher.tail_text()}")
        return watcher


class Direct(Transport):
    """No tunnel: the client runs in the server namespace next to the target (the ceiling)."""

    name = "direct"
    capabilities = frozenset({TCP, UDP, LOSS})
    description = "no tunnel, from the server namespace"

    def reach(self, service: str) -> Endpoint:
        env = self._env()
        return Endpoint(env.lab.server, env.lab.target_addr.v4, env.service_ports[service])

    def lossy_links(self) -> list[tuple[str, str]]:
        lab = self._env().lab
        return [(lab.server, lab.server_target_if), (lab.target, lab.target_if)]

    def client_pids(self) -> list[int]:
        return []


class _PortForwarding(Transport):
    """Common shape of the port-forwarding baselines: TCP services on 127.0.0.1 in the client namespace."""

    capabilities = frozenset({TCP, LOSS})

    def reach(self, service: str) -> Endpoint:
        env = self._env()
        if service not in FORWARDED_PORTS:
            raise TransportUnavailable(f"{self.name} forwards only {sorted(FORWARDED_PORTS)}")
        return Endpoint(env.lab.client, "127.0.0.1", FORWARDED_PORTS[service])

    def _forward_specs(self) -> list[str]:
        env = self._env()
        target = env.lab.target_addr.v4
        return [
            f"127.0.0.1:{port}:{target}:{env.service_ports[svc]}" for svc, port in FORWARDED_PORTS.items()
        ]

    def _wait_forwards(self) -> None:
        env = self._env()
        try:
            for port in FORWARDED_PORTS.values():
                wait_tcp_port(env.lab, env.lab.client, "127.0.0.1", port, timeout=START_TIMEOUT)
        except ServiceError as exc:
            self.stop()
            raise TransportUnavailable(str(exc)) from exc


class SshLocalForward(_PortForwarding):
    name = "ssh-L"
    description = f"OpenSSH ssh -N -L (-c {BASELINE_CIPHER})"

    def start(self, env: BenchEnv) -> None:
        super().start(env)
        args = ["-N", "-c", BASELINE_CIPHER, "-o", "ExitOnForwardFailure=yes"]
        for spec in self._forward_specs():
            args += ["-L", spec]
        self._spawn_ssh(args)
        self._wait_forwards()


class AsyncsshLocalForward(_PortForwarding):
    name = "asyncssh-L"
    description = "asyncssh forward_local_port (Python ceiling)"

    def start(self, env: BenchEnv) -> None:
        super().start(env)
        sshd = env.sshd
        argv = [
            sys.executable, str(FORWARD_SCRIPT), "--host", sshd.host, "--port", str(sshd.port),
            "--user", sshd.user, "--key", str(sshd.client_key), "--known-hosts", str(sshd.known_hosts),
            "--cipher", BASELINE_CIPHER,
        ]  # fmt: skip
        for spec in self._forward_specs():
            argv += ["--forward", spec]
        self._spawn_watched(argv, r"^ready")


class Sshuttle(Transport):
    name = "sshuttle"
    capabilities = frozenset({TCP, LOSS})
    description = f"sshuttle (nat method, ssh -c {BASELINE_CIPHER}), TCP only"

    def start(self, env: BenchEnv) -> None:
        super().start(env)
        ssh_cmd = shlex.join(["ssh", *env.sshd.ssh_options(), "-c", BASELINE_CIPHER])
        argv = ["sshuttle", "-r", env.sshd.destination, "198.19.0.0/24", "--ssh-cmd", ssh_cmd]
        self._spawn_watched(argv, r"Connected to server")


class SshTun(Transport):
    """OpenSSH layer-3 tunnel (`ssh -w`): TCP over TCP. Needs IP forwarding on the server while it runs,
    so it turns forwarding on at start and off again at stop; the client routes only the target's subnet
    into the tun, so nothing else takes the direct path meanwhile."""

    name = "ssh-w"
    capabilities = frozenset({LOSS})
    description = f"OpenSSH ssh -w (tun, TCP over TCP, -c {BASELINE_CIPHER})"
    tun = "tun0"
    client_tun_addr = "198.18.1.2"
    server_tun_addr = "198.18.1.1"
    tun_net = "198.18.1.0/30"

    def start(self, env: BenchEnv) -> None:
        super().start(env)
        lab = env.lab
        args = [
            "-N",
            "-c",
            BASELINE_CIPHER,
            "-w",
            "0:0",
            "-o",
            "Tunnel=point-to-point",
            "-o",
            "ExitOnForwardFailure=yes",
        ]
        log_file = open(self._log_path(), "ab")  # noqa: SIM115 - handed to the child process
        self.proc = lab.popen(lab.client, env.sshd.ssh_command(*args), stdout=log_file, stderr=log_file)
        log_file.close()
        try:
            for ns in (lab.client, lab.server):
                self._wait_tun(ns)
            self._must(lab.client, "ip", "addr", "add", self.client_tun_addr, "peer", self.server_tun_addr,
                       "dev", self.tun)  # fmt: skip
            self._must(lab.server, "ip", "addr", "add", self.server_tun_addr, "peer", self.client_tun_addr,
                       "dev", self.tun)  # fmt: skip
            for ns in (lab.client, lab.server):
                self._must(ns, "ip", "link", "set", self.tun, "up")
            self._must(lab.client, "ip", "route", "add", "198.19.0.0/24", "dev", self.tun)
            self._must(lab.target, "ip", "route", "add", self.tun_net, "via", lab.server_target_side.v4)
            self._must(lab.server, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        except TransportUnavailable:
            self.stop()
            raise

    def stop(self) -> None:
        if self.env is not None:
            lab = self.env.lab
            lab.run(lab.server, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
            lab.run(lab.target, ["ip", "route", "del", self.tun_net])
        super().stop()

    def _wait_tun(self, ns: str) -> None:
        lab = self._env().lab
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if lab.run(ns, ["ip", "link", "show", self.tun]).returncode == 0:
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.1)
        tail = self._log_path().read_text(errors="replace")[-800:] if self._log_path().exists() else ""
        raise TransportUnavailable(f"{self.tun} did not appear in {ns}; ssh output:\n{tail}")

    def _must(self, ns: str, *argv: str) -> None:
        done = self._env().lab.run(ns, list(argv))
        if done.returncode != 0:
            raise TransportUnavailable(f"{' '.join(argv)} in {ns}: {done.stderr.strip()}")


class X2ssh(Transport):
    """`python -m x2ssh --vpn` in the client namespace; clients then dial the target's real address."""

    name = "x2ssh"
    capabilities = frozenset({TCP, UDP, LOSS, SCALE})
    description = "x2ssh --vpn (lwIP + asyncssh)"

    def start(self, env: BenchEnv) -> None:
        super().start(env)
        sshd = env.sshd
        argv = [
            sys.executable, "-m", "x2ssh", "--vpn", "-F", str(sshd.ssh_config), "-i", str(sshd.client_key),
            "-p", str(sshd.port), "--vpn-dns", "off", sshd.destination,
        ]  # fmt: skip
        self._spawn_watched(argv, r"VPN up", cwd=str(REPO_ROOT))

    def stop(self) -> None:
        if self.proc is None or self.env is None:
            return
        lab = self.env.lab
        lab.kill(self.proc, grace=STOP_GRACE)  # SIGTERM: x2ssh restores routes, DNS and the TUN itself
        if self.proc.returncode == -9:  # had to be killed: undo what it left behind
            cleanup = [sys.executable, "-m", "x2ssh", "--vpn-cleanup"]
            done = lab.run(lab.client, cleanup, cwd=str(REPO_ROOT))
            log.warning("x2ssh needed SIGKILL; --vpn-cleanup exited %d", done.returncode)
        self.proc = None


# -- SOCKS5 proxies (`ssh -D`, `x2ssh -D`) ----------------------------------------------------------------

SOCKS_PORT = 11080


class _SocksProxy(Transport):
    """A SOCKS5 proxy in the client namespace; the unchanged clients (iperf3, ab, curl, the Python clients)
    reach it through proxychains-ng, which hooks their connect() (LD_PRELOAD, C) and does the SOCKS5
    handshake before handing the socket back. Clients dial the target's real address, as with the VPN.

    proxychains does that handshake blocking, one connect at a time per process, and in small writes that
    stall on delayed ACKs (about 40 ms per connection, through either proxy): fine for the long iperf3
    flows, useless for a connection rate. So the HTTP rate client speaks SOCKS5 itself (`Endpoint.socks`),
    and ApacheBench, which cannot, does not run through these transports."""

    capabilities = frozenset({TCP})
    _conf: Path  # the proxychains configuration, written by start()

    def start(self, env: BenchEnv) -> None:
        super().start(env)
        if shutil.which("proxychains4") is None:
            raise TransportUnavailable("proxychains4 is not installed (apt-get install proxychains4)")
        self._conf = env.log_dir / f"proxychains-{self.name}.conf"
        self._conf.write_text(
            "strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n"
            f"[ProxyList]\nsocks5 127.0.0.1 {SOCKS_PORT}\n"
        )

    def reach(self, service: str) -> Endpoint:
        env = self._env()
        wrapper = ("proxychains4", "-q", "-f", str(self._conf))
        socks = ("127.0.0.1", SOCKS_PORT)
        return Endpoint(env.lab.client, env.lab.target_addr.v4, env.service_ports[service], wrapper, socks)

    def _wait_proxy(self) -> None:
        env = self._env()
        try:
            wait_tcp_port(env.lab, env.lab.client, "127.0.0.1", SOCKS_PORT, timeout=START_TIMEOUT)
        except ServiceError as exc:
            self.stop()
            raise TransportUnavailable(str(exc)) from exc


class SshDynamic(_SocksProxy):
    name = "ssh-D"
    description = f"OpenSSH ssh -N -D (SOCKS5, -c {BASELINE_CIPHER}) via proxychains"

    def start(self, env: BenchEnv) -> None:
        super().start(env)
        self._spawn_ssh(
            ["-N", "-c", BASELINE_CIPHER, "-o", "ExitOnForwardFailure=yes", "-D", f"127.0.0.1:{SOCKS_PORT}"]
        )
        self._wait_proxy()


class X2sshDynamic(_SocksProxy):
    name = "x2ssh-D"
    description = "x2ssh -D (SOCKS5 proxy, asyncssh) via proxychains"

    def start(self, env: BenchEnv) -> None:
        super().start(env)
        sshd = env.sshd
        argv = [
            sys.executable, "-m", "x2ssh", "-D", f"127.0.0.1:{SOCKS_PORT}", "-F", str(sshd.ssh_config),
            "-i", str(sshd.client_key), "-p", str(sshd.port), sshd.destination,
        ]  # fmt: skip
        self._spawn_watched(argv, r"proxy up", cwd=str(REPO_ROOT))


ALL_TRANSPORTS: dict[str, type[Transport]] = {
    cls.name: cls
    for cls in (
        Direct,
        SshLocalForward,
        AsyncsshLocalForward,
        Sshuttle,
        SshTun,
        X2ssh,
        SshDynamic,
        X2sshDynamic,
    )
}
