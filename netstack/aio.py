"""asyncio adapter: attach a :class:`~netstack.Stack` to a TUN device through a packet port.

``TunStack`` reads batches of packets from a :class:`~netstack.port.PacketPort` when it says it is readable
and hands the stack's output back to it: with a TUN file descriptor (:class:`~netstack.port.FdPort`) the
native core reads and writes the fd itself; a port without an fd (a Wintun session) gets the queued output
after each batch of work. It keeps lwIP's timers armed with ``loop.call_at``, and turns events into calls:
``on_tcp(flow)`` for each new connection (accept it with ``TunStack.accept`` — possibly later, once an
upstream is ready — or ``flow.refuse()``), ``on_udp(datagram)`` for each UDP datagram, ``on_icmp(request)``
for each ICMP echo request. An accepted flow
gets an asyncio-style transport (:class:`TcpTransport`) driving an :class:`asyncio.Protocol`, with flow
control both ways: ``pause_reading`` leaves bytes in the stack so the app's receive window closes, and
``pause_writing``/``resume_writing`` tell the protocol when the app stops/starts taking bytes.

Memory budget. Per flow, memory is bounded by the TCP windows and the write buffer's high-water mark; all
flows together are bounded by ``StackConfig.buffer_budget``: the bytes the stack holds plus every
transport's write buffer. Past the budget every flow stops reading, nothing is dropped: protocols are
told ``pause_writing`` (a bridge stops reading its upstream), and bytes handed to protocols no longer
reopen the apps' receive windows (the acknowledgement is withheld). Below three quarters of the budget
both resume.

Example — echo every TCP connection that arrives on a TUN device::

    class Echo(asyncio.Protocol):
        def connection_made(self, transport): self.transport = transport
        def data_received(self, data): self.transport.write(data)
        def eof_received(self): self.transport.write_eof()

    tun = TunStack(fd, on_tcp=lambda flow: tun.accept(flow, Echo))
    tun.start()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from netstack.errors import FlowClosedError
from netstack.events import (
    CloseReason,
    IcmpEchoRequest,
    TcpClosed,
    TcpConnectRequest,
    TcpDataReceived,
    TcpEndOfStream,
    TcpWritable,
    UdpDatagram,
)
from netstack.port import FdPort, PacketPort
from netstack.stack import ACKS_HELD, READ_CHUNK, Stack, StackConfig, TcpFlow

log = logging.getLogger(__name__)

PUMP_BATCH = 256
DISPATCH_PASSES = 4
WRITE_HIGH = 1024 * 1024
WRITE_LOW = 256 * 1024
# A small write from outside a batch (an answer from upstream) leaves at once, without waiting for the end of
# the loop's turn, on a flow that has answered before (interactive: a request/response exchange). A flow's
# first answer waits for the turn's end: a one-request connection's FIN then shares its segment.
WRITE_THROUGH = 16 * 1024


class ConnectionResetByApp(ConnectionResetError):
    """The app reset the connection (or it timed out) while it was in use."""


class TcpTransport(asyncio.Transport):
    """The asyncio face of one accepted TCP flow."""

    def __init__(self, tun: TunStack, flow: TcpFlow, protocol: asyncio.BaseProtocol) -> None:
        super().__init__({"peername": flow.src, "sockname": flow.dst})
        self._tun = tun
        self._flow = flow
        self._protocol: Any = protocol
        self._buffer = bytearray()
        self._reading_paused = False
        self._data_waiting = False
        self._eof_waiting = False
        self._eof_to_send = False
        self._closing = False
        self._lost = False
        self._writing_paused = False  # what the protocol was last told
        self._paused_by_buffer = False  # our write buffer passed its high-water mark
        self._paused_by_budget = False  # all flows together passed the memory budget
        self._withheld = 0  # bytes handed on whose window reopening waits for the budget
        self._answered = False  # written to before (see WRITE_THROUGH)
        self._high, self._low = WRITE_HIGH, WRITE_LOW

    @property
    def flow(self) -> TcpFlow:
        return self._flow

    # -- reading (app -> protocol) --

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if self._data_waiting or self._eof_waiting:
                self._tun._loop.call_soon(self._deliver)

    def is_reading(self) -> bool:
        return not self._reading_paused

    def _deliver(self) -> None:
        flow = self._flow
        if self._lost or flow.closed:
            return
        while not self._reading_paused:
            data = flow.read()
            if not data:
                self._data_waiting = False
                break
            self._protocol.data_received(data)
            if flow.closed:
                return
            if self._tun.over_budget:
                self._withheld += len(data)
            else:
                flow.ack(len(data))  # handed on: reopen the app's window
            if len(data) < READ_CHUNK:  # a short read empties the stack's queue: no need to ask again
                self._data_waiting = False
                break
        else:
            self._data_waiting = True
        if self._eof_waiting and not self._data_waiting and not self._reading_paused:
            self._eof_waiting = False
            self._protocol.eof_received()
        tun = self._tun
        if not (tun._kicked or tun._dispatching):  # _kick's own test, here: no call when it would do nothing
            tun._kick()

    # -- writing (protocol -> app) --

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._eof_to_send or self._lost:
            return
        if not data:
            return
        if not self._buffer:
            try:
                taken = self._flow.write(data)
            except FlowClosedError:
                return
            if taken == len(data):
                tun = self._tun
                if tun._dispatching:
                    pass  # the dispatch flushes at its end
                elif self._answered and len(data) <= WRITE_THROUGH and tun._timer is not None:
                    tun._send_now()
                elif not tun._kicked:
                    tun._kick()
                self._answered = True
                if tun.over_budget and not self._paused_by_budget:
                    self._budget_pause()
                return
            data = memoryview(data)[taken:]
        self._buffer += data
        self._tun._buffered += len(data)
        self._tun._kick()
        if len(self._buffer) > self._high:
            self._paused_by_buffer = True
        if self._tun.over_budget:
            self._paused_by_budget = True
        self._update_writing()

    def _update_writing(self) -> None:
        paused = self._paused_by_buffer or self._paused_by_budget
        if paused != self._writing_paused and not self._lost:
            self._writing_paused = paused
            if paused:
                self._protocol.pause_writing()
            else:
                self._protocol.resume_writing()

    def _budget_pause(self) -> None:
        self._paused_by_budget = True
        self._update_writing()

    def _budget_resume(self) -> None:
        if self._withheld and not self._flow.closed:
            withheld, self._withheld = self._withheld, 0
            self._flow.ack(withheld)
        if self._paused_by_budget:
            self._paused_by_budget = False
            self._update_writing()

    def _flush(self) -> None:
        if self._buffer and not self._flow.closed:
            taken = self._flow.write(self._buffer)
            del self._buffer[:taken]
            self._tun._buffered -= taken
        if self._paused_by_buffer and len(self._buffer) <= self._low:
            self._paused_by_buffer = False
            self._update_writing()
        if not self._buffer:
            if self._eof_to_send:
                self._eof_to_send = False
                self._flow.shutdown()
            if self._closing and not self._lost:
                self._release(abort=False)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._lost or self._closing:
            return
        if self._buffer:
            self._eof_to_send = True
        else:
            try:
                self._flow.shutdown()
            except FlowClosedError:
                return
        tun = self._tun
        if not (tun._kicked or tun._dispatching):
            tun._kick()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = WRITE_HIGH if high is None else high
        self._low = self._high // 4 if low is None else low

    # -- ending --

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Send what is buffered, then FIN and release the flow."""
        if self._closing or self._lost:
            return
        self._closing = True
        if not self._buffer:
            self._release(abort=False)

    def abort(self) -> None:
        """Reset the app's connection at once."""
        if not self._lost:
            self._release(abort=True)

    def _release(self, abort: bool) -> None:
        self._tun._buffered -= len(self._buffer)
        self._buffer.clear()
        if abort:
            self._flow.abort()
        else:
            self._flow.close()
        tun = self._tun
        if not (tun._kicked or tun._dispatching):
            tun._kick()
        self._connection_lost(None)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._tun._buffered -= len(self._buffer)
        self._buffer.clear()
        self._tun._transports.pop(self._flow.id, None)
        self._tun._loop.call_soon(self._protocol.connection_lost, exc)

    def _closed_by_stack(self, reason: CloseReason) -> None:
        exc = (
            None
            if reason is CloseReason.NORMAL
            else ConnectionResetByApp(f"connection {reason.name.lower()}")
        )
        self._connection_lost(exc)

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = self._protocol
        return protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol


