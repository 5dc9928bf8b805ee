"""The agent framing codec: round trips, the exact wire format, and every malformed-frame case."""

from __future__ import annotations

import struct

import pytest

from agent import protocol as p

TOKEN = bytes(range(32))

FRAMES = [
    p.Hello(1, 1, TOKEN),
    p.Hello(1, 7, TOKEN),
    p.Welcome(1, 1024, "x2ssh-agent/1 python/3.8.18"),
    p.Welcome(1, 0, ""),
    p.OpenFlow(1, ("198.18.0.2", 53)),
    p.OpenFlow(0xFFFFFFFF, ("fd58:3278:7373:1::2", 65535)),
    p.OpenFlow(7, p.SERVER_RESOLVER),
    p.Datagram(1, None, b""),
    p.Datagram(2, None, b"x"),
    p.Datagram(3, ("198.19.0.2", 5353), b"reply"),
    p.Datagram(4, ("fd58:3278:7373:2::2", 1), bytes(range(256)) * 4),
    p.Datagram(5, ("198.19.0.2", 7), b"\xab" * p.MAX_PAYLOAD),
    p.Datagram(6, ("fd58:3278:7373:2::2", 7), b"\xcd" * p.MAX_PAYLOAD),
    p.CloseFlow(9, p.CLOSE_IDLE),
    p.CloseFlow(10, 200),
    p.Keepalive(0, False),
    p.Keepalive(0xFFFFFFFF, True),
    p.Error(p.ERR_BAD_FRAME, "bad frame"),
    p.Error(p.ERR_INTERNAL, "é" * 10),
    p.Goodbye(),
    # Version 2.
    p.Unreachable(1, p.UNREACH_PORT, 0, "198.19.0.2"),
    p.Unreachable(2, p.UNREACH_PROHIBITED, 65535, "fd58:3278:7373:2::2"),
    p.Unreachable(3, 200, 7, None),
    p.OpenEcho(4, "198.19.0.2"),
    p.OpenEcho(0xFFFFFFFF, "fd58:3278:7373:2::2"),
    p.Echo(5, 0, b""),
    p.Echo(6, 65535, b"\x00" * 56),
    p.Echo(7, 1, b"\xee" * p.MAX_PAYLOAD),
    p.Resume(),
]


def frame(frame_type: int, body: bytes) -> bytes:
    return struct.pack("!IB", len(body), frame_type) + body


def decode_one(data: bytes) -> p.Frame:
    decoder = p.Decoder()
    frames = decoder.feed(data)
    decoder.eof()
    assert len(frames) == 1
    return frames[0]


def assert_malformed(data: bytes, reason_part: str) -> None:
    decoder = p.Decoder()
    with pytest.raises(p.ProtocolError) as info:
        decoder.feed(data)
        decoder.eof()
    assert reason_part in info.value.reason
    with pytest.raises(p.ProtocolError):  # the decoder stays failed
        decoder.feed(b"")


@pytest.mark.parametrize("frame_obj", FRAMES, ids=lambda f: type(f).__name__)
def test_round_trip(frame_obj: p.Frame) -> None:
    assert decode_one(p.encode(frame_obj)) == frame_obj


def test_all_frames_in_one_chunk_and_byte_by_byte() -> None:
    stream = b"".join(p.encode(f) for f in FRAMES)
    assert p.Decoder().feed(stream) == FRAMES
    decoder = p.Decoder()
    frames = []
    for i in range(len(stream)):
        frames.extend(decoder.feed(stream[i : i + 1]))
    decoder.eof()
    assert frames == FRAMES
    assert decoder.buffered == 0


def test_wire_format_is_exact() -> None:
    # length 4+7+3, type 0x11, flow id 258, IPv4 198.19.0.2 port 53, payload.
    assert p.encode_datagram(258, b"abc", ("198.19.0.2", 53)) == bytes.fromhex(
        "0000000e11" + "00000102" + "04c6130002" + "0035" + "616263"
    )
    assert p.encode(p.OpenFlow(1, p.SERVER_RESOLVER)) == bytes.fromhex("000000051000000001" + "52")
    assert p.encode(p.Goodbye()) == bytes.fromhex("0000000022")
    hello = p.encode(p.Hello(1, 2, TOKEN))
    assert hello[:11] == bytes.fromhex("0000002601") + b"X2SA" + b"\x01\x02"


