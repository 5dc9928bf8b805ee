"""Random lifecycles of many flows at once through the native core (a hypothesis state machine).

Apps open, send, half-close, reset and retransmit their SYNs; the consumer accepts, refuses, reads, writes,
shuts down, closes and aborts, in any order and at any moment of the handshake; turns end with or without
the owed ACKs; packets are delivered late or lost; the clock jumps across retransmission, TIME_WAIT and
SYN_RCVD timeouts. Whatever happens, nothing may touch freed memory (run this under AddressSanitizer to see
it: see benchmarks/netstack_asan.py) and, once every flow is released and the clock has run, nothing is
left: no flow, no pcb, no bytes. And nothing is lost: once an app's FIN was taken (its end of stream), every
byte it sent before reaches the consumer, also when the connection ends before the consumer has read them
(a ``TcpClosed(NORMAL)`` comes only after the last of them).

``NETSTACK_FUZZ_EXAMPLES`` raises the number of runs (default 25) for a longer search.
"""

from __future__ import annotations

import contextlib
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from netstack import (
    CloseReason,
    NetstackError,
    Stack,
    StackConfig,
    TcpClosed,
    TcpConnectRequest,
    TcpEndOfStream,
)
from tests.unit.tcp_peer import TcpPeer

EXAMPLES = int(os.environ.get("NETSTACK_FUZZ_EXAMPLES", "25"))
SIZES = st.sampled_from([1, 100, 1400, 3000, 20_000])
STEPS = st.sampled_from([0.01, 0.25, 1.0, 2.5, 30.0])  # seconds the clock jumps


class _App:
    """One app connection: its scripted peer and what the consumer holds for it."""

    def __init__(self, peer: TcpPeer) -> None:
        self.peer = peer
        self.flow = None  # the TcpFlow once the CONNECT event came
        self.accepted = False
        self.released = False  # closed, aborted or refused by the consumer, or closed by the stack
        self.app_done = False  # the app sent FIN or RST: it sends nothing more
        self.connects = 0  # CONNECT events: after a second one, sent and got no longer match one flow
        self.sent = bytearray()  # what the app sent (the stack may refuse bytes past its window)
        self.got = bytearray()  # what the consumer read
        self.eof_seen = False  # the app's FIN was taken: everything it sent before was taken too

    def check_nothing_lost(self) -> None:
        if self.connects == 1 and self.eof_seen:
            assert len(self.got) == len(self.sent) and self.got == self.sent, (len(self.got), len(self.sent))


