"""Services the lab runs inside its namespaces: HTTP files, TCP/UDP echo, iperf3, dnsmasq.

Every service is started through `Lab.popen`, so lab teardown kills it even when `stop()` is never called.
Each starter waits (bounded) until the service accepts traffic, and raises `ServiceError` otherwise.

`start_target_services(lab)` starts the standard set used by tests and benchmarks. In the target namespace:
HTTP on port 80 (files `1k.bin` and `big.bin`, 100 MiB by default, with known sha256), TCP and UDP echo on
port 7, iperf3 on 5201, dnsmasq on port 53 of the target's addresses answering `lab.test` and
`target.lab.test` (A and AAAA of the target). In the server namespace: a dnsmasq on 127.0.0.1 (the server's
resolv.conf) that forwards `lab.test` to the target's. Port 9 on the target is closed (nothing listens).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.lab import Lab
from benchmarks.procstat import wait_ready_line

log = logging.getLogger(__name__)

READY_TIMEOUT = 15.0
SERVERS_SCRIPT = Path(__file__).with_name("lab_servers.py")

HTTP_PORT = 80
ECHO_PORT = 7
UDP_ECHO_PORT = 7
IPERF_PORT = 5201
DNS_PORT = 53
CLOSED_PORT = 9
DNS_ZONE = "lab.test"


class ServiceError(RuntimeError):
    """A lab service failed to start: a fault of the lab machine, not of the code under test."""


@dataclass
class Service:
    """A running service; `stop()` ends it (lab teardown does too)."""

    name: str
    ns: str
    port: int
    proc: subprocess.Popen
    lab: Lab

    def stop(self) -> None:
        self.lab.kill(self.proc)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


@dataclass(frozen=True)
class ServedFile:
    name: str
    size: int
    sha256: str


@dataclass
class HttpService(Service):
    """HTTP/1.1 file server; `files` maps URL path name (e.g. "1k.bin") to its size and sha256."""

    directory: Path = Path()
    files: dict[str, ServedFile] = field(default_factory=dict)

    def url(self, host: str, name: str) -> str:
        """URL of `name` on `host` (IPv6 literals are bracketed)."""
        netloc = f"[{host}]" if ":" in host else host
        return f"http://{netloc}:{self.port}/{name}"


@dataclass
class TargetServices:
    """The standard service set of a lab (see module docstring)."""

    http: HttpService
    tcp_echo: Service
    udp_echo: Service
    iperf3: Service
    dns_target: Service
    dns_server: Service
    closed_port: int = CLOSED_PORT

    def stop(self) -> None:
        for svc in (self.http, self.tcp_echo, self.udp_echo, self.iperf3, self.dns_target, self.dns_server):
            svc.stop()


# -- file generation ---------------------------------------------------------------------------------------


def generate_file(path: Path, size: int, seed: bytes = b"x2ssh-lab") -> ServedFile:
    """Write `size` pseudo-random bytes (incompressible, deterministic per name) and return their sha256."""
    digest = hashlib.sha256()
    block_seed = hashlib.sha256(seed + path.name.encode()).digest()
    with open(path, "wb") as f:
        remaining, counter = size, 0
        while remaining > 0:
            # SHAKE output is fast and deterministic; content must not compress (ssh compression, netem).
            block = hashlib.shake_256(block_seed + counter.to_bytes(8, "big")).digest(min(remaining, 1 << 20))
            f.write(block)
            digest.update(block)
            remaining -= len(block)
            counter += 1
    return ServedFile(path.name, size, digest.hexdigest())


# -- starters ----------------------------------------------------------------------------------------------


def _script_argv(kind: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, str(SERVERS_SCRIPT), kind, "--port", str(port), *extra]


def _wait_ready_line(proc: subprocess.Popen, name: str) -> None:
    """Wait for the "ready" line that lab_servers.py prints once it listens."""
    try:
        wait_ready_line(proc, name, READY_TIMEOUT)
    except RuntimeError as exc:
        raise ServiceError(str(exc)) from exc


def wait_tcp_port(lab: Lab, ns: str, host: str, port: int, timeout: float = READY_TIMEOUT) -> None:
    """Wait until `host:port` accepts TCP connections as seen from inside `ns` (bounded)."""
    code = (
        "import socket,sys,time\n"
        "h,p,t=sys.argv[1],int(sys.argv[2]),float(sys.argv[3]);end=time.monotonic()+t\n"
        "while time.monotonic()<end:\n"
        " try:\n"
        "  socket.create_connection((h,p),timeout=1).close();sys.exit(0)\n"
        " except OSError:\n"
        "  time.sleep(0.05)\n"
        "sys.exit(1)\n"
    )
    done = lab.run(ns, [sys.executable, "-c", code, host, str(port), str(timeout)], timeout=timeout + 10)
    if done.returncode != 0:
        raise ServiceError(f"nothing accepts on [{host}]:{port} in {ns} after {timeout}s")


def start_http(lab: Lab, ns: str, port: int = HTTP_PORT, sizes: dict[str, int] | None = None) -> HttpService:
    """Serve generated files over HTTP/1.1 on every address of `ns` (default: 1k.bin, big.bin of 100 MiB)."""
    sizes = sizes if sizes is not None else {"1k.bin": 1024, "big.bin": 100 * 1024 * 1024}
    directory = lab.workdir / f"http-{ns}-{port}"
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: generate_file(directory / name, size) for name, size in sizes.items()}
    proc = lab.popen(ns, _script_argv("http", port, "--dir", str(directory)), stdout=subprocess.PIPE)
    _wait_ready_line(proc, "http server")
    log.debug("http on %s:%d serving %s", ns, port, list(files))
    return HttpService("http", ns, port, proc, lab, directory=directory, files=files)


def start_tcp_echo(lab: Lab, ns: str, port: int = ECHO_PORT) -> Service:
    proc = lab.popen(ns, _script_argv("tcp-echo", port), stdout=subprocess.PIPE)
    _wait_ready_line(proc, "tcp echo")
    return Service("tcp-echo", ns, port, proc, lab)


def start_udp_echo(lab: Lab, ns: str, port: int = UDP_ECHO_PORT) -> Service:
    proc = lab.popen(ns, _script_argv("udp-echo", port), stdout=subprocess.PIPE)
    _wait_ready_line(proc, "udp echo")
    return Service("udp-echo", ns, port, proc, lab)


def start_iperf3(lab: Lab, ns: str, host: str, port: int = IPERF_PORT) -> Service:
    """iperf3 server (dual-stack) in `ns`; `host` is the address used to check readiness."""
    logf = open(lab.workdir / f"iperf3-{ns}-{port}.log", "wb")  # noqa: SIM115 - owned by the process
    proc = lab.popen(ns, ["iperf3", "-s", "-p", str(port)], stdout=logf, stderr=subprocess.STDOUT)
    logf.close()
    wait_tcp_port(lab, ns, host, port)
    return Service("iperf3", ns, port, proc, lab)


def _dnsmasq_argv(lab: Lab, name: str, listen: list[str], extra: list[str]) -> list[str]:
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-hosts",
        "--no-resolv",
        "--bind-interfaces",
        "--user=root",
        f"--port={DNS_PORT}",
        f"--pid-file={lab.workdir / f'dnsmasq-{name}.pid'}",
        f"--log-facility={lab.workdir / f'dnsmasq-{name}.log'}",
    ]
    argv += [f"--listen-address={addr}" for addr in listen]
    return argv + extra


def start_dns_target(lab: Lab) -> Service:
    """dnsmasq on the target's addresses, answering `lab.test` itself (A/AAAA of the target), no upstream."""
    t = lab.target_addr
    records = [
        f"--host-record={DNS_ZONE},{t.v4},{t.v6}",
        f"--host-record=target.{DNS_ZONE},{t.v4},{t.v6}",
        f"--local=/{DNS_ZONE}/",
    ]
    proc = lab.popen(lab.target, _dnsmasq_argv(lab, "target", [t.v4, t.v6], records))
    wait_tcp_port(lab, lab.target, t.v4, DNS_PORT)
    return Service("dns-target", lab.target, DNS_PORT, proc, lab)


def start_dns_server_side(lab: Lab) -> Service:
    """dnsmasq on 127.0.0.1 in the server namespace (its resolv.conf) forwarding `lab.test` to the target."""
    forward = [f"--server=/{DNS_ZONE}/{lab.target_addr.v4}"]
    proc = lab.popen(lab.server, _dnsmasq_argv(lab, "server", ["127.0.0.1"], forward))
    wait_tcp_port(lab, lab.server, "127.0.0.1", DNS_PORT)
    return Service("dns-server", lab.server, DNS_PORT, proc, lab)


def start_target_services(lab: Lab, big_file_size: int = 100 * 1024 * 1024) -> TargetServices:
    """Start the standard service set (see module docstring)."""
    t = lab.target
    return TargetServices(
        http=start_http(lab, t, sizes={"1k.bin": 1024, "big.bin": big_file_size}),
        tcp_echo=start_tcp_echo(lab, t),
        udp_echo=start_udp_echo(lab, t),
        iperf3=start_iperf3(lab, t, lab.target_addr.v4),
        dns_target=start_dns_target(lab),
        dns_server=start_dns_server_side(lab),
    )
