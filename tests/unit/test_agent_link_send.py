"""The client's datagram hot path (`AgentHandle.send_datagram`): the exact frames, in order, bounded."""

from __future__ import annotations

import asyncio
import collections
import os

import pytest

from agent import protocol as p
from x2ssh.agent_client.link import AgentHandle, AgentSettings, ServerPython


class FakeChannel:
    def __init__(self, backlog: int = 0) -> None:
        self.written = bytearray()
        self.backlog = backlog  # what the channel says it still holds (no window from the server)

    def write(self, data: bytes) -> None:
        self.written += data

    def get_write_buffer_size(self) -> int:
        return self.backlog

    def close(self) -> None:
        pass


def _handle(chan: FakeChannel, settings: AgentSettings | None = None) -> AgentHandle:
    handle = AgentHandle(
        None,
        "/tmp/.x2ssh-agent-test",
        "/tmp/.x2ssh-agent-test/agent.sock",
        ServerPython("python3", (3, 11), "linux", "/usr/bin/python3"),
        b"t" * p.TOKEN_SIZE,
        settings or AgentSettings(),
        collections.deque(),
    )
    handle._chan = chan  # type: ignore[assignment]
    return handle


def test_datagrams_leave_as_the_codecs_frames_in_order_in_one_write() -> None:
    async def main() -> None:
        chan = FakeChannel()
        handle = _handle(chan)
        sent = [(1, b""), (7, os.urandom(1400)), (1, b"x"), (0xFFFFFFFF, os.urandom(p.MAX_PAYLOAD))]
        for flow_id, payload in sent:
            assert handle.send_datagram(flow_id, payload)
        assert chan.written == b""  # joined at the end of the loop turn
        await asyncio.sleep(0)
        assert bytes(chan.written) == b"".join(p.encode_datagram(f, d) for f, d in sent)
        frames = p.Decoder().feed(bytes(chan.written))
        assert [(f.flow_id, f.peer, f.payload) for f in frames] == [(f, None, d) for f, d in sent]

    asyncio.run(main())


def test_a_backed_up_channel_drops_and_counts_instead_of_buffering() -> None:
    async def main() -> None:
        settings = AgentSettings(max_write_buffer=9_500)
        chan = FakeChannel(backlog=9_000)
        handle = _handle(chan, settings)
        assert handle.send_datagram(1, b"a" * 900)  # 9,000 held + nothing queued: room
        assert not handle.send_datagram(1, b"b" * 900)  # 9,000 held + 910 queued: over 9,500
        await asyncio.sleep(0)
        assert handle.drops["write_buffer_full"] == 1
        assert bytes(chan.written) == p.encode_datagram(1, b"a" * 900)

    asyncio.run(main())


@pytest.mark.parametrize(("flow_id", "size"), [(0, 1), (-1, 1), (1 << 32, 1), (1, p.MAX_PAYLOAD + 1)])
def test_a_bad_datagram_is_refused_before_anything_is_queued(flow_id: int, size: int) -> None:
    async def main() -> None:
        chan = FakeChannel()
        handle = _handle(chan)
        with pytest.raises(ValueError):
            handle.send_datagram(flow_id, b"x" * size)
        assert handle.send_datagram(3, b"ok")
        await asyncio.sleep(0)
        assert bytes(chan.written) == p.encode_datagram(3, b"ok")

    asyncio.run(main())
