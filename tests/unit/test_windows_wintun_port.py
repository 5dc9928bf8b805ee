"""The Wintun packet port's thread and queue logic, driven by a fake ring on a real event loop: alone (with a
recording stand-in for the stack) and as the packet port of `netstack.aio.TunStack` with a real stack."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP

from netstack import UdpDatagram
from netstack.aio import TunStack
from x2ssh.host.windows.wintun import MAX_IP_PACKET, WintunPort


class FakeRing:
    """A ring with a packet queue, a read event and a cancel flag, like a Wintun session."""

    def __init__(self, send_capacity: int = 1000) -> None:
        self.incoming: list[bytes] = []
        self.sent: list[bytes] = []
        self.send_capacity = send_capacity
        self.cond = threading.Condition()
        self.cancelled = False
        self.closed = 0
        self.fail: BaseException | None = None
        self.receives = 0

    def push(self, *packets: bytes) -> None:
        with self.cond:
            self.incoming.extend(packets)
            self.cond.notify_all()

    def receive(self) -> bytes | None:
        with self.cond:
            self.receives += 1
            if self.fail is not None:
                raise self.fail
            return self.incoming.pop(0) if self.incoming else None

    def wait(self) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: self.incoming or self.cancelled or self.fail is not None)
            return not self.cancelled

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify_all()

    def send(self, packet: bytes) -> bool:
        if len(self.sent) >= self.send_capacity:
            return False
        self.sent.append(packet)
        return True

    def close(self) -> None:
        self.closed += 1


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test on a fresh event loop (the unit tests use no pytest plugin for asyncio)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


class RecordingStack:
    """The part of a netstack Stack the port uses: packets in, queued output out."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.output: list[bytes] = []
        self.output_fd: int | None = -2

    def set_output_fd(self, fd: int | None) -> None:
        self.output_fd = fd

    def receive_packet(self, packet: bytes) -> None:
        self.received.append(packet)

    def packets_to_send(self) -> list[bytes]:
        out, self.output = self.output, []
        return out


async def _collect(port: WintunPort, want: int) -> tuple[list[int], RecordingStack, list[BaseException]]:
    """Start the port; each readiness call reads everything queued. Returns the batch sizes read."""
    stack = RecordingStack()
    reads: list[int] = []
    errors: list[BaseException] = []
    done = asyncio.Event()

    def on_readable() -> None:
        assert threading.current_thread() is threading.main_thread()  # called on the loop's thread
        reads.append(port.read_batch(stack, 10_000))  # type: ignore[arg-type]
        if len(stack.received) >= want:
            done.set()

    def on_error(exc: BaseException) -> None:
        errors.append(exc)
        done.set()

    port.start(stack, asyncio.get_running_loop(), on_readable, on_error)  # type: ignore[arg-type]
    assert stack.output_fd is None, "the stack keeps its output queued for write_batch"
    await asyncio.wait_for(done.wait(), 10)
    return reads, stack, errors


@in_loop
async def test_packets_arrive_in_order_in_bounded_batches() -> None:
    ring = FakeRing()
    packets = [bytes([i % 256]) * 20 for i in range(1000)]
    ring.push(*packets)
    port = WintunPort(ring, max_batch=64)
    reads, stack, errors = await _collect(port, len(packets))
    port.close()
    assert errors == []
    assert stack.received == packets
    assert max(reads) == 64
    assert ring.cancelled and ring.closed == 1


@in_loop
async def test_reader_sleeps_on_the_event_and_wakes_for_new_packets() -> None:
    ring = FakeRing()
    port = WintunPort(ring)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, ring.push, b"late-1", b"late-2")
    _, stack, _ = await _collect(port, 2)
    port.close()
    assert stack.received == [b"late-1", b"late-2"]


