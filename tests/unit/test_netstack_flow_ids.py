"""Flow ids are reused: 22 bits of slot and 10 of generation, and the generation counter is global, so
the id of a released flow comes back after 1023 new flows (the freed slot is the first one reused).

Inside the core a stale id is harmless: the output and owed-ACK lists look each id up again and act only on
what the flow with that id needs anyway (idempotent), and a stale event precedes the new flow's CONNECT in
the same batch, so ``Stack.events`` never gives it to the new flow. A stale ``TcpFlow`` object in the
consumer's hands is another matter: before the fix its methods went by id alone, so a write on a released
flow could land in whichever connection holds that id now.
"""

from __future__ import annotations

import pytest

from netstack import FlowClosedError, Stack, TcpConnectRequest
from tests.unit.tcp_peer import TcpPeer, deliver

GENERATIONS = 1023


def _request(stack: Stack, peer: TcpPeer):
    peer.syn()
    (request,) = stack.events()
    assert isinstance(request, TcpConnectRequest)
    return request.flow


def test_a_released_flow_never_acts_on_the_connection_that_reuses_its_id(stack):
    old_peer = TcpPeer(stack, "198.18.0.2", "198.19.0.2", sport=30000)
    old = _request(stack, old_peer)
    old.accept()
    deliver(stack, [old_peer])
    old.close()
    deliver(stack, [old_peer])
    for n in range(GENERATIONS - 1):  # refused at once: each takes the same slot, a new generation
        _request(stack, TcpPeer(stack, "198.18.0.2", "198.19.0.3", sport=30001 + n)).refuse()
    stack.packets_to_send()
    peer = TcpPeer(stack, "198.18.0.2", "198.19.0.4", sport=31500)
    new = _request(stack, peer)
    assert new.id == old.id  # the id came back: this is what the test is about
    new.accept()
    deliver(stack, [peer])
    for call in (
        lambda: old.write(b"not for you"),
        old.read,
        lambda: old.ack(1),
        old.shutdown,
        old.accept,
        old.refuse,
    ):
        with pytest.raises(FlowClosedError):
            call()
    assert old.send_buffer_free == 0
    old.close()
    old.abort()
    deliver(stack, [peer])
    assert bytes(peer.received) == b"" and not peer.got_fin and not peer.got_rst
    assert stack.flows == {new.id: new} and not new.closed
    new.write(b"mine")
    deliver(stack, [peer])
    assert bytes(peer.received) == b"mine"
