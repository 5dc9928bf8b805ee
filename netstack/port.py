"""Packet ports: where a :class:`~netstack.Stack`'s packets come from and where its output goes.

``netstack.aio.TunStack`` drives a stack from a port and knows nothing else about the device. A port
answers three questions:

* *readiness* — ``start(stack, loop, on_readable, on_error)``: call ``on_readable()`` on the loop whenever
  ``read_batch`` may find packets; report a failure of the device that happens off the loop with
  ``on_error(exc)``;
* *read a batch* — ``read_batch(stack, max_packets)``: feed up to ``max_packets`` waiting packets into the
  stack and say how many (0 when none are waiting);
* *write a batch* — ``write_batch(stack)``: hand the device what the stack has queued for the apps.

:class:`FdPort` is the TUN file descriptor (Linux, BSD): the native core reads batches from the fd itself
(``Stack.pump``) and writes its output straight to it (``Stack.set_output_fd``), so ``write_batch`` has
nothing left to do and no packet ever becomes a Python object. A port without an fd (a Wintun session on
Windows, whose reader thread hands batches to the loop) leaves the stack's output queued and sends it in
``write_batch`` (``Stack.packets_to_send``). The port protocol is structural: a backend implements it
without importing this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from netstack.stack import Stack


class PacketPort(Protocol):
    """A device that exchanges raw IP packets with a ``Stack`` in batches, on one asyncio loop."""

    def start(
        self,
        stack: Stack,
        loop: asyncio.AbstractEventLoop,
        on_readable: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        """Bind the port to ``stack`` and start watching the device: ``on_readable()`` and ``on_error(exc)``
        run on ``loop``'s thread."""
        ...

    def read_batch(self, stack: Stack, max_packets: int) -> int:
        """Feed up to ``max_packets`` waiting packets into ``stack``; return how many. Raises ``OSError``
        when the device is gone."""
        ...

    def write_batch(self, stack: Stack) -> None:
        """Send the packets ``stack`` has queued for the apps (they may already have left: see FdPort)."""
        ...

    def stop(self) -> None:
        """Stop watching the device; no callback runs after this. The device itself stays open: it
        belongs to whoever opened it. Idempotent."""
        ...


class FdPort:
    """A non-blocking TUN file descriptor, read and written by the native core without Python per packet."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(
        self,
        stack: Stack,
        loop: asyncio.AbstractEventLoop,
        on_readable: Callable[[], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        """Output goes straight to the fd; the loop's reader watches it. Errors surface in ``read_batch``."""
        stack.set_output_fd(self.fd)
        loop.add_reader(self.fd, on_readable)
        self._loop = loop

    def read_batch(self, stack: Stack, max_packets: int) -> int:
        """Read and feed up to ``max_packets`` packets in C (``Stack.pump``)."""
        return stack.pump(self.fd, max_packets)

    def write_batch(self, stack: Stack) -> None:
        """Nothing to do: the core wrote each packet to the fd as lwIP produced it."""

    def stop(self) -> None:
        """Stop watching the fd (it stays open)."""
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._loop = None
