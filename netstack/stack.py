"""The sans-IO TCP/IP stack: raw IP packets in, events and packets out.

Theory of operation. ``Stack`` wraps the native core (lwIP plus our C glue). Feed it packets with
``receive_packet`` (or let the C pump read a TUN fd with ``pump``), then drain ``events()``. Packets to
deliver back to the apps either go straight to the fd given to ``set_output_fd`` or wait in
``packets_to_send()``. Time is lwIP's: call ``handle_timer`` when ``timer_deadline`` says so; tests can run
the clock by hand (``clock="manual"``) for deterministic retransmission and TIME_WAIT behaviour.

A TCP connection starts as a ``TcpConnectRequest``: nothing has been answered yet, so the consumer can
first open its upstream (an SSH channel) and then ``accept`` (the handshake completes) or ``refuse`` (the
app gets a RST at once). Received bytes stay in the stack until read; the app's receive window reopens
only when the consumer calls ``ack`` for bytes it has handed on, which is what bounds memory per flow.
A connection that ends gracefully keeps its unread bytes: ``TcpClosed(NORMAL)`` comes after the last read.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Literal

from netstack._loader import load
from netstack.errors import FlowClosedError, LocalProtocolError, NetstackError, StackBusyError
from netstack.events import (
    Address,
    CloseReason,
    Event,
    IcmpEchoRequest,
    TcpClosed,
    TcpConnectRequest,
    TcpDataReceived,
    TcpEndOfStream,
    TcpWritable,
    UdpDatagram,
)

ffi, lib = load()

READ_CHUNK = 256 * 1024
ACKS_NOW = int(lib.NS_ACKS_NOW)  # Stack.flush: bare ACKs owed, to send soon
ACKS_HELD = int(lib.NS_ACKS_HELD)  # Stack.flush: first ACKs of flows, which may wait for an answer
_FAMILY = {4: (socket.AF_INET, 4), 6: (socket.AF_INET6, 16)}
_ERRORS = {
    lib.NS_ENOFLOW: "flow already released",
    lib.NS_ESTATE: "not allowed in the flow's state",
    lib.NS_ECLOSED: "connection is gone",
    lib.NS_EMEM: "out of memory",
    lib.NS_ETOOBIG: "datagram does not fit the MTU",
    lib.NS_EINVAL: "invalid argument",
}


def _raise(code: int, what: str) -> None:
    message = f"{what}: {_ERRORS.get(code, f'error {code}')}"
    if code in (lib.NS_ENOFLOW, lib.NS_ECLOSED):
        raise FlowClosedError(message)
    if code in (lib.NS_ESTATE, lib.NS_EINVAL, lib.NS_ETOOBIG):
        raise LocalProtocolError(message)
    raise NetstackError(message)


# Address conversions, cached: a UDP flow converts the same two addresses for every datagram (about a
# tenth of an upload's CPU). Bounded: past ADDRESS_CACHE entries a cache starts over.
ADDRESS_CACHE = 4096
_names: dict[bytes, str] = {}  # packed address (4 or 16 bytes) -> text
_packed_cache: dict[str, tuple[int, bytes, Any]] = {}  # text -> family, packed, the same as a C array


def _address(family: int, raw: Any, port: int) -> Address:
    key = ffi.buffer(raw, _FAMILY[family][1])[:]
    host = _names.get(key)
    if host is None:
        host = socket.inet_ntop(_FAMILY[family][0], key)
        if len(_names) >= ADDRESS_CACHE:
            _names.clear()
        _names[key] = host
    return host, port


# A UDP flow's datagrams all carry the same (src, dst) pair: one lookup by the event's raw tuple bytes (ports,
# family, both addresses; the native core zeroes every event) instead of two conversions per datagram.
_EVENT_SIZE = ffi.sizeof("ns_event")
_TUPLE_START = ffi.offsetof("ns_event", "sport")
_TUPLE_END = ffi.offsetof("ns_event", "dst") + 16
_udp_pairs: dict[bytes, tuple[Address, Address]] = {}

# A TCP connection's hosts, by the event's raw family and address bytes: every connection between the same
# two hosts converts them once (its ports differ).
_HOSTS_START = ffi.offsetof("ns_event", "family")
_HOSTS_END = ffi.offsetof("ns_event", "dst") + 16
_tcp_hosts: dict[bytes, tuple[str, str]] = {}


def _tcp_hosts_of(ev: Any, key: bytes) -> tuple[str, str]:
    hosts = (_address(ev.family, ev.src, 0)[0], _address(ev.family, ev.dst, 0)[0])
    if len(_tcp_hosts) >= ADDRESS_CACHE:
        _tcp_hosts.clear()
    _tcp_hosts[key] = hosts
    return hosts


# Event kinds as plain ints: the events loop compares each event against several (a cffi `lib` attribute
# is a lookup each time).
_EV_READABLE = int(lib.NS_EV_TCP_READABLE)
_EV_UDP = int(lib.NS_EV_UDP)
_EV_ICMP_ECHO = int(lib.NS_EV_ICMP_ECHO)
_EV_CONNECT = int(lib.NS_EV_TCP_CONNECT)
_EV_EOF = int(lib.NS_EV_TCP_EOF)
_EV_WRITABLE = int(lib.NS_EV_TCP_WRITABLE)
_EV_CLOSED = int(lib.NS_EV_TCP_CLOSED)


def _udp_pair(ev: Any, key: bytes) -> tuple[Address, Address]:
    pair = (_address(ev.family, ev.src, ev.sport), _address(ev.family, ev.dst, ev.dport))
    if len(_udp_pairs) >= ADDRESS_CACHE:
        _udp_pairs.clear()
    _udp_pairs[key] = pair
    return pair


# Replies of a UDP flow go out between the same two hosts: their family and C arrays in one lookup.
_udp_hosts: dict[tuple[str, str], tuple[int, Any, Any]] = {}


def _packed_entry(host: str) -> tuple[int, bytes, Any]:
    entry = _packed_cache.get(host)
    if entry is None:
        try:
            family, raw = 4, socket.inet_pton(socket.AF_INET, host)
        except (OSError, TypeError):
            try:
                family, raw = 6, socket.inet_pton(socket.AF_INET6, host)
            except (OSError, TypeError):
                raise LocalProtocolError(f"not an IP address: {host!r}") from None
        entry = (family, raw, ffi.new("uint8_t[]", raw))
        if len(_packed_cache) >= ADDRESS_CACHE:
            _packed_cache.clear()
        _packed_cache[host] = entry
    return entry


def _packed(host: str) -> tuple[int, bytes]:
    family, raw, _ = _packed_entry(host)
    return family, raw


def _pair(src: str, dst: str) -> tuple[int, bytes, bytes]:
    fam_s, raw_s = _packed(src)
    fam_d, raw_d = _packed(dst)
    if fam_s != fam_d:
        raise LocalProtocolError(f"address families differ: {src} -> {dst}")
    return fam_s, raw_s, raw_d


UNREACH_NET = 0
UNREACH_HOST = 1
UNREACH_PORT = 2
UNREACH_PROHIBITED = 3


@dataclass(frozen=True)
class StackConfig:
    """Settings fixed for the life of a stack.

    ``mtu`` bounds every packet the stack emits and the MSS it advertises (match the TUN's MTU);
    ``max_flows`` caps live TCP flows (pending ones included): SYNs beyond it are answered with a RST.
    ``buffer_budget`` caps the bytes buffered for all flows together (in the stack and in the asyncio
    adapter's write buffers); beyond it the adapter stops reading, it never drops (see ``netstack.aio``).
    ``ack_hold`` (seconds) lets a flow's first owed ACK wait that long for an answer to carry it (see
    ``Stack.flush``); 0, the default, holds none: every owed ACK leaves when the caller's batch ends.
    A hold saves a packet each way through the TUN only when the answer comes within it (a server a
    fraction of a millisecond away: a lab, a local upstream); over a real network the answer takes longer
    than any sensible hold, and an app that writes twice with Nagle on and then waits for the answer waits
    the whole hold, once per connection. Measured in the lab with 8 ms: about 1 % less CPU per short
    connection (``python -m benchmarks.profile_connect``); the VPN keeps the default.
    ``verify_checksums``: drop TCP and UDP packets whose checksum is wrong. Turn it off only when
    every packet comes from the local kernel (a TUN device), which computed the checksums over the same
    memory: verifying them again is a pass over every byte received (about a tenth of x2ssh's CPU on a bulk
    upload). Malformed headers are dropped either way.
    """

    mtu: int = 65535
    max_flows: int = 65536
    buffer_budget: int = 128 * 1024 * 1024
    ack_hold: float = 0.0
    verify_checksums: bool = True


class TcpFlow:
    """One TCP connection from an app, addressed by its original 4-tuple.

    ``src`` is the app's address and port, ``dst`` the destination it connected to. Every method raises
    ``FlowClosedError`` once the connection is gone (and once the flow was released, before the core is
    asked: its id may belong to a new connection by then), and ``LocalProtocolError`` on misuse.
    """

    __slots__ = ("_stack", "closed", "dst", "eof_received", "id", "src", "user_data")

    def __init__(self, stack: Stack, flow_id: int, src: Address, dst: Address) -> None:
        self._stack = stack
        self.id = flow_id
        self.src = src
        self.dst = dst
        self.closed = False
        self.eof_received = False
        self.user_data: Any = None  # free for the consumer (e.g. its channel)

    def __repr__(self) -> str:
        return f"<TcpFlow {self.id:#x} {self.src[0]}:{self.src[1]} -> {self.dst[0]}:{self.dst[1]}>"

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            _raise(rc, what)
        return rc

    def _released(self, what: str) -> FlowClosedError:
        # A released flow's id comes back for a new connection (after 1023 others: see ns_glue.c's
        # flow_new), so a released flow must never reach the core by its id.
        return FlowClosedError(f"{what}: flow already released")

    def accept(self) -> None:
        """Complete the app's handshake (SYN-ACK)."""
        if self.closed:
            raise self._released("accept")
        rc = lib.ns_tcp_accept(self.id)
        if rc < 0:  # (inline, not _check: every connection passes here)
            _raise(rc, "accept")

    def refuse(self) -> None:
        """Answer the app's SYN with a RST and release the flow."""
        if self.closed:
            raise self._released("refuse")
        self._check(lib.ns_tcp_refuse(self.id), "refuse")
        self._stack._forget(self)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue bytes for the app; returns how many were taken (0 when the send buffer is full).

        They leave at the next ``Stack.flush`` (or ``packets_to_send``). After a short write a
        ``TcpWritable`` event says when to try again.
        """
        if self.closed:
            raise self._released("write")
        if not data:
            return 0
        rc: int = lib.ns_tcp_write(self.id, ffi.from_buffer("uint8_t[]", data), len(data))
        if rc < 0:
            _raise(rc, "write")
        return rc

    def read(self, max_bytes: int = READ_CHUNK) -> bytes:
        """Take up to ``max_bytes`` received bytes (b"" when none wait). Acknowledge them with ``ack``."""
        if self.closed:
            raise self._released("read")
        buf = self._stack._read_buf
        n = lib.ns_tcp_read(self.id, buf, max_bytes if max_bytes < READ_CHUNK else READ_CHUNK)
        if n > 0:
            return ffi.buffer(buf, n)[:]
        if n < 0:
            _raise(n, "read")
        return b""

    def ack(self, nbytes: int) -> None:
        """Say that ``nbytes`` read bytes were handed on: the app's receive window reopens by that much."""
        if self.closed:
            raise self._released("ack")
        rc = lib.ns_tcp_ack(self.id, nbytes)
        if rc < 0:
            _raise(rc, "ack")

    def shutdown(self) -> None:
        """Half-close: send FIN after the queued bytes; the app may still send."""
        if self.closed:
            raise self._released("shutdown")
        rc = lib.ns_tcp_shutdown(self.id)
        if rc < 0:
            _raise(rc, "shutdown")

    def close(self) -> None:
        """Release the flow gracefully (FIN); unread bytes are dropped. Safe to call twice."""
        if not self.closed:
            lib.ns_tcp_close(self.id, 0)
            self._stack._forget(self)

    def abort(self) -> None:
        """Release the flow with a RST to the app. Safe to call twice."""
        if not self.closed:
            lib.ns_tcp_close(self.id, 1)
            self._stack._forget(self)

    @property
    def send_buffer_free(self) -> int:
        """Bytes ``write`` would take right now."""
        return 0 if self.closed else int(lib.ns_tcp_sndbuf(self.id))


class Stack:
    """A user-space TCP/IP stack for every destination, driven by packets and time.

    lwIP keeps global state, so one ``Stack`` can be open per process; ``close()`` (or a ``with``
    block) frees it for the next one.
    """

    _open = False

    def __init__(
        self, config: StackConfig | None = None, *, clock: Literal["monotonic", "manual"] = "monotonic"
    ):
        if Stack._open:
            raise StackBusyError("another netstack.Stack is open in this process; close it first")
        self.config = config or StackConfig()
        if self.config.buffer_budget < 1:
            raise LocalProtocolError(f"buffer_budget must be positive, not {self.config.buffer_budget}")
        if not 0 <= self.config.ack_hold <= 0.2:  # beyond the app's minimum retransmission timeout
            raise LocalProtocolError(f"ack_hold must be 0 to 0.2 seconds, not {self.config.ack_hold}")
        rc = lib.ns_open(self.config.mtu, self.config.max_flows)
        if rc < 0:
            _raise(rc, f"open (mtu={self.config.mtu}, max_flows={self.config.max_flows})")
        Stack._open = True
        self._closed = False
        self._manual = clock == "manual"
        self._now_ms = 0
        lib.ns_set_clock(1 if self._manual else 0, 0)
        lib.ns_set_verify_checksums(1 if self.config.verify_checksums else 0)
        self._flows: dict[int, TcpFlow] = {}
        self._read_buf = ffi.new("uint8_t[]", READ_CHUNK)
        self._ev_ptr = ffi.new("const ns_event **")
        self._arena_ptr = ffi.new("const uint8_t **")
        self._out_ptr = ffi.new("const uint8_t **")

    # -- lifecycle --

    def close(self) -> None:
        """Abort every flow (RST) and free the stack."""
        if self._closed:
            return
        for flow in self._flows.values():
            flow.closed = True
        self._flows.clear()
        lib.ns_close()
        self._closed = True
        Stack._open = False

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- packets in and out --

    def receive_packet(self, packet: bytes | bytearray | memoryview) -> None:
        """Feed one raw IPv4 or IPv6 packet from the apps. Malformed packets are dropped and counted."""
        if packet:
            lib.ns_input(ffi.from_buffer("uint8_t[]", packet), len(packet))

    def pump(self, fd: int, max_packets: int = 256) -> int:
        """Read and feed up to ``max_packets`` packets from a non-blocking fd (a TUN device) in C."""
        rc = lib.ns_pump(fd, max_packets)
        if rc < 0:
            raise OSError(-rc, f"reading the TUN device: {os.strerror(-rc)}")
        return rc

    def flush(self) -> int:
        """Send what ``TcpFlow.write`` queued. Writes wait for this (once per turn of the caller's loop) so
        that several writes and a FIN leave in as few segments as possible; ``packets_to_send`` flushes
        first by itself.

        Returns which ACKs apps are still owed for bytes they sent (the end of a write, or bytes the
        consumer acknowledged, and no answer carried the ACK), as bits (0: none). ``ACKS_NOW``: call
        ``flush_acks(held=False)`` soon, ideally once this turn's other sends (the request's way upstream)
        are out. ``ACKS_HELD``: a flow's first owed ACK (the end of a new connection's request, typically),
        which may wait up to ``StackConfig.ack_hold`` for the answer to carry it; then call
        ``flush_acks()``."""
        return int(lib.ns_flush())

    def flush_acks(self, held: bool = True) -> bool:
        """Send the ACKs still owed to apps as bare ACKs; with ``held=False`` keep those that may still wait
        for an answer. Returns whether held ones are still owed. (``packets_to_send`` sends all of them.)"""
        return bool(lib.ns_flush_acks(1 if held else 0))

    def set_output_fd(self, fd: int | None) -> None:
        """Write output packets straight to ``fd`` (a TUN device), or queue them when None."""
        lib.ns_set_output_fd(-1 if fd is None else fd)

    def packets_to_send(self) -> list[bytes]:
        """Queued output packets (when no output fd is set), oldest first."""
        n = lib.ns_out_take(self._out_ptr)
        if not n:
            return []
        raw = ffi.buffer(self._out_ptr[0], n)[:]
        lib.ns_out_clear()
        packets, pos = [], 0
        while pos < n:
            length = int.from_bytes(raw[pos : pos + 4], "little")
            packets.append(raw[pos + 4 : pos + 4 + length])
            pos += 4 + length
        return packets

    def udp_send(self, src: Address, dst: Address, payload: bytes) -> None:
        """Deliver a datagram to an app: it appears to come from ``src`` and is addressed to ``dst``."""
        hosts = _udp_hosts.get((src[0], dst[0]))
        if hosts is None:
            fam_s, _, c_src = _packed_entry(src[0])
            fam_d, _, c_dst = _packed_entry(dst[0])
            if fam_s != fam_d:
                raise LocalProtocolError(f"address families differ: {src[0]} -> {dst[0]}")
            if len(_udp_hosts) >= ADDRESS_CACHE:
                _udp_hosts.clear()
            hosts = _udp_hosts[(src[0], dst[0])] = (fam_s, c_src, c_dst)
        rc = lib.ns_udp_send(
            hosts[0], hosts[1], src[1], hosts[2], dst[1], ffi.from_buffer("uint8_t[]", payload), len(payload)
        )
        if rc < 0:
            _raise(rc, f"udp_send of {len(payload)} bytes")

    # -- ICMP --

    def icmp_echo_reply(self, src: str, dst: str, ident: int, seq: int, payload: bytes) -> None:
        """Deliver the real echo reply of ``src`` (the pinged host) to the app at ``dst``."""
        family, raw_s, raw_d = _pair(src, dst)
        rc = lib.ns_icmp_echo_reply(
            family,
            ffi.from_buffer("uint8_t[]", raw_s),
            ffi.from_buffer("uint8_t[]", raw_d),
            ident & 0xFFFF,
            seq & 0xFFFF,
            ffi.from_buffer("uint8_t[]", payload),
            len(payload),
        )
        if rc < 0:
            _raise(rc, f"icmp_echo_reply of {len(payload)} bytes")

    def icmp_unreachable(
        self, reporter: str, app: Address, dst: Address, code: int, echo: bool = False
    ) -> None:
        """Tell the app its packet ``app`` -> ``dst`` could not be delivered, as ``reporter`` would.

        ``code``: ``UNREACH_NET``, ``UNREACH_HOST``, ``UNREACH_PORT`` or ``UNREACH_PROHIBITED`` (ICMP type 3
        code 0/1/3/13, ICMPv6 type 1 code 0/3/4/1). The quoted original is a UDP header with the two ports,
        or with ``echo`` an echo request whose identifier and sequence number are the two "ports".
        """
        family, raw_a, raw_d = _pair(app[0], dst[0])
        fam_r, raw_r = _packed(reporter)
        if fam_r != family:
            raise LocalProtocolError(f"address families differ: {reporter} -> {app[0]}")
        proto = (1 if family == 4 else 58) if echo else 17
        rc = lib.ns_icmp_unreachable(
            family,
            ffi.from_buffer("uint8_t[]", raw_r),
            ffi.from_buffer("uint8_t[]", raw_a),
            ffi.from_buffer("uint8_t[]", raw_d),
            proto,
            app[1] & 0xFFFF,
            dst[1] & 0xFFFF,
            code,
        )
        if rc < 0:
            _raise(rc, f"icmp_unreachable code {code}")

    # -- events --

    def events(self) -> list[Event]:
        """Everything that happened since the last call, in order."""
        n = lib.ns_events(self._ev_ptr, self._arena_ptr)
        if not n:
            return []
        evs, arena, flows = self._ev_ptr[0], self._arena_ptr[0], self._flows
        out: list[Event] = []
        raw = None  # the events' bytes, for the address caches' keys
        for i in range(n):
            ev = evs[i]
            kind = ev.type
            if kind == _EV_READABLE:
                flow = flows.get(ev.flow)
                if flow is not None:
                    out.append(TcpDataReceived(flow))
            elif kind == _EV_UDP:
                if raw is None:
                    raw = ffi.buffer(evs, n * _EVENT_SIZE)
                at = i * _EVENT_SIZE
                pair = _udp_pairs.get(raw[at + _TUPLE_START : at + _TUPLE_END])
                if pair is None:
                    pair = _udp_pair(ev, raw[at + _TUPLE_START : at + _TUPLE_END])
                out.append(UdpDatagram(pair[0], pair[1], ffi.buffer(arena + ev.off, ev.len)[:]))
            elif kind == _EV_ICMP_ECHO:
                out.append(
                    IcmpEchoRequest(
                        _address(ev.family, ev.src, 0)[0],
                        _address(ev.family, ev.dst, 0)[0],
                        ev.sport,
                        ev.dport,
                        ffi.buffer(arena + ev.off, ev.len)[:],
                    )
                )
            elif kind == _EV_CONNECT:
                if raw is None:
                    raw = ffi.buffer(evs, n * _EVENT_SIZE)
                at = i * _EVENT_SIZE
                key = raw[at + _HOSTS_START : at + _HOSTS_END]
                hosts = _tcp_hosts.get(key) or _tcp_hosts_of(ev, key)
                flow_id = ev.flow
                flow = TcpFlow(self, flow_id, (hosts[0], ev.sport), (hosts[1], ev.dport))
                flows[flow_id] = flow
                out.append(TcpConnectRequest(flow))
            else:
                flow = flows.get(ev.flow)
                if flow is None:
                    continue  # released by the consumer earlier in this batch
                if kind == _EV_EOF:
                    flow.eof_received = True
                    out.append(TcpEndOfStream(flow))
                elif kind == _EV_WRITABLE:
                    out.append(TcpWritable(flow))
                elif kind == _EV_CLOSED:
                    lib.ns_tcp_close(flow.id, 1)  # the pcb is gone: this only frees the slot
                    self._forget(flow)
                    out.append(TcpClosed(flow, CloseReason(ev.err)))
        lib.ns_events_clear()
        return out

    def _forget(self, flow: TcpFlow) -> None:
        flow.closed = True
        self._flows.pop(flow.id, None)

    # -- time --

    def handle_timer(self, now: float | None = None) -> None:
        """Run lwIP's due timers. With the manual clock, ``now`` (seconds) sets the time first."""
        if self._manual:
            if now is None:
                raise LocalProtocolError("a manual-clock stack needs `now` in handle_timer")
            self._now_ms = int(now * 1000)
            lib.ns_set_clock(1, self._now_ms)
        lib.ns_timers()

    def timer_deadline(self) -> float | None:
        """Seconds until ``handle_timer`` is due, or None when no timer is pending."""
        ms = lib.ns_next_timer_ms()
        return None if ms == 0xFFFFFFFF else ms / 1000.0

    # -- introspection --

    @property
    def flows(self) -> dict[int, TcpFlow]:
        """Live flows by id (pending ones included)."""
        return self._flows

    def memory_in_use(self) -> int:
        """Bytes the stack holds right now (data not yet read or not yet acknowledged by the apps, pcbs)."""
        return int(lib.ns_mem_in_use())

    def stats(self) -> dict[str, int]:
        """Counters: packets and bytes each way, drops by reason, live flows and pcbs, bytes lwIP holds."""
        st = ffi.new("ns_stats *")
        lib.ns_get_stats(st)
        counters = {name: int(getattr(st, name)) for name, _ in ffi.typeof("ns_stats").fields}
        icmp = ffi.new("ns_icmp_stats *")
        lib.ns_get_icmp_stats(icmp)
        counters.update(
            {f"icmp_{name}": int(getattr(icmp, name)) for name, _ in ffi.typeof("ns_icmp_stats").fields}
        )
        return counters
