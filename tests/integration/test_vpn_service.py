"""x2ssh as a service (issue 13): sd_notify to a real NOTIFY_SOCKET listener, `x2ssh status [--json]` and
`x2ssh down` over the control socket, as root and as the user who started the run. Namespace lab."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.lab import Lab
from benchmarks.services import TargetServices
from benchmarks.sshd import SshServer
from tests.integration.laptop_user import LaptopUser, vpn_as
from tests.integration.vpn_runner import (
    NetSnapshot,
    VpnProcess,
    curl,
    kill_connection,
    snapshot,
    vpn_argv,
    wait_until,
    x2ssh_env,
)
from x2ssh.host.rundir import RUN_ROOT
from x2ssh.status_report import check_status

pytestmark = pytest.mark.netns

NOT_RUNNING = 3
DENIED = 77


class NotifyListener:
    """What systemd would be: a datagram socket that collects sd_notify messages in order."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.path.chmod(0o666)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def collect(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                return self.messages

    def wait_for(self, prefix: str, timeout: float) -> bool:
        return wait_until(lambda: any(m.startswith(prefix) for m in self.collect()), timeout)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    made = NotifyListener(tmp_path)
    try:
        yield made
    finally:
        made.sock.close()


def x2ssh_cli(lab: Lab, *args: str, user: LaptopUser | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "x2ssh", *args]
    if user is not None:
        argv = [*user.setpriv(), *argv]
    return lab.run(lab.client, argv, env=x2ssh_env(), timeout=60)


def test_ready_status_and_down_as_root(
    lab: Lab,
    lab_sshd: SshServer,
    lab_services: TargetServices,
    client_baseline: NetSnapshot,
    listener: NotifyListener,
) -> None:
    """READY=1 comes only once the tunnel carries traffic; STATUS= lines follow; `x2ssh status --json`
    answers with the documented schema, also after a reconnect; `x2ssh down` restores everything."""
    argv = ["env", f"NOTIFY_SOCKET={listener.path}", *vpn_argv(lab_sshd, ["--retry-initial", "0.3"])]
    vpn = VpnProcess(lab, lab_sshd, argv=argv).start(wait_up=False)
    try:
        assert listener.wait_for("READY=1", 45), vpn.describe()
        ok = curl(lab, lab_services.http.url(lab.target_addr.v4, "1k.bin"), "--fail", "--output", "/dev/null")
        assert ok.returncode == 0, vpn.describe()
        assert listener.wait_for("STATUS=up", 10), listener.messages
        done = x2ssh_cli(lab, "status", "--json")
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert check_status(doc) == [], doc
        assert doc["state"] == "up" and doc["tun"]["name"] == "x2ssh0" and doc["routing"] == "policy"
        assert doc["tcp"]["total"] >= 1 and doc["ssh_connections"]
        kill_connection(lab_sshd)
        assert wait_until(lambda: "reconnected" in vpn.output, 30), vpn.describe()
        again = json.loads(x2ssh_cli(lab, "status", "--json").stdout)
        assert again["reconnects"] == 1 and again["state"] == "up", again
        table = x2ssh_cli(lab, "status")
        assert table.returncode == 0 and "x2ssh0" in table.stdout, table.stdout + table.stderr
        down = x2ssh_cli(lab, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert vpn.wait() in (0, 143), vpn.describe()
    finally:
        vpn.stop()
    assert listener.wait_for("STOPPING=1", 5), listener.messages
    messages = listener.messages
    assert messages.index("READY=1") < messages.index("STOPPING=1")
    assert snapshot(lab) == client_baseline, snapshot(lab).differences(client_baseline)
    assert not (RUN_ROOT / f"ns-{lab.client}").exists()  # the run's directory went with it
    nothing = x2ssh_cli(lab, "status")
    assert nothing.returncode == NOT_RUNNING and "no x2ssh is running" in nothing.stderr + nothing.stdout


def test_status_for_the_user_who_started_it_and_nobody_else(
    lab: Lab, lab_sshd: SshServer, client_baseline: NetSnapshot
) -> None:
    dave = LaptopUser.create(lab_sshd)
    other = LaptopUser.create(lab_sshd)
    try:
        vpn = vpn_as(lab, lab_sshd, dave).start()
        try:
            mine = x2ssh_cli(lab, "status", "--json", user=dave)
            assert mine.returncode == 0, mine.stderr
            assert json.loads(mine.stdout)["state"] == "up"
            theirs = x2ssh_cli(lab, "status", "--json", user=other)
            assert theirs.returncode == DENIED, theirs.stdout + theirs.stderr
            down = x2ssh_cli(lab, "down", user=dave)
            assert down.returncode == 0, down.stdout + down.stderr
            deadline = time.monotonic() + 30
            while vpn.running and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not vpn.running, vpn.describe()
        finally:
            vpn.stop()
    finally:
        dave.remove()
        other.remove()
    assert snapshot(lab) == client_baseline, snapshot(lab).differences(client_baseline)
    assert not (RUN_ROOT / f"ns-{lab.client}").exists()