def test_encode_datagram_matches_generic_encoder() -> None:
    frame_obj = p.Datagram(42, ("198.19.0.2", 9), b"data")
    assert p.encode(frame_obj) == p.encode_datagram(42, b"data", ("198.19.0.2", 9))


def test_ipv6_address_is_canonical_and_scope_is_dropped() -> None:
    data = p.encode_datagram(1, b"", ("FD58:3278:7373:0002:0000:0000:0000:0002", 7))
    assert decode_one(data).peer == ("fd58:3278:7373:2::2", 7)
    assert decode_one(p.encode_datagram(1, b"", ("fe80::1%eth0", 7))).peer == ("fe80::1", 7)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: p.encode_datagram(1, b"x" * (p.MAX_PAYLOAD + 1)), "exceeds"),
        (lambda: p.encode_datagram(0, b"x"), "flow id"),
        (lambda: p.encode_datagram(1, b"x", ("example.org", 53)), "not an IP address"),
        (lambda: p.encode_datagram(1, b"x", ("198.18.0.1", 0)), "port"),
        (lambda: p.encode(p.Hello(1, 1, b"short")), "token"),
        (lambda: p.encode(p.OpenFlow(1, None)), "destination"),
    ],
)
def test_encoder_rejects_caller_mistakes(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


# --- malformed input: every case is the peer's fault and raises ProtocolError ----------------------------


def test_truncated_frame_at_end_of_stream() -> None:
    data = p.encode(p.CloseFlow(1, 0))
    for cut in range(1, len(data)):
        decoder = p.Decoder()
        assert decoder.feed(data[:cut]) == []
        with pytest.raises(p.ProtocolError, match="truncated frame at end of stream"):
            decoder.eof()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack("!IB", p.MAX_BODY + 1, p.DATAGRAM), "oversized frame"),
        (struct.pack("!IB", 0xFFFFFFFF, p.DATAGRAM), "oversized frame"),
        (struct.pack("!IB", 39, p.HELLO), "oversized frame"),
        (struct.pack("!IB", 6, p.CLOSE_FLOW), "oversized frame"),
        (struct.pack("!IB", 1, p.GOODBYE), "oversized frame"),
        (struct.pack("!IB", 24, p.OPEN_FLOW), "oversized frame"),
        (struct.pack("!IB", 2 + p.MAX_ERROR_MESSAGE + 1, p.ERROR), "oversized frame"),
        (struct.pack("!IB", 6 + p.MAX_SOFTWARE, p.WELCOME), "oversized frame"),
        (
            frame(p.DATAGRAM, b"\0\0\0\1\x04\xc6\x13\0\2\0\x07" + b"x" * (p.MAX_PAYLOAD + 1)),
            "oversized datagram",
        ),
    ],
)
def test_oversized(data: bytes, reason: str) -> None:
    # Rejected from the header alone: the body is never waited for.
    assert_malformed(data[:5] if reason == "oversized frame" else data, reason)


@pytest.mark.parametrize("frame_type", [0x00, 0x03, 0x16, 0x24, 0x7F, 0xFF])
def test_unknown_type(frame_type: int) -> None:
    assert_malformed(frame(frame_type, b""), "unknown frame type")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"X2SA\x00\x01" + TOKEN, "bad version range"),
        (b"X2SA\x03\x02" + TOKEN, "bad version range"),
        (b"X2SB\x01\x01" + TOKEN, "bad HELLO magic"),
        (b"X2SA\x01\x01" + TOKEN[:31], "bad token length"),
        (b"X2SA\x01\x01", "bad token length"),
        (b"X2S", "truncated HELLO"),
    ],
)
def test_bad_hello(body: bytes, reason: str) -> None:
    assert_malformed(frame(p.HELLO, body), reason)


