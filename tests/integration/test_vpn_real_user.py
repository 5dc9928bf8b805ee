"""x2ssh started as a laptop user would (issue 9): a normal account with a passphrase key in her own
ssh-agent, her own ssh_config (a Host alias) and known_hosts, real sudo. Namespace lab, real sshd.

Each run ends with the client namespace byte-identical to before (routes, rules, links, resolv.conf).
"""

from __future__ import annotations

import pwd
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.lab import Lab
from benchmarks.services import TargetServices
from benchmarks.sshd import SshServer
from tests.integration.laptop_user import LaptopUser, run_processes, vpn_as
from tests.integration.vpn_runner import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    NetSnapshot,
    VpnProcess,
    curl,
    snapshot,
    wait_until,
)

pytestmark = pytest.mark.netns

EXIT_SIGHUP = 128 + signal.SIGHUP


@pytest.fixture(scope="module")
def alice(lab_sshd: SshServer) -> Iterator[LaptopUser]:
    user = LaptopUser.create(lab_sshd)
    try:
        yield user
    finally:
        user.remove()
    assert not user.sudoers.exists()


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective uid
    raise AssertionError(f"no Uid line for {pid}")


def fetch_through_tunnel(lab: Lab, services: TargetServices, vpn: VpnProcess) -> None:
    done = curl(lab, services.http.url(lab.target_addr.v4, "1k.bin"), "--fail", "--output", "/dev/null")
    assert done.returncode == 0, done.stderr + vpn.describe()


@pytest.mark.parametrize(
    ("how", "stop", "code"),
    [
        ("plain", signal.SIGINT, EXIT_SIGINT),
        ("sudo -E", signal.SIGTERM, EXIT_SIGTERM),
        ("sudo --preserve-env", signal.SIGTERM, EXIT_SIGTERM),
    ],
)
def test_user_runs_the_vpn_with_her_own_identity(
    lab: Lab,
    lab_sshd: SshServer,
    lab_services: TargetServices,
    client_baseline: NetSnapshot,
    alice: LaptopUser,
    how: str,
    stop: int,
    code: int,
) -> None:
    """Her Host alias, agent key and known_hosts are used; SSH and the data plane run as her, only the
    helper as root; the tunnel carries traffic; the stop signal restores everything."""
    vpn = vpn_as(lab, lab_sshd, alice, how).start()
    try:
        fetch_through_tunnel(lab, lab_services, vpn)
        roles = run_processes(vpn)
        user_uid = pwd.getpwnam(alice.name).pw_uid
        assert roles["x2ssh"], vpn.describe()
        assert {uid_of(p) for p in roles["x2ssh"]} == {user_uid}, vpn.describe()
        assert roles["helper"] and {uid_of(p) for p in roles["helper"]} == {0}, vpn.describe()
        vpn.send_signal(stop)
        assert vpn.wait() == code, vpn.describe()
    finally:
        vpn.stop()
    assert snapshot(lab) == client_baseline, snapshot(lab).differences(client_baseline)


def test_plain_sudo_explains_the_missing_agent_and_changes_nothing(
    lab: Lab, lab_sshd: SshServer, client_baseline: NetSnapshot, alice: LaptopUser
) -> None:
    vpn = vpn_as(lab, lab_sshd, alice, "sudo").start(wait_up=False)
    try:
        code = vpn.wait(60)
    finally:
        vpn.stop()
    assert code != 0, vpn.describe()
    assert "SSH_AUTH_SOCK" in vpn.output and "--preserve-env=SSH_AUTH_SOCK" in vpn.output, vpn.describe()
    assert "VPN up" not in vpn.output
    assert snapshot(lab) == client_baseline, snapshot(lab).differences(client_baseline)


def test_sighup_is_an_orderly_shutdown(
    lab: Lab, lab_sshd: SshServer, client_baseline: NetSnapshot, alice: LaptopUser
) -> None:
    """Closing the terminal: SIGHUP restores routes and DNS like Ctrl-C does."""
    vpn = vpn_as(lab, lab_sshd, alice, "plain").start()
    try:
        assert snapshot(lab) != client_baseline
        vpn.send_signal(signal.SIGHUP)
        assert vpn.wait() == EXIT_SIGHUP, vpn.describe()
    finally:
        vpn.stop()
    assert snapshot(lab) == client_baseline, snapshot(lab).differences(client_baseline)


def test_sigkill_of_x2ssh_is_undone_by_the_helper(
    lab: Lab, lab_sshd: SshServer, client_baseline: NetSnapshot, alice: LaptopUser
) -> None:
    """The user-side process dies without a word: its helper sees the socket close and undoes everything,
    with no --vpn-cleanup needed."""
    vpn = vpn_as(lab, lab_sshd, alice, "plain").start()
    try:
        helpers = run_processes(vpn)["helper"]
        assert helpers, vpn.describe()
        vpn.kill()
        assert wait_until(lambda: snapshot(lab) == client_baseline, 20), snapshot(lab).differences(
            client_baseline
        )
        assert wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in helpers), 20)
    finally:
        vpn.stop()


def test_proxy_command_is_refused_before_anything_changes(
    lab: Lab, lab_sshd: SshServer, client_baseline: NetSnapshot
) -> None:
    bob = LaptopUser.create(lab_sshd, proxy_command="nc %h %p")
    try:
        vpn = vpn_as(lab, lab_sshd, bob, "plain").start(wait_up=False)
        try:
            code = vpn.wait(60)
        finally:
            vpn.stop()
    finally:
        bob.remove()
    assert code == 78, vpn.describe()
    assert "ProxyCommand" in vpn.output and "ProxyJump" in vpn.output, vpn.describe()
    assert snapshot(lab) == client_baseline, snapshot(lab).differences(client_baseline)


def test_a_user_sudo_refuses_gets_a_clear_error_and_nothing_changes(
    lab: Lab, lab_sshd: SshServer, client_baseline: NetSnapshot
) -> None:
    """Not in sudoers: the helper cannot start; x2ssh says why and changes nothing."""
    frank = LaptopUser.create(lab_sshd, sudo=False)
    try:
        vpn = vpn_as(lab, lab_sshd, frank, "plain").start(wait_up=False)
        try:
            code = vpn.wait(60)
        finally:
            vpn.stop()
    finally:
        frank.remove()
    assert code == 77, vpn.describe()
    assert "privileged helper" in vpn.output and "sudo" in vpn.output, vpn.describe()
    assert snapshot(lab) == client_baseline, snapshot(lab).differences(client_baseline)
