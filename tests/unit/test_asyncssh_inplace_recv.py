"""The in-place receive parser of x2ssh.ssh.tuning: any split of the byte stream gives the same result.

Against a real asyncssh server in this process (the lab of test_asyncssh_channel_tuning), the client
connection's socket reads are re-cut before they reach the parser: single bytes, odd sizes that split
packets and their first 4 bytes anywhere, and several reads joined into one large buffer (so a key
exchange's NEWKEYS and the packets under the new key arrive in one call). Through each cut, TcpChannels
(their DATA goes straight to `receive_data`) and asyncssh's own channels (the generic path) carry more than
a window both ways, a keepalive round trip and a rekey happen in between, and everything must arrive
byte-exact, in order, on a connection that stays up. Errors found in a later read (a bad tag after a
held partial packet, a length beyond the limit) end the connection as asyncssh ends it.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable
from typing import Any

import pytest

from tests.unit.test_asyncssh_channel_tuning import Recorder, lab, tuned
from tests.unit.test_tcp_channel_flow import _open
from x2ssh.ssh import tuning

tuning.install()


def _recut(conn: Any, cut: Callable[[random.Random], int], join: bool) -> list[int]:
    """Feed `conn` its socket reads in pieces of `cut(rng)` bytes (all of a read, eventually); with `join`,
    reads are held for a moment and fed together. Returns the sizes of the calls made."""
    loop = asyncio.get_running_loop()
    rng = random.Random(1234)
    parse = type(conn).data_received.__get__(conn)
    pending = bytearray()
    calls: list[int] = []
    scheduled = False

    def feed() -> None:
        nonlocal scheduled
        scheduled = False
        while pending and conn._transport is not None:
            size = min(len(pending), max(1, cut(rng)))
            piece = bytes(pending[:size])
            del pending[:size]
            calls.append(size)
            parse(piece)

    def data_received(data: bytes, datatype: Any = None) -> None:
        nonlocal scheduled
        pending.extend(data)
        if not join:
            feed()
        elif not scheduled:
            scheduled = True
            loop.call_later(0.002, feed)

    conn.data_received = data_received
    return calls


CUTS: dict[str, tuple[Callable[[random.Random], int], bool]] = {
    "bytes": (lambda rng: 1, False),
    "odd": (lambda rng: rng.choice((3, 5, 17, 31, 4000, 33000, 70001)), False),
    "joined": (lambda rng: 1 << 30, True),
    "joined-odd": (lambda rng: rng.randrange(1, 150_000), True),
}


async def _traffic(lab_: dict[str, Any], size: int) -> tuple[list[Any], list[bytes]]:
    conn = lab_["conn"]
    payloads = [os.urandom(size), os.urandom(size // 3 + 7)]
    direct = [await _open(conn, lab_["echo"]) for _ in payloads]
    for (chan, _), payload in zip(direct, payloads, strict=True):
        chan.write(payload)
    await tuning.ping(conn)  # a global request and its reply among the data
    generic_chan, generic = await conn.create_connection(Recorder, "127.0.0.1", lab_["echo"])
    generic_chan.write(payloads[1])
    conn._rekey_bytes_sent = conn._rekey_bytes  # the next packet starts a key exchange
    for (chan, _), payload in zip(direct, payloads, strict=True):
        chan.write(payload[::-1])
        chan.write_eof()
    generic_chan.write_eof()
    await asyncio.wait_for(asyncio.gather(*(s.closed for _, s in direct), generic.closed), 30)
    expected = [payload + payload[::-1] for payload in payloads] + [payloads[1]]
    return [s.events for _, s in direct] + [generic.events], expected


@pytest.mark.parametrize("cut", list(CUTS))
def test_any_cut_of_the_stream_gives_the_same_bytes_in_order_as_asyncssh(cut: str) -> None:
    size = 20_000 if cut == "bytes" else 600_000

    async def main() -> tuple[list[Any], list[bytes], list[int], bool]:
        async with lab() as lab_:
            conn = lab_["conn"]
            old_cipher = conn._recv_encryption._cipher
            calls = _recut(conn, *CUTS[cut])
            events, expected = await _traffic(lab_, size)
            assert not conn.is_closed()
            return events, expected, calls, conn._recv_encryption._cipher is not old_cipher

    results = []
    for on in (False, True):
        with tuned(on):
            results.append(asyncio.run(main()))
    (shipped, _, _, _), (events, expected, calls, rekeyed) = results
    assert rekeyed
    assert [got[0] for got in events] == expected  # byte-exact, in order
    assert [got[1:] for got in events] == [got[1:] for got in shipped]  # EOF and close as asyncssh's
    if cut == "bytes":
        assert set(calls) == {1}
    if cut == "joined":
        assert max(calls) > 256 * 1024  # several reads in one call, as the join intends


def _disconnect_for(pieces: Callable[[Any], list[bytes]]) -> tuple[Any, Any]:
    async def scenario() -> Any:
        async with lab() as lab_:
            conn = lab_["conn"]
            sent: list[Any] = []
            conn._send_disconnect = lambda code, reason, lang="": sent.append((code, reason))
            for piece in pieces(conn):
                conn.data_received(piece)
            await asyncio.wait_for(conn.wait_closed(), 10)
            return sent

    results = []
    for on in (False, True):
        with tuned(on):
            results.append(asyncio.run(scenario()))
    return results[0], results[1]


def test_a_bad_tag_on_a_packet_split_across_reads_ends_the_connection_as_asyncssh_does() -> None:
    garbage = (32).to_bytes(4, "big") + bytes(range(32)) + bytes(16)
    shipped, adjusted = _disconnect_for(lambda conn: [garbage[:2], garbage[2:30], garbage[30:]])
    assert shipped == adjusted
    assert adjusted and "MAC" in adjusted[0][1]


def test_a_length_beyond_the_limit_ends_the_connection_as_asyncssh_does() -> None:
    too_long = (10_000_000).to_bytes(4, "big") + bytes(60)
    shipped, adjusted = _disconnect_for(lambda conn: [too_long[:3], too_long[3:]])
    assert shipped == adjusted
    assert adjusted and "size" in adjusted[0][1].lower()
