"""The receive fast paths finish a channel packet inline and look up a DATA channel only for DATA.

x2ssh.ssh.tuning handles the channel messages of an established AES-GCM connection itself; after each,
asyncssh's `_finish_recv_packet` (auth final, next sequence number, await a header) is done inline, and the
in-place parser asks for a direct DATA channel only when the packet is a DATA. Against a real asyncssh
server in this process: a flow's packets reach neither `_finish_recv_packet` nor (unless DATA) the
lookup, and the sequence number still moves on by one per packet, as asyncssh's own would.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_CHANNEL_FIRST

from tests.unit.test_asyncssh_channel_tuning import lab, tuned
from tests.unit.test_tcp_channel import _open
from tests.unit.test_tcp_channel_direct import _inject, _msg, _round, _u32
from x2ssh.ssh import tuning


def test_a_flow_s_channel_packets_skip_finish_recv_packet(monkeypatch: pytest.MonkeyPatch) -> None:
    finished: list[int] = []
    looked_up: list[int] = []
    finish = SSHConnection._finish_recv_packet
    lookup = tuning._direct_data_channel

    def finish_spy(conn: Any, pkttype: int, seq: int, *args: Any, **kwargs: Any) -> None:
        finished.append(pkttype)
        finish(conn, pkttype, seq, *args, **kwargs)

    def lookup_spy(conn: Any, data: bytes, end: int) -> Any:
        looked_up.append(data[1])
        return lookup(conn, data, end)

    monkeypatch.setattr(SSHConnection, "_finish_recv_packet", finish_spy)
    monkeypatch.setattr(tuning, "_direct_data_channel", lookup_spy)

    async def main() -> Any:
        async with lab() as lab_:
            finished.clear()  # the key exchange and authentication go through asyncssh as ever
            return await _round(lab_)

    with tuned(True):
        events, _ = asyncio.run(main())
    assert events == [b"ping", "eof", ("lost", None)]
    assert [t for t in finished if t >= MSG_CHANNEL_FIRST] == []
    assert looked_up and set(looked_up) == {MSG_CHANNEL_DATA}


def test_the_sequence_number_moves_on_by_one_per_packet() -> None:
    async def main() -> Any:
        async with lab() as lab_:
            conn = lab_["conn"]
            chan, session = await _open(conn, lab_["echo"])
            seqs = [conn._recv_seq]
            conn._auth_final = False  # set again by each packet handled, as asyncssh sets it
            _inject(conn, _msg(MSG_CHANNEL_DATA, chan, _u32(4) + b"abcd"))
            seqs.append(conn._recv_seq)
            final = conn._auth_final
            _inject(conn, _msg(MSG_CHANNEL_EOF, chan))
            seqs.append(conn._recv_seq)
            return seqs, final, session.events[:2], conn._recv_handler == conn._recv_pkthdr

    with tuned(True):
        seqs, final, events, awaits_header = asyncio.run(main())
    assert [s - seqs[0] for s in seqs] == [0, 1, 2]
    assert final and awaits_header
    assert events == [b"abcd", "eof"]
