"""The privileged helper as a real root process in the lab's client namespace, fed by a hostile client:
fuzzed and out-of-scope requests are refused and change nothing; a proper run is undone when the client's
socket closes (as when x2ssh is SIGKILLed)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from benchmarks.lab import Lab
from tests.integration.vpn_runner import NetSnapshot, snapshot, state_dir_for, wait_until

pytestmark = pytest.mark.netns


class RawHelper:
    """A helper process and the client end of its socket, with no client-side validation at all."""

    def __init__(self, lab: Lab) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "x2ssh.host.helper", "--state-dir", str(state_dir_for(lab))]
        self.proc = subprocess.Popen(lab.ns_argv(lab.client, argv), stdin=theirs, stderr=subprocess.DEVNULL)
        theirs.close()
        self.sock.settimeout(30)

    def ask(self, data: bytes) -> tuple[dict, list[int]]:
        self.sock.sendmsg([data])
        msg, fds, _, _ = socket.recv_fds(self.sock, 65536, 4)
        return json.loads(msg), fds

    def close(self) -> int:
        self.sock.close()
        return self.proc.wait(30)


@pytest.fixture
def helper(lab: Lab) -> Iterator[RawHelper]:
    raw = RawHelper(lab)
    try:
        yield raw
    finally:
        raw.sock.close()
        if raw.proc.poll() is None:
            raw.proc.kill()
            raw.proc.wait(10)


def request(op: str, **args: object) -> bytes:
    return json.dumps({"op": op, "args": args}).encode()


START = {"version": 1, "tun": "x2fz0", "mtu": 1500, "excludes": [], "kill_switch": False}

OUT_OF_SCOPE = [
    request("exec", argv=["/bin/sh", "-c", "id"]),
    request("start", **{**START, "tun": "lo"}),  # an existing interface
    request("start", **{**START, "tun": "../../etc"}),
    request("start", **START, state_dir="/etc"),
    request("routes", bypass=[]),  # before open_tun
    request("dns", servers=["100.100.83.53"]),  # before open_tun
    request("kill_switch"),  # not requested
    request("marked_socket", family=4, type="raw"),
    request("dns", servers=["1.1.1.1", "1.0.0.1", "9.9.9.9", "8.8.8.8"]),
    b"\x00" * 17000,  # larger than a request may be
    b"{",
    b"",
]


def fuzzed(rng: random.Random, count: int) -> Iterator[bytes]:
    templates = [request("start", **START), request("routes", bypass=["198.18.0.1"]), request("marked_socket",
                 family=4, type="stream")]  # fmt: skip
    for i in range(count):
        if i % 2:
            yield rng.randbytes(rng.randint(1, 200))
        else:
            data = bytearray(rng.choice(templates))
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(32, 127)
            yield bytes(data)


def test_fuzzed_and_out_of_scope_requests_change_nothing(
    lab: Lab, client_baseline: NetSnapshot, helper: RawHelper
) -> None:
    rng = random.Random(1)
    refused = accepted = 0
    for data in [*OUT_OF_SCOPE, *fuzzed(rng, 3000)]:
        if not data:
            continue  # an empty datagram reads as end of file on the other side
        reply, fds = helper.ask(data)
        for fd in fds:
            os.close(fd)
        if reply["ok"]:
            accepted += 1  # a mutation that is still a valid request (e.g. a changed digit)
        else:
            refused += 1
            assert isinstance(reply["error"], str) and reply["error"]
    assert refused > 2900
    assert helper.close() == 0
    assert snapshot(lab) == client_baseline, snapshot(lab).differences(client_baseline)


def test_a_run_is_undone_when_the_client_goes_away(
    lab: Lab, client_baseline: NetSnapshot, helper: RawHelper
) -> None:
    assert helper.ask(request("start", **START))[0]["ok"]
    reply, fds = helper.ask(request("open_tun"))
    assert reply["ok"] and len(fds) == 1
    tun_fd = fds[0]
    assert helper.ask(request("routes", bypass=[]))[0]["result"]["mode"] == "policy"
    assert helper.ask(request("dns", servers=["100.100.83.53"]))[0]["ok"]
    again, _ = helper.ask(request("routes", bypass=[]))
    assert not again["ok"] and "already done" in again["error"]
    reply, fds = helper.ask(request("marked_socket", family=4, type="stream"))
    marked = socket.socket(fileno=fds[0])
    assert marked.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == reply["result"]["mark"] == 0x7832
    marked.close()
    assert snapshot(lab) != client_baseline
    helper.sock.close()  # x2ssh died: no "down", just end of file
    assert helper.proc.wait(30) == 0
    os.close(tun_fd)
    restored = wait_until(lambda: snapshot(lab) == client_baseline, 10)
    assert restored, snapshot(lab).differences(client_baseline)
