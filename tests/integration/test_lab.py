"""The namespace lab itself: isolation, real sshd with generated keys, port forwarding, DNS, teardown."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.lab import NETNS_ETC, Lab, LabError, cleanup_stale, list_lab_namespaces
from benchmarks.services import DNS_ZONE, TargetServices, wait_tcp_port
from benchmarks.sshd import SshServer

pytestmark = pytest.mark.netns

FORWARD_PORT = 18080


def _curl(lab: Lab, ns: str, url: str, out: Path | None = None) -> subprocess.CompletedProcess:
    argv = ["curl", "--silent", "--show-error", "--fail", "--connect-timeout", "3", "--max-time", "20", url]
    if out is not None:
        argv += ["--output", str(out)]
    return lab.run(ns, argv)


def test_client_cannot_reach_target_directly(lab: Lab, lab_services: TargetServices) -> None:
    http = lab_services.http
    for host in (lab.target_addr.v4, lab.target_addr.v6):
        # The service is up (the server reaches it) ...
        assert _curl(lab, lab.server, http.url(host, "1k.bin"), Path("/dev/null")).returncode == 0
        # ... yet the client, routed via the server, cannot: forwarding is off there.
        blocked = _curl(lab, lab.client, http.url(host, "1k.bin"), Path("/dev/null"))
        assert blocked.returncode != 0, f"client reached {host} without a tunnel"
    forwarding = lab.run(lab.server, ["sysctl", "-n", "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"])
    assert forwarding.stdout.split() == ["0", "0"]


def test_client_resolv_conf_points_at_server(lab: Lab) -> None:
    text = lab.run(lab.client, ["cat", "/etc/resolv.conf"]).stdout
    assert f"nameserver {lab.server_client_side.v4}" in text
    assert (NETNS_ETC / lab.client / "resolv.conf").read_text() == text


def test_ssh_from_client_with_generated_keys(lab: Lab, lab_sshd: SshServer) -> None:
    assert "StrictHostKeyChecking=yes" in lab_sshd.ssh_command()
    done = lab.run(lab.client, lab_sshd.ssh_command("echo", "hello-from-server"), timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello-from-server"

    v6 = lab.run(lab.client, ["ssh", *lab_sshd.ssh_options(), f"root@{lab.server_client_side.v6}", "true"])
    assert v6.returncode == 0, v6.stderr


def test_ssh_refuses_unknown_host_key(lab: Lab, lab_sshd: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    argv = lab_sshd.ssh_command("true")
    argv[argv.index(f"UserKnownHostsFile={lab_sshd.known_hosts}")] = f"UserKnownHostsFile={empty}"
    done = lab.run(lab.client, argv, timeout=30)
    assert done.returncode == 255
    assert "Host key verification failed" in done.stderr


def test_ssh_local_forward_fetches_small_file_byte_exact(
    lab: Lab, lab_sshd: SshServer, lab_services: TargetServices, tmp_path: Path
) -> None:
    target = lab.target_addr.v4
    spec = f"127.0.0.1:{FORWARD_PORT}:{target}:{lab_services.http.port}"
    tunnel = lab.popen(
        lab.client,
        lab_sshd.ssh_command("-N", "-o", "ExitOnForwardFailure=yes", "-L", spec),
        stderr=subprocess.PIPE,
    )
    try:
        wait_tcp_port(lab, lab.client, "127.0.0.1", FORWARD_PORT)
        out = tmp_path / "1k.bin"
        done = _curl(lab, lab.client, f"http://127.0.0.1:{FORWARD_PORT}/1k.bin", out)
        assert done.returncode == 0, done.stderr
        expected = lab_services.http.files["1k.bin"]
        assert out.stat().st_size == expected.size
        assert hashlib.sha256(out.read_bytes()).hexdigest() == expected.sha256
    finally:
        lab.kill(tunnel)


def test_server_side_resolver_answers_lab_zone(lab: Lab, lab_services: TargetServices) -> None:
    a = lab.run(lab.server, ["dig", "+short", "+time=2", "+tries=2", "@127.0.0.1", DNS_ZONE, "A"])
    assert a.stdout.split() == [lab.target_addr.v4], a.stdout + a.stderr
    # Through the namespace's resolv.conf (what an agent on the server would use), AAAA too.
    aaaa = lab.run(lab.server, ["dig", "+short", "+time=2", "+tries=2", f"target.{DNS_ZONE}", "AAAA"])
    assert aaaa.stdout.split() == [lab.target_addr.v6], aaaa.stdout + aaaa.stderr
    # The target's own server answers on its IPv6 address too.
    direct = lab.run(lab.server, ["dig", "+short", "+time=2", "+tries=2", f"@{lab.target_addr.v6}", DNS_ZONE])
    assert direct.stdout.split() == [lab.target_addr.v4], direct.stdout + direct.stderr


def test_hide_python3_server(lab: Lab) -> None:
    server = lab.sshd(hide_python3=True, port=0)
    try:
        probe = "command -v python3 || echo no-python3; test -e /usr/bin/python3 || echo no-usr-bin; uname -s"
        done = lab.run(lab.client, server.ssh_command(probe), timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["no-python3", "no-usr-bin", "Linux"]
    finally:
        server.stop()


def test_teardown_leaves_nothing(tmp_path: Path) -> None:
    lab = Lab()
    with lab:
        server = lab.sshd()
        session = lab.popen(lab.client, server.ssh_command("sleep", "300"))
        sleeper = lab.popen(lab.target, ["sleep", "300"])
        wait_tcp_port(lab, lab.client, lab.server_client_side.v4, server.port)
        assert set(lab.namespaces) <= set(list_lab_namespaces())
    assert not set(lab.namespaces) & set(list_lab_namespaces())
    assert not any((NETNS_ETC / ns).exists() for ns in lab.namespaces)
    assert session.poll() is not None and sleeper.poll() is not None
    assert not lab.workdir.exists()


def test_cleanup_stale_removes_only_orphans(lab: Lab) -> None:
    orphan = "x2l-4999999-dead-cli"  # owner pid above any pid_max: never alive
    subprocess.run(["ip", "netns", "add", orphan], check=True, timeout=30)
    (NETNS_ETC / orphan).mkdir(parents=True, exist_ok=True)
    try:
        removed = cleanup_stale()
        assert orphan in removed
        assert orphan not in list_lab_namespaces()
        assert not (NETNS_ETC / orphan).exists()
        assert set(lab.namespaces) <= set(list_lab_namespaces())
    finally:
        subprocess.run(["ip", "netns", "del", orphan], capture_output=True, timeout=30)


def test_netem_impairs_and_clears(lab: Lab, lab_sshd: SshServer) -> None:
    probe = [
        sys.executable, "-c",
        "import socket,sys\n"
        "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()\n"
        "except OSError:\n sys.exit(1)\n",
        lab.server_client_side.v4, str(lab_sshd.port),
    ]  # fmt: skip
    assert lab.run(lab.client, probe).returncode == 0
    lab.netem(lab.client, lab.client_if, "loss 100%")
    try:
        assert lab.run(lab.client, probe).returncode == 1, "a link losing every packet still connected"
    finally:
        lab.clear_netem(lab.client, lab.client_if)
    assert lab.run(lab.client, probe).returncode == 0
    assert "lookup 10" not in lab.run(lab.client, ["ip", "rule"]).stdout


def test_a_lab_that_fails_to_build_leaves_a_namespace_of_the_same_name_alone() -> None:
    lab = Lab()
    taken = lab.server  # the second name: the lab adds its first namespace, then fails
    subprocess.run(["ip", "netns", "add", taken], check=True, timeout=30)
    marker = NETNS_ETC / taken / "resolv.conf"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("# not the lab's\n")
    try:
        with pytest.raises(LabError, match="File exists"):
            lab.build()
        assert taken in list_lab_namespaces()
        assert marker.read_text() == "# not the lab's\n"
        assert lab.client not in list_lab_namespaces()  # what it did add, it removed
    finally:
        subprocess.run(["ip", "netns", "del", taken], capture_output=True, timeout=30)
        (NETNS_ETC / taken / "resolv.conf").unlink(missing_ok=True)
        (NETNS_ETC / taken).rmdir()


def _affinity_of_each_thread(pid: int) -> list[set[int]]:
    return [os.sched_getaffinity(int(task.name)) for task in Path(f"/proc/{pid}/task").glob("*")]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to tell the two sides apart")
def test_pin_remote_moves_the_server_and_target_side_and_what_they_fork_later(lab: Lab) -> None:
    client_cpus = os.sched_getaffinity(0)
    remote = {max(client_cpus)}
    # A threaded process on the target side (all its threads move) and a parent on the server side whose
    # child, forked after the pinning, inherits it (as sshd's sessions do).
    threaded = lab.popen(lab.target, [sys.executable, "-c", THREADS_THEN_WAIT], stdout=subprocess.PIPE)
    parent = lab.popen(lab.server, [sys.executable, "-c", FORK_ON_INPUT], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)  # fmt: skip
    client = lab.popen(lab.client, ["sleep", "60"])
    try:
        assert threaded.stdout is not None and threaded.stdout.readline()  # its threads are up
        assert lab.pin_remote(remote) >= 3
        assert all(cpus == remote for cpus in _affinity_of_each_thread(threaded.pid))
        assert os.sched_getaffinity(parent.pid) == remote
        assert parent.stdin is not None and parent.stdout is not None
        parent.stdin.write("fork\n")
        parent.stdin.flush()
        child = int(parent.stdout.readline())
        assert os.sched_getaffinity(child) == remote
        assert os.sched_getaffinity(client.pid) == client_cpus  # the client side is not touched
    finally:
        for proc in (threaded, parent, client):
            lab.kill(proc)


THREADS_THEN_WAIT = """
import threading, time
for _ in range(2):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("up", flush=True)
time.sleep(60)
"""

FORK_ON_INPUT = """
import os, sys, time
sys.stdin.readline()
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
time.sleep(60)
"""
