"""An accepted SYN skips lwIP's walk of every active pcb when no stale pcb can have its 4-tuple.

lwIP's tcp_input looks for a segment's pcb in the list of active pcbs before it tries the listeners, and the
glue walked the same list for a stale pcb of a released flow: two walks per accept, a cost that grew with
the number of live flows (``python -m benchmarks.netstack_accept``). The glue now counts released flows'
pcbs ("orphans") by 4-tuple hash and, when none can match, lets lwIP take the SYN with the list set aside.
These tests pin down what that must never break: the other flows keep working, a stale pcb with the same
4-tuple is still found and dropped, and the count of orphans goes back down when lwIP frees them.
"""

from __future__ import annotations

from netstack import TcpDataReceived, TcpEndOfStream
from tests.unit.tcp_peer import TcpPeer, connect, deliver

APP, DEST = "198.18.0.2", "198.19.0.2"


def test_flows_accepted_beside_many_others_all_keep_working(stack):
    old = [TcpPeer(stack, APP, DEST, sport=43000 + i) for i in range(40)]
    old_flows = [connect(stack, p) for p in old]
    before = stack.stats()["syn_fast_path"]
    new = [TcpPeer(stack, APP, DEST, sport=44000 + i) for i in range(40)]
    new_flows = [connect(stack, p) for p in new]
    assert stack.stats()["syn_fast_path"] == before + len(new)
    assert stack.stats()["pcbs_active"] == len(old) + len(new)
    for peer in old + new:  # every pcb is still in lwIP's list: each segment finds its own
        peer.send(f"from {peer.sport}".encode())
    deliver(stack, old + new)
    events = stack.events()
    assert {e.flow.id for e in events if isinstance(e, TcpDataReceived)} == {
        f.id for f in old_flows + new_flows
    }
    for peer, flow in zip(old + new, old_flows + new_flows, strict=True):
        assert flow.read() == f"from {peer.sport}".encode()
        flow.write(b"answer")
    deliver(stack, old + new)
    assert all(bytes(p.received) == b"answer" and not p.got_rst for p in old + new)


def test_a_stale_pcb_with_the_same_four_tuple_is_still_dropped(stack):
    peer = TcpPeer(stack, APP, DEST, sport=45000)
    flow = connect(stack, peer)
    peer.auto_ack = False
    flow.close()  # released: our FIN waits for the app's ACK, the pcb lingers in FIN_WAIT_1
    deliver(stack, [peer])
    assert stack.stats()["pcbs_active"] == 1 and stack.stats()["flows_live"] == 0
    before = stack.stats()["syn_fast_path"]
    again = TcpPeer(stack, APP, DEST, sport=45000)  # the app reuses the port
    new_flow = connect(stack, again)  # (the stale pcb's abort sends the old connection's RST first)
    assert again.got_synack
    assert stack.stats()["syn_fast_path"] == before  # the slow path: the orphan might have matched
    assert stack.stats()["pcbs_active"] == 1  # the new pcb only: the stale one was dropped
    again.send(b"hello")
    deliver(stack, [again])
    assert [type(e) for e in stack.events()] == [TcpDataReceived]
    assert new_flow.read() == b"hello"


def test_an_orphan_freed_by_lwip_is_counted_out(stack):
    peer = TcpPeer(stack, APP, DEST, sport=45001)
    flow = connect(stack, peer)
    peer.fin()
    assert [type(e) for e in stack.events()] == [TcpEndOfStream]
    flow.close()  # our FIN: LAST_ACK, an orphan until the app's ACK frees it
    deliver(stack, [peer])
    assert peer.got_fin and stack.stats()["pcbs_active"] == 0
    before = stack.stats()["syn_fast_path"]
    connect(stack, TcpPeer(stack, APP, DEST, sport=45001))
    assert stack.stats()["syn_fast_path"] == before + 1  # no orphan left with this 4-tuple
