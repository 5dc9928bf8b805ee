"""Start-up failures against a real sshd: a clear message, a non-zero exit, and nothing changed on the
client (issue 3). Plus ProxyJump through a second sshd."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.lab import Lab
from benchmarks.services import TargetServices
from benchmarks.sshd import SshServer
from tests.integration.vpn_runner import (
    REPO,
    NetSnapshot,
    VpnLauncher,
    curl,
    snapshot,
    state_dir_for,
    x2ssh_env,
)

pytestmark = pytest.mark.netns


def run_x2ssh(lab: Lab, *args: str, timeout: float = 60) -> tuple[int, str]:
    argv = [sys.executable, "-m", "x2ssh", "--vpn", "--state-dir", str(state_dir_for(lab)), *args]
    done = lab.run(
        lab.client, argv, cwd=REPO, env=x2ssh_env(), timeout=timeout, capture_output=True, text=True
    )
    return done.returncode, done.stdout + done.stderr


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
    return path


def base_args(server: SshServer, known_hosts: Path | None = None, key: Path | None = None) -> list[str]:
    return [
        "-p", str(server.port), "-i", str(key or server.client_key),
        "-o", f"UserKnownHostsFile={known_hosts or server.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        f"root@{server.host}",
    ]  # fmt: skip


def test_unknown_host_key_is_refused(
    lab: Lab, lab_sshd: SshServer, client_baseline: NetSnapshot, tmp_path
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    code, output = run_x2ssh(lab, *base_args(lab_sshd, known_hosts=empty))
    assert code != 0
    assert "host key" in output and "refusing" in output, output
    assert "Traceback" not in output
    assert snapshot(lab) == client_baseline


def test_changed_host_key_is_refused(
    lab: Lab, lab_sshd: SshServer, client_baseline: NetSnapshot, tmp_path
) -> None:
    other_key = keygen(tmp_path / "other_host_key")
    lines = lab_sshd.known_hosts.read_text().split()
    forged = tmp_path / "known_hosts"
    forged.write_text(f"{lines[0]} {other_key.with_suffix('.pub').read_text().strip()}\n")
    code, output = run_x2ssh(lab, *base_args(lab_sshd, known_hosts=forged))
    assert code != 0 and "host key" in output, output
    assert snapshot(lab) == client_baseline


def test_authentication_failure(
    lab: Lab, lab_sshd: SshServer, client_baseline: NetSnapshot, tmp_path
) -> None:
    stranger = keygen(tmp_path / "stranger")  # a client key sshd has never seen
    code, output = run_x2ssh(lab, *base_args(lab_sshd, key=stranger))
    assert code != 0 and "authentication failed" in output, output
    assert snapshot(lab) == client_baseline


def test_unreachable_server(lab: Lab, lab_sshd: SshServer, client_baseline: NetSnapshot) -> None:
    args = base_args(lab_sshd)
    args[1] = "1"  # nothing listens on port 1
    code, output = run_x2ssh(lab, *args, "-o", "ConnectTimeout=5")
    assert code != 0 and "cannot reach the SSH server" in output, output
    assert snapshot(lab) == client_baseline


def test_bad_cidr_is_a_usage_error(lab: Lab, lab_sshd: SshServer, client_baseline: NetSnapshot) -> None:
    code, output = run_x2ssh(lab, "--vpn-exclude", "198.18.0.0/33", *base_args(lab_sshd))
    assert code == 2 and "198.18.0.0/33" in output, output
    assert snapshot(lab) == client_baseline


def test_proxy_jump(
    lab: Lab, lab_sshd: SshServer, lab_services: TargetServices, vpn_launcher: VpnLauncher
) -> None:
    """Through a jump host: the client connects only to the jump sshd, which reaches the final server."""
    jump = lab.sshd(port=0)
    # One key and one known_hosts for both hops, as a user's ~/.ssh would have.
    jump.authorized_keys.write_text(lab_sshd.authorized_keys.read_text())
    with lab_sshd.known_hosts.open("a") as known:
        known.write(jump.known_hosts.read_text())
    vpn = vpn_launcher.start(lab_sshd, "-J", f"root@{jump.host}:{jump.port}", "--vpn-dns", "off")
    done = curl(lab, lab_services.http.url(lab.target_addr.v4, "1k.bin"), "--fail", "--output", "/dev/null")
    assert done.returncode == 0, done.stderr + vpn.describe()
    assert "routing policy" in vpn.output, vpn.describe()  # the first hop rides a marked socket
