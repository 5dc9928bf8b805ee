"""A hostile or broken server on the agent link: x2ssh logs, closes that link, and keeps running."""

from __future__ import annotations

import asyncio
import collections
import struct

import pytest

from agent import protocol as p
from x2ssh.agent_client.link import AgentHandle, AgentSettings, ServerPython
from x2ssh.flows.udp_relay import UdpRelay


class FakeChannel:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "wrote to a closed channel"
        self.written += data

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


class FakeProcess:
    def close(self) -> None:
        pass


async def _handle() -> tuple[AgentHandle, FakeChannel, UdpRelay, list]:
    handle = AgentHandle(
        FakeProcess(),  # type: ignore[arg-type]
        "/tmp/.x2ssh-agent-test",
        "/tmp/.x2ssh-agent-test/agent.sock",
        ServerPython("python3", (3, 11), "linux", "/usr/bin/python3"),
        b"t" * p.TOKEN_SIZE,
        AgentSettings(),
        collections.deque(),
    )
    chan = FakeChannel()
    handle._chan = chan  # type: ignore[assignment]
    delivered: list = []
    relay = UdpRelay(lambda src, dst, payload: delivered.append((src, dst, payload)))
    relay.attach(handle)
    return handle, chan, relay, delivered


GARBAGE = [
    b"\xff\xff\xff\xff\x03",  # a frame claiming 4 GiB
    struct.pack("!IB", 1, 0xEE) + b"x",  # unknown frame type
    p.encode(p.Hello(1, 1, b"t" * p.TOKEN_SIZE)),  # a client-only frame from the agent
    p.encode_datagram(5, b"no source address"),  # a reply without its source
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=["oversized", "unknown-type", "hello", "no-source"])
def test_malformed_frames_close_the_link_not_the_process(garbage: bytes, caplog) -> None:
    async def scenario() -> None:
        handle, chan, relay, delivered = await _handle()
        relay.datagram_from_app(("198.18.0.2", 5000), ("198.19.0.2", 7), b"hello")
        handle._data_received(garbage)
        await asyncio.sleep(0)
        assert handle.closed and chan.closed
        assert not relay.attached, "the relay must stop using a link it cannot trust"
        assert any(isinstance(f, p.Error) for f in p.Decoder().feed(bytes(chan.written))), "agent told why"
        assert delivered == []
        # Later datagrams are dropped and counted, never queued without bound.
        relay.datagram_from_app(("198.18.0.2", 5000), ("198.19.0.2", 7), b"again")
        assert relay.stats.drops["no_agent"] >= 1

    asyncio.run(scenario())
    assert "protocol error from the UDP agent" in caplog.text


def test_valid_replies_still_flow_before_the_garbage() -> None:
    async def scenario() -> None:
        handle, _chan, relay, delivered = await _handle()
        relay.datagram_from_app(("198.18.0.2", 5000), ("198.19.0.2", 7), b"ping")
        flow_id = next(iter(relay.flows()))[0]
        reply = p.encode_datagram(flow_id, b"pong", ("198.19.0.2", 7))
        handle._data_received(reply)
        handle._data_received(GARBAGE[1])
        assert delivered == [(("198.19.0.2", 7), ("198.18.0.2", 5000), b"pong")]
        assert handle.closed

    asyncio.run(scenario())
