"""The Wintun packet port's thread and queue logic, driven by a fake ring on a real event loop."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

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


async def _collect(port: WintunPort, want: int) -> tuple[list[list[bytes]], list[BaseException]]:
    batches: list[list[bytes]] = []
    errors: list[BaseException] = []
    done = asyncio.Event()

    def on_batch(batch: list[bytes]) -> None:
        assert threading.current_thread() is threading.main_thread()  # delivered on the loop's thread
        batches.append(batch)
        if sum(map(len, batches)) >= want:
            done.set()

    def on_error(exc: BaseException) -> None:
        errors.append(exc)
        done.set()

    port.start(on_batch, on_error)
    await asyncio.wait_for(done.wait(), 10)
    return batches, errors


@in_loop
async def test_packets_arrive_in_order_in_bounded_batches() -> None:
    ring = FakeRing()
    packets = [bytes([i % 256]) * 20 for i in range(1000)]
    ring.push(*packets)
    port = WintunPort(ring, asyncio.get_running_loop(), max_batch=64)
    batches, errors = await _collect(port, len(packets))
    port.close()
    assert errors == []
    assert [p for b in batches for p in b] == packets
    assert max(map(len, batches)) == 64
    assert ring.cancelled and ring.closed == 1


@in_loop
async def test_reader_sleeps_on_the_event_and_wakes_for_new_packets() -> None:
    ring = FakeRing()
    port = WintunPort(ring, asyncio.get_running_loop())
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, ring.push, b"late-1", b"late-2")
    batches, _ = await _collect(port, 2)
    port.close()
    assert [p for b in batches for p in b] == [b"late-1", b"late-2"]


@in_loop
async def test_pending_limit_blocks_the_reader() -> None:
    ring = FakeRing()
    ring.push(*[b"y"] * 50)
    loop = asyncio.get_running_loop()
    port = WintunPort(ring, loop, max_batch=5, max_pending=3)
    got: list[list[bytes]] = []
    port.start(got.append, lambda exc: None)
    # Block the loop (no await) until the reader cannot post more: 3 batches of 5 drained, one more in hand.
    deadline = threading.Event()
    for _ in range(500):
        with ring.cond:
            if ring.receives >= 20:
                break
        deadline.wait(0.01)
    deadline.wait(0.05)
    with ring.cond:
        assert len(ring.incoming) == 50 - 20  # 4 batches read, 3 posted, the 4th waits for a slot
    await asyncio.sleep(0)
    port.close()


@in_loop
async def test_reader_error_is_reported_on_the_loop_not_raised_in_the_thread() -> None:
    ring = FakeRing()
    port = WintunPort(ring, asyncio.get_running_loop())
    ring.fail = OSError(38, "Reached the end of the file")  # ERROR_HANDLE_EOF: the adapter went away
    ring.push(b"z")
    batches, errors = await _collect(port, 1)
    port.close()
    assert batches == [] and len(errors) == 1 and errors[0].errno == 38
    assert port.error is errors[0]


@in_loop
async def test_close_is_idempotent_and_no_batch_is_delivered_after_it() -> None:
    ring = FakeRing()
    port = WintunPort(ring, asyncio.get_running_loop())
    got: list[list[bytes]] = []
    port.start(got.append, lambda exc: None)
    port.close()
    ring.push(b"after")
    port.close()
    await asyncio.sleep(0.01)
    assert got == []


def test_write_batch_counts_drops_when_the_ring_is_full_or_a_packet_is_too_big() -> None:
    ring = FakeRing(send_capacity=2)
    port = WintunPort(ring, asyncio.new_event_loop())
    try:
        assert port.write_batch([b"a", b"\x00" * (MAX_IP_PACKET + 1), b"b", b"c"]) == 2
        assert ring.sent == [b"a", b"b"] and port.dropped_writes == 2
    finally:
        port.loop.close()


@pytest.fixture(autouse=True)
def _no_leaked_threads():
    before = {t for t in threading.enumerate() if t.name == "wintun-reader"}
    yield
    for t in threading.enumerate():
        if t.name == "wintun-reader" and t not in before:
            t.join(5)
            assert not t.is_alive(), "the reader thread outlived close()"