def test_version_negotiation() -> None:
    assert p.negotiate_version(p.Hello(1, 1, TOKEN)) == 1
    assert p.negotiate_version(p.Hello(1, 9, TOKEN)) == p.MAX_VERSION
    with pytest.raises(p.ProtocolError) as info:
        p.negotiate_version(p.Hello(p.MAX_VERSION + 1, p.MAX_VERSION + 5, TOKEN))
    assert info.value.code == p.ERR_UNSUPPORTED_VERSION
    assert "no common version" in info.value.reason


def test_token_comparison() -> None:
    assert p.token_matches(TOKEN, bytes(range(32)))
    assert not p.token_matches(TOKEN, bytes(32))
    assert not p.token_matches(TOKEN, TOKEN[:31])


@pytest.mark.parametrize(
    ("frame_type", "body", "reason"),
    [
        (p.OPEN_FLOW, b"\0\0\0\1\x05\1\2\3\4\0\1", "bad address kind"),
        (p.OPEN_FLOW, b"\0\0\0\1\xff", "bad address kind"),
        (p.DATAGRAM, b"\0\0\0\1\x01", "bad address kind"),
        (p.OPEN_FLOW, b"\0\0\0\1\x04\1\2\3", "truncated address"),
        (p.OPEN_FLOW, b"\0\0\0\1\x04\1\2\3\4\0", "truncated address"),
        (p.OPEN_FLOW, b"\0\0\0\1\x06" + bytes(17), "truncated address"),
        (p.DATAGRAM, b"\0\0\0\1\x06" + bytes(15), "truncated address"),
        (p.DATAGRAM, b"\0\0\0\1", "truncated address"),
        (p.OPEN_FLOW, b"\0\0\0\1", "truncated address"),
        (p.OPEN_FLOW, b"\0\0\0\1\x04\1\2\3\4\0\0", "port 0"),
        (p.OPEN_FLOW, b"\0\0\0\1\x00", "without destination"),
        (p.OPEN_FLOW, b"\0\0\0\1\x04\1\2\3\4\0\1\0", "trailing bytes"),
        (p.DATAGRAM, b"\0\0\0\1\x52payload", "server resolver"),
        (p.DATAGRAM, b"\0\0\0\0\x00payload", "flow id 0"),
        (p.DATAGRAM, b"\0\0\0", "truncated DATAGRAM"),
        (p.CLOSE_FLOW, b"\0\0\0\0\0", "flow id 0"),
        (p.CLOSE_FLOW, b"\0\0\0\1", "bad CLOSE_FLOW length"),
        (p.KEEPALIVE, b"\0\0\0\1\2", "reply flag"),
        (p.KEEPALIVE, b"\0\0\0\1", "bad KEEPALIVE length"),
        (p.WELCOME, b"\1\0\0", "truncated WELCOME"),
        (p.ERROR, b"\0", "truncated ERROR"),
    ],
)
def test_bad_bodies(frame_type: int, body: bytes, reason: str) -> None:
    assert_malformed(frame(frame_type, body), reason)


def test_valid_frames_before_an_error_are_lost_with_the_stream() -> None:
    # The connection is closed on the first error, so the decoder does not need to return earlier frames.
    decoder = p.Decoder()
    with pytest.raises(p.ProtocolError):
        decoder.feed(p.encode(p.Goodbye()) + frame(0x99, b""))
    with pytest.raises(p.ProtocolError):
        decoder.eof()


def test_undecodable_text_is_replaced_not_fatal() -> None:
    assert decode_one(frame(p.ERROR, b"\0\1\xff\xfe")) == p.Error(1, "\ufffd\ufffd")


def test_dns_destinations() -> None:
    assert p.is_dns_destination(p.SERVER_RESOLVER)
    assert p.is_dns_destination(("198.19.0.2", 53))
    assert not p.is_dns_destination(("198.19.0.2", 5353))


