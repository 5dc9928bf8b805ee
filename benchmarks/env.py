"""The benchmark environment: one lab, one sshd, the target's services, where logs go."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.lab import Lab
from benchmarks.services import (
    DNS_PORT,
    Service,
    start_dns_target,
    start_http,
    start_iperf3,
    start_tcp_echo,
    start_udp_echo,
)
from benchmarks.sshd import SshServer

log = logging.getLogger(__name__)


@dataclass
class BenchEnv:
    lab: Lab
    sshd: SshServer
    log_dir: Path
    services: dict[str, Service] = field(default_factory=dict)
    service_ports: dict[str, int] = field(default_factory=dict)
    download_file: str = ""
    download_size: int = 0
    download_sha256: str = ""
    server_cpus: set[int] | None = None  # where the server and target side runs (`Lab.pin_remote`)

    def restart_iperf3(self) -> None:
        """iperf3's server can stay "busy" after a client died mid-test; a fresh one fixes that."""
        self.services["iperf3"].stop()
        self.services["iperf3"] = start_iperf3(self.lab, self.lab.target, self.lab.target_addr.v4)
        self._pin_remote()

    def _pin_remote(self) -> None:
        if self.server_cpus is not None:
            self.lab.pin_remote(self.server_cpus)  # what sshd forks later (its sessions) inherits it


def build_env(lab: Lab, log_dir: Path, download_size: int, server_cpus: set[int] | None = None) -> BenchEnv:
    """Start sshd and the target's services inside an already built lab; with `server_cpus`, on those CPUs
    (the client side stays where the caller runs: two CPU sets stand for two machines)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    sshd = lab.sshd()
    env = BenchEnv(lab=lab, sshd=sshd, log_dir=log_dir, server_cpus=server_cpus)
    download = f"{download_size // (1024 * 1024)}m.bin" if download_size >= 1024 * 1024 else "dl.bin"
    http = start_http(lab, lab.target, sizes={"1k.bin": 1024, download: download_size})
    env.services = {
        "http": http,
        "echo": start_tcp_echo(lab, lab.target),
        "udp-echo": start_udp_echo(lab, lab.target),
        "iperf3": start_iperf3(lab, lab.target, lab.target_addr.v4),
        "dns": start_dns_target(lab),
    }
    env.service_ports = {name: svc.port for name, svc in env.services.items()}
    env.service_ports["dns"] = DNS_PORT
    env.download_file = download
    env.download_size = download_size
    env.download_sha256 = http.files[download].sha256
    env._pin_remote()
    return env
