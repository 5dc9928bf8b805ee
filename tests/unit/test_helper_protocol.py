"""The privileged helper's closed request list: exact acceptance, refusal of everything else, and a fuzz
of the validator and of the helper's dispatcher (which must answer every input without raising)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from x2ssh.host import helper_protocol as proto
from x2ssh.host.helper import PrivilegedHelper

GOOD_START = {
    "op": "start",
    "args": {
        "version": 1,
        "tun": "x2ssh0",
        "mtu": 65535,
        "excludes": ["198.18.0.0/15"],
        "kill_switch": False,
    },
}


def test_start_is_normalised():
    op, args = proto.validate(GOOD_START)
    assert op == "start" and args["excludes"] == ["198.18.0.0/15"] and args["kill_switch"] is False


@pytest.mark.parametrize(
    "message",
    [
        {"op": "start", "args": {**GOOD_START["args"], "tun": "x2ssh0; rm -rf /"}},
        {"op": "start", "args": {**GOOD_START["args"], "tun": "a" * 16}},
        {"op": "start", "args": {**GOOD_START["args"], "mtu": 70000}},
        {"op": "start", "args": {**GOOD_START["args"], "mtu": True}},
        {"op": "start", "args": {**GOOD_START["args"], "excludes": ["198.18.0.1/15"]}},  # host bits set
        {"op": "start", "args": {**GOOD_START["args"], "excludes": ["/etc/passwd"]}},
        {"op": "start", "args": {**GOOD_START["args"], "excludes": ["10.0.0.0/8"] * 300}},
        {"op": "start", "args": {**GOOD_START["args"], "kill_switch": 1}},
        {"op": "start", "args": {**GOOD_START["args"], "version": 2}},
        {"op": "start", "args": {**GOOD_START["args"], "path": "/etc/shadow"}},
        {"op": "start", "args": {k: v for k, v in GOOD_START["args"].items() if k != "tun"}},
        {"op": "exec", "args": {"argv": ["sh"]}},
        {"op": "marked_socket", "args": {"family": 10, "type": "stream"}},
        {"op": "marked_socket", "args": {"family": 4, "type": "raw"}},
        {"op": "dns", "args": {"servers": ["1.1.1.1", "2.2.2.2", "3.3.3.3", "4.4.4.4"]}},
        {"op": "dns", "args": {"servers": ["example.com"]}},
        {"op": "routes", "args": {"bypass": "198.18.0.1"}},
        {"op": "down", "args": [], "extra": 1},
        ["start"],
        "start",
        None,
    ],
)
def test_refused(message):
    with pytest.raises(proto.RequestRejected):
        proto.validate(message)


def test_decode_refuses_non_json():
    with pytest.raises(proto.RequestRejected):
        proto.decode(b"\xff\xfe not json")


def _random_value(rng: random.Random, depth: int = 0) -> object:
    choices = [
        lambda: rng.choice(list(proto.REQUESTS)),
        lambda: rng.randint(-(2**40), 2**40),
        lambda: rng.choice([True, False, None]),
        lambda: "".join(rng.choice("x2sh0./;-: \x00é") for _ in range(rng.randint(0, 20))),
        lambda: rng.choice(["198.18.0.0/15", "::/0", "fd00::1", "4", "stream", "dgram"]),
    ]
    if depth < 3:
        choices += [
            lambda: [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))],
            lambda: {
                rng.choice(["op", "args", "tun", "mtu", "excludes", "family", "type", "servers", "x"]): (
                    _random_value(rng, depth + 1)
                )
                for _ in range(rng.randint(0, 5))
            },
        ]
    return rng.choice(choices)()


def test_fuzz_validate_never_raises_anything_else():
    rng = random.Random(9)
    accepted = 0
    for _ in range(100_000):
        message = _random_value(rng)
        try:
            proto.validate(message)
            accepted += 1
        except proto.RequestRejected:
            pass
    assert accepted < 100_000


def test_fuzz_helper_answers_every_datagram_and_changes_nothing(tmp_path: Path):
    """Random datagrams (bytes, JSON of random shape, mutated good requests): every one gets a well-formed
    refusal; none reaches an operation that changes the host (all of those need a valid `start` first,
    which needs root and a free TUN name; refused here by making the requests out of order)."""
    helper = PrivilegedHelper(tmp_path)
    rng = random.Random(11)
    good = json.dumps({"op": "routes", "args": {"bypass": []}}).encode()
    for i in range(20_000):
        kind = i % 3
        if kind == 0:
            data = rng.randbytes(rng.randint(0, 64))
        elif kind == 1:
            data = json.dumps(_random_value(rng)).encode()
        else:
            data = bytearray(good)
            data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        reply, fd = helper.handle(data)
        assert fd is None
        assert set(reply) == {"ok", "error", "code"} and reply["ok"] is False, (data, reply)
    assert helper.done == set() and helper.journal is None


@pytest.mark.parametrize(
    ("op", "args", "why"),
    [
        ("open_tun", {}, "needs start first"),
        ("marked_socket", {"family": 4, "type": "stream"}, "needs start first"),
        ("routes", {"bypass": []}, "needs open_tun first"),
        ("dns", {"servers": ["100.100.83.53"]}, "needs open_tun first"),
        ("kill_switch", {}, "needs routes first"),
    ],
)
def test_out_of_order_requests_are_refused(tmp_path: Path, op, args, why):
    reply, fd = PrivilegedHelper(tmp_path).handle(json.dumps({"op": op, "args": args}).encode())
    assert reply["ok"] is False and why in reply["error"] and fd is None


def test_status_and_down_before_start_change_nothing(tmp_path: Path):
    helper = PrivilegedHelper(tmp_path)
    reply, _ = helper.handle(b'{"op":"status","args":{}}')
    assert reply == {
        "ok": True,
        "result": {"tun": None, "routing": "none", "dns": None, "kill_switch": False, "journal": None},
    }
    reply, _ = helper.handle(b'{"op":"down","args":{}}')
    assert reply == {"ok": True, "result": {"undone": []}} and helper.finished