# --- version 2 frames ---------------------------------------------------------------------------------


def test_v2_wire_format_is_exact() -> None:
    assert p.encode(p.Unreachable(0x01020304, p.UNREACH_PORT, 0x0506, "198.19.0.2")) == (
        frame(p.UNREACHABLE, b"\x01\x02\x03\x04\x02\x05\x06\x04\xc6\x13\x00\x02")
    )
    assert p.encode(p.Unreachable(1, p.UNREACH_HOST, 0, None)) == frame(p.UNREACHABLE, b"\0\0\0\1\1\0\0\0")
    assert p.encode(p.OpenEcho(9, "::1")) == frame(p.OPEN_ECHO, b"\0\0\0\x09\x06" + bytes(15) + b"\1")
    assert p.encode(p.Echo(9, 0x0A0B, b"ping")) == frame(p.ECHO, b"\0\0\0\x09\x0a\x0bping")
    assert p.encode(p.Resume()) == frame(p.RESUME, b"")
    assert p.MAX_VERSION == 2 and p.VERSION_ICMP == 2


@pytest.mark.parametrize(
    ("frame_type", "body", "reason"),
    [
        (p.UNREACHABLE, b"\0\0\0\1\2\0", "truncated UNREACHABLE"),
        (p.UNREACHABLE, b"\0\0\0\1\2\0\0", "truncated address"),
        (p.UNREACHABLE, b"\0\0\0\0\2\0\0\0", "flow id 0"),
        (p.UNREACHABLE, b"\0\0\0\1\2\0\0\x04\1\2\3", "truncated address"),
        (p.UNREACHABLE, b"\0\0\0\1\2\0\0\x52", "bad host address kind"),
        (p.UNREACHABLE, b"\0\0\0\1\2\0\0\0\0", "trailing bytes"),
        (p.OPEN_ECHO, b"\0\0\0\1\0", "without destination"),
        (p.OPEN_ECHO, b"\0\0\0\1", "truncated address"),
        (p.OPEN_ECHO, b"\0\0\0\1\x04\1\2\3\4\0", "trailing bytes"),
        (p.OPEN_ECHO, b"\0\0\0\1\x06\1\2\3\4", "truncated address"),
        (p.ECHO, b"\0\0\0\1\0", "truncated ECHO"),
        (p.ECHO, b"\0\0\0", "truncated ECHO"),
        (p.ECHO, b"\0\0\0\0\0\0", "flow id 0"),
    ],
)
def test_bad_v2_bodies(frame_type: int, body: bytes, reason: str) -> None:
    assert_malformed(frame(frame_type, body), reason)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack("!IB", 6 + p.MAX_PAYLOAD + 1, p.ECHO), "oversized frame"),
        (struct.pack("!IB", 25, p.UNREACHABLE), "oversized frame"),
        (struct.pack("!IB", 22, p.OPEN_ECHO), "oversized frame"),
        (struct.pack("!IB", 1, p.RESUME), "oversized frame"),
    ],
)
def test_v2_oversized_from_the_header(data: bytes, reason: str) -> None:
    assert_malformed(data, reason)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: p.encode(p.OpenEcho(1, "example.org")), "not an IP address"),
        (lambda: p.encode(p.Echo(1, 70000, b"")), "sequence out of range"),
        (lambda: p.encode(p.Echo(0, 1, b"")), "flow id out of range"),
        (lambda: p.encode(p.Echo(1, 1, bytes(p.MAX_PAYLOAD + 1))), "exceeds"),
        (lambda: p.encode(p.Unreachable(1, 2, 0, "nope")), "not an IP address"),
    ],
)
def test_v2_encoder_rejects_caller_mistakes(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_v1_hello_still_negotiates_v1() -> None:
    assert p.negotiate_version(p.Hello(1, 1, TOKEN)) == 1
    assert p.negotiate_version(p.Hello(1, 2, TOKEN)) == 2
    assert p.negotiate_version(p.Hello(2, 2, TOKEN)) == 2