class FlowLifecycles(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.stack = Stack(StackConfig(mtu=16000, max_flows=64), clock="manual")
        self.base_mem = self.stack.memory_in_use()
        self.now = 0.0
        self.apps: list[_App] = []
        self.by_port: dict[int, _App] = {}
        self.next_port = 20000

    # -- helpers --

    def _pick(self, index: int) -> _App | None:
        return self.apps[index % len(self.apps)] if self.apps else None

    def _events(self) -> None:
        for event in self.stack.events():
            if isinstance(event, TcpConnectRequest):
                src_port = event.flow.src[1]
                app = self.by_port[src_port]
                app.flow = event.flow  # (a SYN repeated after a refusal or a release: a new flow)
                app.accepted = app.released = False
                app.connects += 1
            elif isinstance(event, TcpEndOfStream):
                self.by_port[event.flow.src[1]].eof_seen = True
            elif isinstance(event, TcpClosed):
                app = self.by_port[event.flow.src[1]]
                app.released = True
                if event.reason is CloseReason.NORMAL:  # both FINs done, every received byte read
                    app.check_nothing_lost()

    def _deliver(self, lose_every: int = 0) -> None:
        for _ in range(20):
            out = self.stack.packets_to_send()
            if not out:
                return
            for n, raw in enumerate(out):
                if lose_every and n % lose_every == 0:
                    continue
                pkt = IPv6(raw) if raw[0] >> 4 == 6 else IP(raw)
                app = self.by_port.get(pkt[TCP].dport)
                if app is not None:
                    app.peer.handle(raw)
            self._events()

    def _call(self, fn, *args) -> None:
        # FlowClosedError / LocalProtocolError are allowed answers to a call at a bad moment
        with contextlib.suppress(NetstackError):
            fn(*args)

    # -- the apps --

    @initialize(n=st.integers(0, 3), v6=st.booleans())
    def apps_already_connected(self, n: int, v6: bool) -> None:
        # Hypothesis's runs are mostly short: start some with connections past their handshake, so that
        # the steps go into what happens on them.
        for _ in range(n):
            self.app_connects(v6, False)
            self.consumer_decides(len(self.apps) - 1, True)
        self._deliver()

    @precondition(lambda self: len(self.apps) < 8)  # few apps: each lives through many steps
    @rule(v6=st.booleans(), reuse=st.booleans())
    def app_connects(self, v6: bool, reuse: bool) -> None:
        src, dst = ("fd58:3278:7373:1::2", "fd58:3278:7373:2::7") if v6 else ("198.18.0.2", "198.19.0.7")
        if reuse and self.apps and self.apps[-1].released:
            # The same 4-tuple again once the consumer released the old flow; the old app is gone.
            old = self.apps.pop()
            src, dst, port = old.peer.src, old.peer.dst, old.peer.sport
        else:
            port = self.next_port
            self.next_port += 1
        app = _App(TcpPeer(self.stack, src, dst, sport=port, dport=80 + port % 3))
        self.apps.append(app)
        self.by_port[port] = app
        app.peer.syn()
        self._events()

    @rule(i=st.integers(0, 1000))
    def app_repeats_its_syn(self, i: int) -> None:
        app = self._pick(i)
        if app is None or app.app_done:
            return
        if app.peer.got_synack:  # its ISN, from before the SYN-ACK moved its sequence on
            self.stack.receive_packet(app.peer._pkt("S", seq=(app.peer.seq - 1) % 2**32))
        else:
            app.peer.syn()
        self._events()

    @rule(i=st.integers(0, 1000), size=SIZES, push=st.booleans())
    def app_sends(self, i: int, size: int, push: bool) -> None:
        app = self._pick(i)
        if app is not None and app.peer.got_synack and not app.app_done:
            data = os.urandom(size)
            app.peer.send(data, push=push)
            app.sent += data
            self._events()

    @rule(i=st.integers(0, 1000))
    def app_fins(self, i: int) -> None:
        app = self._pick(i)
        if app is not None and app.peer.got_synack and not app.app_done:
            app.app_done = True
            app.peer.fin()
            self._events()

    @rule(i=st.integers(0, 1000), size=SIZES)
    def app_sends_its_last_bytes(self, i: int, size: int) -> None:
        # A request and the app's FIN at once (an upload, an HTTP/1.0 client): the close then often
        # completes before the consumer (its upstream busy) has read the request.
        app = self._pick(i)
        if app is not None and app.peer.got_synack and not app.app_done:
            self.app_sends(i, size, True)
            self.app_fins(i)

    @rule(i=st.integers(0, 1000))
    def app_resets(self, i: int) -> None:
        app = self._pick(i)
        if app is not None and app.peer.got_synack and not app.app_done:
            app.app_done = True
            app.peer.rst()
            self._events()

    # -- the consumer --

    @rule(i=st.integers(0, 1000), accept=st.booleans())
    def consumer_decides(self, i: int, accept: bool) -> None:
        app = self._pick(i)
        if app is None or app.flow is None or app.accepted or app.released:
            return
        if accept:
            app.accepted = True
            self._call(app.flow.accept)
        else:
            app.released = True
            self._call(app.flow.refuse)
        self._events()

    @rule(i=st.integers(0, 1000), ack=st.booleans())
    def consumer_reads(self, i: int, ack: bool) -> None:
        app = self._pick(i)
        if app is None or app.flow is None or app.released:
            return
        with contextlib.suppress(NetstackError):
            data = app.flow.read()
            app.got += data
            if ack and data:
                app.flow.ack(len(data))
        self._events()

    @rule(i=st.integers(0, 1000), size=SIZES)
    def consumer_writes(self, i: int, size: int) -> None:
        app = self._pick(i)
        if app is not None and app.accepted and not app.released:
            self._call(app.flow.write, os.urandom(size))
            self._events()

    @rule(i=st.integers(0, 1000), size=SIZES)
    def consumer_answers_and_shuts_down(self, i: int, size: int) -> None:
        self.consumer_writes(i, size)
        self.consumer_shuts_down(i)

    @rule(i=st.integers(0, 1000), size=SIZES, answer=SIZES)
    def request_meets_a_busy_consumer(self, i: int, size: int, answer: int) -> None:
        # The app's last bytes and FIN, the consumer's answer and FIN before it reads (its upstream is
        # full), and the app's ACK: lwIP ends the connection with the request still unread.
        self.app_sends_its_last_bytes(i, size)
        self.consumer_answers_and_shuts_down(i, answer)
        self._deliver()

    @rule(i=st.integers(0, 1000))
    def consumer_shuts_down(self, i: int) -> None:
        app = self._pick(i)
        if app is not None and app.accepted and not app.released:
            self._call(app.flow.shutdown)
            self._events()

    @rule(i=st.integers(0, 1000), abort=st.booleans())
    def consumer_releases(self, i: int, abort: bool) -> None:
        app = self._pick(i)
        if app is None or app.flow is None or app.released:
            return
        app.released = True
        (app.flow.abort if abort else app.flow.close)()
        self._events()

    @rule(acks_now=st.booleans())
    def turn_ends(self, acks_now: bool) -> None:
        owed = self.stack.flush()
        if owed and acks_now:  # else a later turn (or packets_to_send) sends the owed ACKs
            self.stack.flush_acks()
        self._events()

    @rule()
    def owed_acks_leave(self) -> None:
        self.stack.flush_acks()
        self._events()

    # -- the link and the clock --

    @rule(lossy=st.booleans())
    def packets_travel(self, lossy: bool) -> None:
        self._deliver(lose_every=3 if lossy else 0)

    def _advance(self, seconds: float, deliver: bool) -> None:
        # lwIP's TCP timer runs once per call however late it is: step the clock as a loop would.
        for _ in range(max(1, round(seconds / 0.25))):
            self.now += min(seconds, 0.25)
            self.stack.handle_timer(self.now)
            if deliver:
                self._deliver()
            else:
                self.stack.packets_to_send()  # lost
            self._events()

    @rule(step=STEPS, deliver=st.booleans())
    def time_passes(self, step: float, deliver: bool) -> None:
        self._advance(step, deliver)

    @invariant()
    def counts_agree(self) -> None:
        stats = self.stack.stats()
        held = sum(1 for a in self.apps if a.flow is not None and not a.released)
        assert stats["flows_live"] >= held, (stats, held)

    def teardown(self) -> None:
        try:
            for app in self.apps:
                if app.flow is not None and not app.released:
                    if app.eof_seen:  # (a finished connection without a pcb, after TIME_WAIT, too)
                        while data := app.flow.read():
                            app.got += data
                        app.check_nothing_lost()
                    app.released = True
                    app.flow.close()
            # Live apps finish their closes; for silent ones lwIP retransmits, then gives up (TCP_MAXRTX:
            # minutes), and a FIN_WAIT_2 without the app's FIN ends after TCP_FIN_WAIT_TIMEOUT.
            self._advance(400.0, deliver=True)
            stats = self.stack.stats()
            assert stats["flows_live"] == 0 and stats["flows_pending"] == 0, stats
            assert stats["pcbs_active"] == 0 and stats["pcbs_time_wait"] == 0, stats
            assert self.stack.memory_in_use() <= self.base_mem + 4096 * stats["listeners"], stats
        finally:
            self.stack.close()


FlowLifecycles.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_flow_lifecycles = FlowLifecycles.TestCase