class TunStack:
    """Drive a netstack ``Stack`` from a TUN device on the running asyncio loop.

    ``port`` is the device: a non-blocking TUN fd (wrapped in an :class:`FdPort`) or any
    :class:`PacketPort`.
    """

    def __init__(
        self,
        port: int | PacketPort,
        stack: Stack | None = None,
        *,
        config: StackConfig | None = None,
        on_tcp: Callable[[TcpFlow], None] | None = None,
        on_udp: Callable[[UdpDatagram], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        on_icmp: Callable[[IcmpEchoRequest], None] | None = None,
    ) -> None:
        self.port: PacketPort = FdPort(port) if isinstance(port, int) else port
        # An fd port's `write_batch` does nothing (the core writes each packet to the fd): the calls on the
        # per-packet paths below are skipped for it.
        self._port_queues = type(self.port) is not FdPort
        self.stack = stack or Stack(config)
        self.on_tcp = on_tcp or (lambda flow: flow.refuse())
        self.on_udp = on_udp or (lambda datagram: None)
        self.on_icmp = on_icmp or (lambda request: None)  # unanswered pings time out, as with no route
        self._loop = loop or asyncio.get_running_loop()
        self._transports: dict[int, TcpTransport] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._kicked = False
        self._dispatching = False  # inside _dispatch: it drains, flushes and re-arms the timer at its end
        self._acks_scheduled = False
        self._held_acks: asyncio.TimerHandle | None = None  # sends the held ACKs (see Stack.flush)
        self._hold_acks = self.stack.config.ack_hold > 0
        self._deferred: list[Callable[[], None]] = []  # see `defer`
        self._started = False
        self.buffer_budget = self.stack.config.buffer_budget
        self._buffered = 0  # bytes in the transports' write buffers
        self.over_budget = False
        self.budget_pauses = 0  # how often all flows were paused for the budget

    def start(self) -> None:
        """Start reading the port; the stack's output goes back to it."""
        self.port.start(self.stack, self._loop, self._on_readable, self._port_failed)
        self._started = True
        self._arm_timer()

    def close(self) -> None:
        """Stop reading, reset every flow and free the stack."""
        if self._started:
            self.port.stop()
            self._started = False
        if self._timer:
            self._timer.cancel()
        if self._held_acks:
            self._held_acks.cancel()
            self._held_acks = None
        for transport in list(self._transports.values()):
            transport._connection_lost(ConnectionAbortedError("netstack closed"))
        self._transports.clear()
        if not isinstance(self.port, FdPort) and not self.stack._closed:
            # Stack.close resets the apps' connections in C; an fd receives those RSTs at once, a queue
            # would be freed with them. Reset the flows here, so the port can still send them.
            for flow in list(self.stack.flows.values()):
                flow.abort()
            self.stack.flush()
            self.port.write_batch(self.stack)
        self.stack.close()

    def accept(self, flow: TcpFlow, protocol_factory: Callable[[], asyncio.BaseProtocol]) -> TcpTransport:
        """Complete the app's handshake and wire the flow to a new protocol."""
        protocol = protocol_factory()
        transport = TcpTransport(self, flow, protocol)
        flow.accept()
        self._transports[flow.id] = transport
        protocol.connection_made(transport)
        if not (self._kicked or self._dispatching):
            self._kick()
        return transport

    def udp_send(self, src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
        """Deliver a datagram to an app (see ``Stack.udp_send``)."""
        self.stack.udp_send(src, dst, payload)
        self.port.write_batch(self.stack)

    def icmp_echo_reply(self, src: str, dst: str, ident: int, seq: int, payload: bytes) -> None:
        """Deliver a real echo reply to an app (see ``Stack.icmp_echo_reply``)."""
        self.stack.icmp_echo_reply(src, dst, ident, seq, payload)
        self.port.write_batch(self.stack)

    def icmp_unreachable(
        self, reporter: str, app: tuple[str, int], dst: tuple[str, int], code: int, echo: bool = False
    ) -> None:
        """Send an app an ICMP destination-unreachable error (see ``Stack.icmp_unreachable``)."""
        self.stack.icmp_unreachable(reporter, app, dst, code, echo)
        self.port.write_batch(self.stack)

    def defer(self, callback: Callable[[], None]) -> None:
        """Run `callback` once the protocols have been handed the batch of events being handled (before the
        stack sends its own output and before the loop's next turn), or on the loop's next turn when no
        batch is being handled.

        For what a protocol gathers while a batch is delivered (an upstream connection's packets): it
        leaves with the batch instead of a turn of the loop later, and still in one piece per batch."""
        if self._dispatching:
            self._deferred.append(callback)
        else:
            self._loop.call_soon(callback)

    @property
    def transports(self) -> dict[int, TcpTransport]:
        return self._transports

    def buffered_bytes(self) -> int:
        """Bytes buffered for all flows: held by the stack plus the transports' write buffers."""
        return self._buffered + self.stack.memory_in_use()

    def _check_budget(self) -> None:
        total = self._buffered + self.stack.memory_in_use()
        if not self.over_budget:
            if total > self.buffer_budget:
                self.over_budget = True
                self.budget_pauses += 1
                log.info("flows paused: %d bytes buffered, budget %d", total, self.buffer_budget)
                for transport in list(self._transports.values()):
                    transport._budget_pause()
        elif total <= self.buffer_budget * 3 // 4:
            self.over_budget = False
            log.info("flows resumed: %d bytes buffered", total)
            for transport in list(self._transports.values()):
                transport._budget_resume()
            self._kick()  # withheld acknowledgements were just sent

    # -- the loop's side --

    def _on_readable(self) -> None:
        read_batch, stack = self.port.read_batch, self.stack
        try:
            for _ in range(8):  # bounded, so other callbacks get their turn under load
                n = read_batch(stack, PUMP_BATCH)
                self._dispatch()
                if n < PUMP_BATCH:
                    break
        except OSError as exc:
            self._port_failed(exc)
        self._arm_timer()

    def _port_failed(self, exc: BaseException) -> None:
        # The device is gone (deleted, the fd detached, the Wintun session ended): stop reading instead
        # of spinning. The flows stay until the owner closes; their timers still run.
        if self._started:
            log.error("TUN read failed, no longer reading it: %s", exc)
            self.port.stop()
            self._started = False

    def _kick(self) -> None:
        """Operations outside a batch may queue events or start lwIP timers: handle them soon. (Inside a
        batch the dispatch does it at its end: no extra turn of the loop.) The per-flow callers test
        `_kicked` and `_dispatching` before they call: several calls per flow would do nothing."""
        if not self._kicked and not self._dispatching:
            self._kicked = True
            self._loop.call_soon(self._after_ops)

    def _after_ops(self) -> None:
        self._kicked = False
        self._dispatch()
        self._arm_timer()

    def _on_timer(self) -> None:
        self._timer = None
        self.stack.handle_timer()
        self._dispatch()
        self._arm_timer()

    def _run_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for callback in deferred:
            try:
                callback()
            except Exception:  # as the loop would report a failed callback; the others still run
                log.exception("error in a callback deferred to the end of a batch")

    def _send_now(self) -> None:
        """A small write from outside a batch (an answer from upstream): send it now instead of a turn
        later. What other flows queued leaves with it."""
        owed = self.stack.flush()
        if owed:
            self._owe_acks(owed)
        if self._port_queues:
            self.port.write_batch(self.stack)

    def _owe_acks(self, owed: int, now: bool = False) -> None:
        """Send or schedule the bare ACKs that `Stack.flush` says are still owed (held ones as owed now
        when the stack holds none: `StackConfig.ack_hold` 0). `now`: at the end of a batch, whose way
        upstream (an SSH connection's packets, through `defer`) has already gone."""
        if owed & ACKS_HELD and self._hold_acks:
            if self._held_acks is None:
                self._held_acks = self._loop.call_later(self.stack.config.ack_hold, self._flush_held_acks)
            owed &= ~ACKS_HELD
        if not owed:
            return
        if now:
            self._send_owed_acks()
        elif not self._acks_scheduled:
            self._acks_scheduled = True
            self._loop.call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        # A turn after the answer that owed them (outside a batch: other consumers' sends of this turn
        # go first, so the bare ACK is off their way upstream).
        self._acks_scheduled = False
        if not self.stack._closed:
            self._send_owed_acks()
            if self._port_queues:
                self.port.write_batch(self.stack)

    def _send_owed_acks(self) -> None:
        # Held ones (new connections' requests) wait for their answer, up to ack_hold.
        if self.stack.flush_acks(held=not self._hold_acks) and self._held_acks is None:
            self._held_acks = self._loop.call_later(self.stack.config.ack_hold, self._flush_held_acks)

    def _flush_held_acks(self) -> None:
        # The held ACKs whose answer did not come within ack_hold (one timer for all: an ACK owed later
        # than the timer's start waits less, never more).
        self._held_acks = None
        if not self.stack._closed:
            self.stack.flush_acks()
            if self._port_queues:
                self.port.write_batch(self.stack)

    def _arm_timer(self) -> None:
        delay = self.stack.timer_deadline() if not self.stack._closed else None
        if delay is None:
            return
        when = self._loop.time() + delay
        if self._timer is not None:
            if self._timer.when() <= when + 0.001:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _dispatch(self) -> None:
        stack = self.stack
        handlers = self._handlers
        self._dispatching = True
        try:
            for _ in range(DISPATCH_PASSES):  # what the handlers cause (an accept that fails...) comes next
                events = stack.events()
                if not events:
                    break
                for event in events:
                    try:
                        # One dict lookup by the event's type instead of a chain of isinstance checks (a
                        # short connection produces about a dozen events), straight from here: no call
                        # in between.
                        handlers[type(event)](self, event)
                    except Exception:  # one misbehaving protocol must not take the others down
                        log.exception("error while handling %s", type(event).__name__)
                if self._deferred:  # before the stack's own work below: the request's way upstream first
                    self._run_deferred()
            else:
                self._dispatching = False
                self._kick()  # still more: on the next turn, so other callbacks get theirs
        finally:
            self._dispatching = False
            if self._deferred:  # (only when something above raised)
                self._run_deferred()
        owed = stack.flush()  # what was written leaves now, a FIN with the data
        if owed:
            self._owe_acks(owed, now=True)
        if self._port_queues:  # (an fd port: it already left)
            self.port.write_batch(stack)
        self._check_budget()

    def _on_data(self, event: TcpDataReceived) -> None:
        transport = self._transports.get(event.flow.id)
        if transport is not None:
            transport._deliver()

    def _on_udp(self, event: UdpDatagram) -> None:
        self.on_udp(event)

    def _on_icmp(self, event: IcmpEchoRequest) -> None:
        self.on_icmp(event)

    def _on_connect(self, event: TcpConnectRequest) -> None:
        self.on_tcp(event.flow)

    def _on_writable(self, event: TcpWritable) -> None:
        transport = self._transports.get(event.flow.id)
        if transport is not None:
            transport._flush()

    def _on_eof(self, event: TcpEndOfStream) -> None:
        transport = self._transports.get(event.flow.id)
        if transport is None:
            return
        transport._eof_waiting = True
        if transport._data_waiting or transport._reading_paused:
            transport._deliver()  # (paused: it does nothing; resume_reading delivers the bytes, then EOF)
        else:
            # Every byte signalled before the EOF was delivered already (a READABLE event comes before
            # the EOF of the same segment, and _deliver reads until the queue is empty): no read needed.
            transport._eof_waiting = False
            transport._protocol.eof_received()

    def _on_closed(self, event: TcpClosed) -> None:
        transport = self._transports.get(event.flow.id)
        if transport is not None:
            transport._closed_by_stack(event.reason)

    _handlers: dict[type, Callable[[TunStack, Any], None]] = {
        TcpDataReceived: _on_data,
        UdpDatagram: _on_udp,
        IcmpEchoRequest: _on_icmp,
        TcpConnectRequest: _on_connect,
        TcpWritable: _on_writable,
        TcpEndOfStream: _on_eof,
        TcpClosed: _on_closed,
    }
