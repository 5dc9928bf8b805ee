"""The Wintun packet port: netstack's "read a batch, write a batch" (`netstack.port.PacketPort`) over a
Wintun session's rings.

A Wintun session is a pair of shared-memory rings, not a file descriptor, so asyncio cannot watch it. A
reader thread drains up to `max_batch` packets, hands the batch to the event loop with
`loop.call_soon_threadsafe`, and waits on the session's read event (or a cancel event) when the ring is
empty. On the loop the batch joins the port's queue and the readiness hook (`on_readable`) runs;
`read_batch` feeds queued packets into the stack (`Stack.receive_packet`). At most `max_pending` batches
wait for the loop; beyond that the reader stops reading, so Wintun's ring fills and drops as a full TUN
queue would, instead of memory growing. Writes happen on the loop's thread: `write_batch` takes the stack's
queued output (`Stack.packets_to_send`, as no output fd is set) and copies each packet into the send ring
(WintunAllocateSendPacket + WintunSendPacket are safe to call concurrently with the reader). A full send
ring drops the packet and counts it.

Why our own ctypes wrapper rather than pytun-pmd3's `TunTapDevice`: pytun-pmd3 3.0 loads its DLLs at
import, reads one packet per call through `asyncio.to_thread` (a thread hop per packet), has no batching,
declares WintunCloseAdapter as returning BOOL (wintun.h: VOID), and its IPv4 address setter writes a field
its own SOCKADDR_INET does not have (the package calls itself "IPv6-ONLY"). We do use the signed wintun.dll
binaries it ships (`prototypes.wintun_dll_path`), so there is no second copy of the driver to keep current.

`Ring` is the seam: `WintunRing` is the real session (not run here: no Windows machine); the unit tests drive
`WintunPort` with a fake ring, alone and under `netstack.aio.TunStack` with a real stack.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from x2ssh.host.windows import structs as S
from x2ssh.host.windows.prototypes import function as fn

if TYPE_CHECKING:
    from netstack.stack import Stack

log = logging.getLogger(__name__)

RING_CAPACITY = 0x800000  # 8 MiB per ring (wintun.h: 128 KiB .. 64 MiB, a power of two)
MAX_IP_PACKET = 0xFFFF  # WINTUN_MAX_IP_PACKET_SIZE
WAIT_OBJECT_0, WAIT_TIMEOUT, INFINITE = 0, 0x102, 0xFFFFFFFF
ERROR_BUFFER_OVERFLOW = 111  # WintunAllocateSendPacket: the send ring is full


class Ring(Protocol):
    """One Wintun session, as the port uses it."""

    def receive(self) -> bytes | None:
        """The next packet, or None when the ring is empty; OSError when the session is gone."""
        ...

    def wait(self) -> bool:
        """Block until packets may be there (True) or `cancel()` was called (False)."""
        ...

    def cancel(self) -> None:
        """Wake `wait()` for good (from any thread)."""
        ...

    def send(self, packet: bytes) -> bool:
        """Queue one packet for the OS; False when the send ring is full (the packet is dropped)."""
        ...

    def close(self) -> None: ...


class WintunPort:
    """A `netstack.port.PacketPort` over a Wintun ring: a reader thread hands batches to the event loop."""

    def __init__(self, ring: Ring, *, max_batch: int = 256, max_pending: int = 4) -> None:
        self.ring = ring
        self.loop: asyncio.AbstractEventLoop | None = None
        self.max_batch = max_batch
        self._slots = threading.Semaphore(max_pending)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: deque[list[bytes]] = deque()  # batches delivered to the loop, not yet read
        self._offset = 0  # packets of the first queued batch already read
        self._on_readable: Callable[[], None] | None = None
        self.dropped_writes = 0
        self.error: BaseException | None = None

    # -- netstack.port.PacketPort
    def start(
        self,
        stack: Stack,
        loop: asyncio.AbstractEventLoop,
        on_readable: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        """Start the reader thread: `on_readable()` and `on_error(exc)` run on `loop`'s thread. The stack
        keeps its output queued (no output fd), for `write_batch`."""
        stack.set_output_fd(None)
        self.loop = loop
        self._on_readable = on_readable
        self._thread = threading.Thread(
            target=self._run, args=(loop, on_error), name="wintun-reader", daemon=True
        )
        self._thread.start()

    def read_batch(self, stack: Stack, max_packets: int) -> int:
        """Feed up to `max_packets` delivered packets into `stack` (`Stack.receive_packet`)."""
        fed = 0
        while self._queue and fed < max_packets:
            batch = self._queue[0]
            end = min(len(batch), self._offset + max_packets - fed)
            for packet in batch[self._offset : end]:
                stack.receive_packet(packet)
            fed += end - self._offset
            self._offset = end
            if end == len(batch):
                self._queue.popleft()
                self._offset = 0
                self._slots.release()  # the reader may hand over one more batch
        return fed

    def write_batch(self, stack: Stack) -> None:
        """Send everything the stack has queued for the apps."""
        packets = stack.packets_to_send()
        if packets:
            self.write_packets(packets)

    def stop(self) -> None:
        """Stop the reader and wait for it; queued batches are dropped. The session stays open. Idempotent."""
        self._stop.set()
        self._on_readable = None
        self.ring.cancel()
        self._slots.release()  # a reader blocked on a full queue wakes and sees the stop
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._thread = None
        self._queue.clear()

    # -- the rest
    def write_packets(self, packets: Sequence[bytes]) -> int:
        """Queue packets for the OS; returns how many were taken (the others were dropped: ring full)."""
        sent = 0
        for packet in packets:
            if len(packet) > MAX_IP_PACKET:
                log.warning("dropping a %d-byte packet: larger than Wintun takes", len(packet))
            elif self.ring.send(packet):
                sent += 1
                continue
            self.dropped_writes += 1
        return sent

    def close(self) -> None:
        """Stop the reader and end the session. Idempotent."""
        self.stop()
        self.ring.close()

    # -- the reader thread
    def _run(self, loop: asyncio.AbstractEventLoop, on_error: Callable[[BaseException], None]) -> None:
        try:
            while not self._stop.is_set():
                batch = self._drain()
                if batch:
                    self._slots.acquire()
                    if self._stop.is_set():
                        return
                    loop.call_soon_threadsafe(self._arrived, batch)
                elif not self.ring.wait():
                    return
        except RuntimeError:
            return  # the loop is closed: nobody is left to take packets
        except BaseException as exc:
            self.error = exc
            if not self._stop.is_set():
                try:
                    loop.call_soon_threadsafe(self._failed, on_error, exc)
                except RuntimeError:
                    log.error("Wintun reader failed after the loop closed: %s", exc)

    def _drain(self) -> list[bytes]:
        batch: list[bytes] = []
        while len(batch) < self.max_batch:
            packet = self.ring.receive()
            if packet is None:
                break
            batch.append(packet)
        return batch

    def _arrived(self, batch: list[bytes]) -> None:
        on_readable = self._on_readable
        if on_readable is None:  # stopped meanwhile
            self._slots.release()
            return
        self._queue.append(batch)
        on_readable()

    def _failed(self, on_error: Callable[[BaseException], None], exc: BaseException) -> None:
        if not self._stop.is_set():
            on_error(exc)


class WintunRing:
    """A real Wintun session (Windows only; NOT RUN here). Owns the session and a cancel event."""

    def __init__(self, adapter: int, capacity: int = RING_CAPACITY) -> None:
        self.session = fn("WintunStartSession")(adapter, capacity)
        if not self.session:
            raise ctypes.WinError(ctypes.get_last_error())
        self.read_event = fn("WintunGetReadWaitEvent")(self.session)  # owned by the session: never closed
        self.cancel_event = fn("CreateEventW")(None, True, False, None)
        if not self.cancel_event:
            fn("WintunEndSession")(self.session)
            raise ctypes.WinError(ctypes.get_last_error())
        self._handles = (S.HANDLE * 2)(self.read_event, self.cancel_event)

    def receive(self) -> bytes | None:
        size = S.DWORD()
        ptr = fn("WintunReceivePacket")(self.session, ctypes.byref(size))
        if not ptr:
            err = ctypes.get_last_error()
            if err == S.ERROR_NO_MORE_ITEMS:
                return None
            raise ctypes.WinError(err)  # ERROR_HANDLE_EOF: the adapter is going away
        try:
            return ctypes.string_at(ptr, size.value)
        finally:
            fn("WintunReleaseReceivePacket")(self.session, ptr)

    def wait(self) -> bool:
        result = fn("WaitForMultipleObjects")(2, self._handles, False, INFINITE)
        if result == WAIT_OBJECT_0:
            return True
        if result == WAIT_OBJECT_0 + 1:
            return False
        raise ctypes.WinError(ctypes.get_last_error())

    def cancel(self) -> None:
        fn("SetEvent")(self.cancel_event)

    def send(self, packet: bytes) -> bool:
        if not self.session:
            return False  # ended (the run is going down): dropped, like a full ring
        ptr = fn("WintunAllocateSendPacket")(self.session, len(packet))
        if not ptr:
            err = ctypes.get_last_error()
            if err == ERROR_BUFFER_OVERFLOW:
                return False
            raise ctypes.WinError(err)
        ctypes.memmove(ptr, packet, len(packet))
        fn("WintunSendPacket")(self.session, ptr)
        return True

    def close(self) -> None:
        if self.session:
            fn("WintunEndSession")(self.session)
            self.session = None
            fn("CloseHandle")(self.cancel_event)
