"""Fuzz of the SOCKS5 / HTTP CONNECT request parser: over 100,000 inputs (random bytes, mutated valid
handshakes, truncations, random chunking). The parser may only ever raise its own `ProtocolError`, never
hold more than `MAX_BUFFER` bytes, and any request it yields must be well formed."""

from __future__ import annotations

import base64
import ipaddress
import random

from x2ssh.frontends.socks_protocol import (
    MAX_BUFFER,
    NEED_DATA,
    AddressType,
    Credentials,
    ProtocolError,
    Reply,
    Request,
    ServerConnection,
    UdpDatagram,
    parse_udp_datagram,
)

CREDS = Credentials("user", "pass")
AUTH_HEADER = b"Proxy-Authorization: Basic " + base64.b64encode(b"user:pass") + b"\r\n"

VALID = [
    b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
    b"\x05\x02\x00\x02\x05\x01\x00\x03\x0btarget.test\x01\xbb",
    b"\x05\x01\x00\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x16",
    b"\x05\x01\x00\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00",
    b"\x05\x01\x00\x05\x02\x00\x01\x0a\x00\x00\x01\x00\x15",
    b"CONNECT target.test:443 HTTP/1.1\r\nHost: target.test:443\r\nUser-Agent: fuzz\r\n\r\n",
    b"CONNECT [fd00::1]:22 HTTP/1.0\r\n\r\nearly",
    b"CONNECT 10.1.2.3:8080 HTTP/1.1\n\n",
]
VALID_AUTH = [
    b"\x05\x01\x02\x01\x04user\x04pass\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
    b"CONNECT target.test:443 HTTP/1.1\r\n" + AUTH_HEADER + b"\r\n",
]
INTERESTING = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0xFF, 0x0A, 0x0D, 0x20, 0x3A, 0x5B, 0x5D, 0x7F, 0x80]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a byte
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 1 and buf:  # an edge value
            buf[min(pos, len(buf) - 1)] = rng.choice(INTERESTING)
        elif op == 2:  # insert
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3:  # delete
            del buf[pos : pos + rng.randint(1, 8)]
        elif op == 4:  # truncate
            del buf[pos:]
        else:  # repeat a piece
            buf[pos:pos] = buf[pos : pos + rng.randint(1, 64)] * rng.randint(1, 300)
    return bytes(buf)


def check_request(request: Request) -> None:
    assert 0 <= request.port <= 0xFFFF
    if request.address_type is AddressType.DOMAIN:
        assert 0 < len(request.host) <= 255 and request.host.isascii() and " " not in request.host
    else:
        ipaddress.ip_address(request.host)


def drive(data: bytes, credentials: Credentials | None, rng: random.Random) -> str:
    """Feed `data` in random chunks then EOF; return how it ended."""
    conn = ServerConnection(credentials)
    pos = 0
    eof = False
    try:
        while True:
            if pos < len(data):
                size = rng.choice((1, 2, 3, 7, 64, 4096, len(data)))
                conn.receive_data(data[pos : pos + size])
                pos += size
            else:
                conn.receive_data(b"")
                eof = True
            assert conn.buffered <= MAX_BUFFER
            event = conn.next_event()
            assert conn.buffered <= MAX_BUFFER
            conn.data_to_send()
            if isinstance(event, Request):
                check_request(event)
                code = rng.choice(list(Reply))
                conn.reply(code)
                if code == Reply.SUCCEEDED:
                    assert len(conn.trailing_data()) <= MAX_BUFFER
                return "request"
            assert event is NEED_DATA
            if eof:
                return "need-data-after-eof"  # unreachable: EOF mid-handshake is an error
    except ProtocolError as exc:
        assert isinstance(exc.reply, bytes)
        assert conn.buffered <= MAX_BUFFER
        return "refused"


def test_fuzz_request_parser_100k() -> None:
    rng = random.Random(0x7832)
    outcomes: dict[str, int] = {}
    total = 0
    for i in range(105_000):
        kind = i % 5
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 80)))
        elif kind == 1:  # random bytes after a plausible first byte
            data = bytes([rng.choice((0x05, 0x43))]) + bytes(
                rng.randrange(256) for _ in range(rng.randint(0, 80))
            )
        elif kind == 2:  # truncation of a valid handshake
            valid = rng.choice(VALID)
            data = valid[: rng.randrange(len(valid) + 1)]
        else:
            data = mutate(rng, rng.choice(VALID + VALID_AUTH))
        credentials = CREDS if rng.random() < 0.3 else None
        result = drive(data, credentials, rng)
        assert result != "need-data-after-eof"
        outcomes[result] = outcomes.get(result, 0) + 1
        total += 1
    assert total >= 100_000
    # The corpus really exercises both paths.
    assert outcomes["request"] > 5_000 and outcomes["refused"] > 50_000, outcomes


def test_fuzz_oversized_input_is_bounded() -> None:
    rng = random.Random(7)
    for _ in range(200):
        conn = ServerConnection()
        prefix = rng.choice((b"CONNECT ", b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50", b"C"))
        try:
            conn.receive_data(prefix)
            conn.next_event()
            fed = 0
            while fed <= 2 * MAX_BUFFER:
                chunk = rng.randbytes(rng.choice((1, 500, 5000, 65536)))
                fed += len(chunk)
                conn.receive_data(chunk)
                assert conn.buffered <= MAX_BUFFER
                conn.next_event()
        except ProtocolError:
            pass
        else:
            raise AssertionError("more than MAX_BUFFER bytes were accepted")
        assert conn.buffered <= MAX_BUFFER


def test_fuzz_valid_inputs_are_accepted() -> None:
    rng = random.Random(1)
    for data in VALID:
        for _ in range(50):
            assert drive(data, None, rng) == "request"
    for data in VALID_AUTH:
        for _ in range(50):
            assert drive(data, CREDS, rng) == "request"


def test_fuzz_udp_datagram_parser() -> None:
    rng = random.Random(3)
    seeds = [b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x07hello", b"\x00\x00\x00\x03\x04echo\x00\x07x"]
    parsed = 0
    for i in range(30_000):
        data = (
            mutate(rng, rng.choice(seeds))
            if i % 2
            else bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        )
        try:
            datagram = parse_udp_datagram(data)
        except ProtocolError:
            continue
        assert isinstance(datagram, UdpDatagram) and data[2] == 0
        assert datagram.payload == data[len(data) - len(datagram.payload) :]
        parsed += 1
    assert parsed > 1000
