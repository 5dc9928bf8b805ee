"""The app's end of stream through netstack.aio: the protocol gets every byte, then ``eof_received``, in
that order, whether the FIN comes alone or with the last bytes, and while its reading is paused. Once the
bytes were delivered, the EOF needs no further read of the stack (one call less per connection)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from netstack.stack import TcpFlow
from tests.unit.test_netstack_aio_turns import Recorder, _connected, exchange


class EofRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[Any] = []

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.log.append(bytes(data))

    def eof_received(self) -> None:
        self.log.append("eof")


@pytest.fixture
def empty_reads(monkeypatch):
    """Counts TcpFlow.read calls that found nothing."""
    count = [0]
    original = TcpFlow.read

    def read(self: TcpFlow, max_bytes: int = 1 << 18) -> bytes:
        data = original(self, max_bytes)
        count[0] += not data
        return data

    monkeypatch.setattr(TcpFlow, "read", read)
    return count


@pytest.mark.parametrize("together", [False, True])
def test_eof_after_the_bytes_without_an_empty_read(wired, empty_reads, together):
    async def run() -> None:
        tun, peer, proto = await _connected(*wired, protocol=EofRecorder)
        wire = wired[1]
        try:
            if together:  # one segment: the bytes, PSH and FIN
                peer.stack.receive_packet(peer._pkt("FPA", b"request"))
                peer.seq = (peer.seq + len(b"request") + 1) % 2**32
            else:
                peer.send(b"request", push=True)
                await exchange(wire, peer, rounds=2)
                peer.fin()
            await exchange(wire, peer)
            assert proto.log == [b"request", "eof"]
            assert empty_reads[0] == 0
        finally:
            tun.close()

    asyncio.run(run())


def test_eof_waits_for_the_bytes_while_reading_is_paused(wired):
    async def run() -> None:
        tun, peer, proto = await _connected(*wired, protocol=EofRecorder)
        wire = wired[1]
        try:
            proto.transport.pause_reading()
            peer.send(b"request", push=True)
            peer.fin()
            await exchange(wire, peer)
            assert proto.log == []
            proto.transport.resume_reading()
            await exchange(wire, peer)
            assert proto.log == [b"request", "eof"]
        finally:
            tun.close()

    asyncio.run(run())