@in_loop
async def test_pending_limit_blocks_the_reader_until_batches_are_read() -> None:
    ring = FakeRing()
    ring.push(*[b"y"] * 50)
    loop = asyncio.get_running_loop()
    port = WintunPort(ring, max_batch=5, max_pending=3)
    stack = RecordingStack()
    ready: list[int] = []
    port.start(stack, loop, lambda: ready.append(1), lambda exc: None)  # type: ignore[arg-type]
    # Nobody reads: 3 batches of 5 are handed over, a 4th is drained and waits for a slot.
    for _ in range(500):
        await asyncio.sleep(0.01)
        with ring.cond:
            if ring.receives >= 20:
                break
    await asyncio.sleep(0.05)
    with ring.cond:
        assert len(ring.incoming) == 50 - 20
    assert len(ready) == 3
    # Reading part of a batch frees no slot; reading it whole does.
    assert port.read_batch(stack, 3) == 3  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    with ring.cond:
        assert len(ring.incoming) == 30
    assert port.read_batch(stack, 100) == 12  # type: ignore[arg-type]
    # With slots free again the reader goes on; reading as it delivers, everything arrives once, in order.
    for _ in range(1000):
        port.read_batch(stack, 100)  # type: ignore[arg-type]
        if len(stack.received) == 50:
            break
        await asyncio.sleep(0.005)
    port.close()
    assert stack.received == [b"y"] * 50


@in_loop
async def test_reader_error_is_reported_on_the_loop_not_raised_in_the_thread() -> None:
    ring = FakeRing()
    port = WintunPort(ring)
    ring.fail = OSError(38, "Reached the end of the file")  # ERROR_HANDLE_EOF: the adapter went away
    ring.push(b"z")
    _, stack, errors = await _collect(port, 1)
    port.close()
    assert stack.received == [] and len(errors) == 1 and getattr(errors[0], "errno", None) == 38
    assert port.error is errors[0]


@in_loop
async def test_stop_is_idempotent_and_nothing_is_delivered_after_it() -> None:
    ring = FakeRing()
    port = WintunPort(ring)
    ready: list[int] = []
    stack = RecordingStack()
    port.start(stack, asyncio.get_running_loop(), lambda: ready.append(1), lambda exc: None)  # type: ignore[arg-type]
    port.stop()
    ring.push(b"after")
    port.stop()
    await asyncio.sleep(0.01)
    assert ready == [] and port.read_batch(stack, 10) == 0  # type: ignore[arg-type]
    assert ring.closed == 0, "stop leaves the session to its owner"
    port.close()
    assert ring.closed == 1


def test_write_batch_sends_the_stacks_output_and_counts_drops() -> None:
    ring = FakeRing(send_capacity=2)
    port = WintunPort(ring)
    stack = RecordingStack()
    stack.output = [b"a", b"\x00" * (MAX_IP_PACKET + 1), b"b", b"c"]
    port.write_batch(stack)  # type: ignore[arg-type]
    assert ring.sent == [b"a", b"b"] and port.dropped_writes == 2 and stack.output == []


@in_loop
async def test_tun_stack_runs_on_the_wintun_port() -> None:
    """The whole seam on Linux: a real netstack Stack under TunStack, its packets through the fake ring."""
    ring = FakeRing()
    port = WintunPort(ring)
    got: list[UdpDatagram] = []
    arrived = asyncio.Event()

    def on_udp(datagram: UdpDatagram) -> None:
        got.append(datagram)
        arrived.set()

    tun = TunStack(port, on_udp=on_udp)
    tun.start()
    try:
        ring.push(bytes(IP(src="198.18.0.2", dst="198.19.0.53") / UDP(sport=5353, dport=53) / b"query"))
        await asyncio.wait_for(arrived.wait(), 10)
        assert [(d.src, d.dst, d.payload) for d in got] == [
            (("198.18.0.2", 5353), ("198.19.0.53", 53), b"query")
        ]
        tun.udp_send(("198.19.0.53", 53), ("198.18.0.2", 5353), b"answer")
        (reply,) = [IP(raw) for raw in ring.sent]
        assert reply[UDP].load == b"answer" and reply.dst == "198.18.0.2" and reply[UDP].dport == 5353
    finally:
        tun.close()
        port.close()
    assert ring.cancelled and ring.closed == 1


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    before = {t for t in threading.enumerate() if t.name == "wintun-reader"}
    yield
    for t in threading.enumerate():
        if t.name == "wintun-reader" and t not in before:
            t.join(5)
            assert not t.is_alive(), "the reader thread outlived close()"
