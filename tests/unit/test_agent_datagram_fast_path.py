"""The DATAGRAM hot paths of the codec: per-flow prefixes, the decoder's in-place decoding and its peer
cache. They must give exactly what the generic encoder and decoder give, errors included."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest

from agent import netio
from agent import protocol as p

PEERS = [None, ("198.18.0.7", 5353), ("fd58:3278:7373:1::2", 53)]


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 6, b"z" * p.MAX_PAYLOAD])
def test_prefix_encoding_matches_the_generic_encoder(peer, payload: bytes) -> None:
    prefixed = p.encode_datagram_with(p.datagram_prefix(9, peer), payload)
    assert prefixed == p.encode(p.Datagram(9, peer, payload))
    assert p.Decoder().feed(prefixed) == [p.Datagram(9, peer, payload)]


def test_prefix_encoding_rejects_caller_mistakes() -> None:
    with pytest.raises(ValueError, match="flow id"):
        p.datagram_prefix(0, None)
    with pytest.raises(ValueError, match="port"):
        p.datagram_prefix(1, ("198.18.0.1", 0))
    with pytest.raises(ValueError, match="exceeds"):
        p.encode_datagram_with(p.datagram_prefix(1, None), b"x" * (p.MAX_PAYLOAD + 1))


def test_many_peers_in_one_stream_decode_exactly() -> None:
    # More distinct peers than the decoder caches, each seen twice, some datagrams split across feeds.
    expected = []
    for i in range(700):
        peer = (f"198.18.{i // 250}.{i % 250 + 1}", 1000 + i % 7)
        expected += [p.Datagram(i + 1, peer, i.to_bytes(2, "big") * 3)] * 2
    stream = b"".join(p.encode(frame) for frame in expected)
    decoder = p.Decoder()
    got = []
    for start in range(0, len(stream), 4093):
        got += decoder.feed(stream[start : start + 4093])
    assert got == expected


def _datagram_frame(body: bytes) -> bytes:
    return struct.pack("!IB", len(body), p.DATAGRAM) + body


IPV4_PEER = b"\x04" + socket.inet_aton("198.18.0.1") + struct.pack("!H", 53)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (struct.pack("!I", 0) + b"\x00" + b"data", "flow id 0"),
        (struct.pack("!I", 0) + IPV4_PEER + b"data", "flow id 0"),
        (struct.pack("!I", 1) + b"\x04" + socket.inet_aton("198.18.0.1") + b"\x00\x00", "port 0"),
        (struct.pack("!I", 1) + b"\x04\x01\x02", "truncated address"),
        (struct.pack("!I", 1) + b"\x52" + b"data", "server resolver"),
        (struct.pack("!I", 1) + b"\x09" + b"data", "bad address kind"),
        (struct.pack("!I", 1) + b"\x00" + b"x" * (p.MAX_PAYLOAD + 1), "oversized datagram payload"),
        (struct.pack("!I", 1) + IPV4_PEER + b"x" * (p.MAX_PAYLOAD + 1), "oversized datagram payload"),
        (struct.pack("!I", 1), "truncated"),
    ],
)
@pytest.mark.parametrize("peer_cached", [False, True])
def test_malformed_datagrams_fail_alike_with_a_warm_cache(
    body: bytes, reason: str, peer_cached: bool
) -> None:
    decoder = p.Decoder()
    if peer_cached:  # the same peer bytes decoded before must not let a bad frame through
        assert decoder.feed(p.encode_datagram(5, b"ok", ("198.18.0.1", 53))) == [
            p.Datagram(5, ("198.18.0.1", 53), b"ok")
        ]
    with pytest.raises(p.ProtocolError, match=reason):
        decoder.feed(_datagram_frame(body))


def _kernel_limit(name: str) -> int | None:
    try:
        return int(Path(f"/proc/sys/net/core/{name}").read_text())
    except (OSError, ValueError):
        return None


def test_grow_buffers_asks_for_more_and_never_shrinks() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        netio.grow_buffers(sock, 1024 * 1024)
        grown = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        limit = _kernel_limit("rmem_max")
        if limit is not None:  # Linux: the kernel caps the request at rmem_max and doubles it
            assert grown == max(before, 2 * min(1024 * 1024, limit))
        assert grown >= before
        netio.grow_buffers(sock, 4096)  # smaller than what it has: left alone
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == grown


def test_grow_buffers_on_a_closed_socket_is_harmless() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.close()
    netio.grow_buffers(sock)
