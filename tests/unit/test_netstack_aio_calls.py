"""The netstack's per-flow event path makes no call that would do nothing.

A short connection passes each of its events (connect, data, end of stream) from `TunStack._dispatch`
straight to the event's handler, and the per-flow operations (accept, write, write_eof, a delivery, the
release) call `_kick` only when it will schedule a turn: not while a batch is being dispatched (the dispatch
handles what they queued at its end) nor when a turn is already scheduled. Checked on a real flow through
netstack.aio on a socketpair, by watching the Python calls.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from tests.unit.test_netstack_aio_turns import _connected, exchange

_HANDLERS = {"_on_connect", "_on_data", "_on_eof", "_on_closed", "_on_writable"}


class _Calls:
    """Records, for netstack/aio.py's functions, who called each handler and the state `_kick` met."""

    def __init__(self) -> None:
        self.handlers: list[str] = []
        self.handler_callers: list[str] = []
        self.idle_kicks: list[tuple[bool, bool]] = []  # (_kicked, _dispatching) at a _kick that did nothing

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event != "call" or not frame.f_code.co_filename.endswith("aio.py"):
            return
        name = frame.f_code.co_name
        if name in _HANDLERS:
            self.handlers.append(name)
            self.handler_callers.append(frame.f_back.f_code.co_name)
        elif name == "_kick":
            tun = frame.f_locals["self"]
            if tun._kicked or tun._dispatching:
                self.idle_kicks.append((tun._kicked, tun._dispatching))


def test_a_flow_s_events_and_operations_make_no_idle_calls(wired):
    calls = _Calls()

    async def run() -> bytes:
        sys.setprofile(calls)
        try:
            tun, peer, proto = await _connected(*wired)
            wire = wired[1]
            try:
                peer.send(b"GET / HTTP/1.0\r\n\r\n")
                peer.fin()
                await exchange(wire, peer)
                proto.transport.write(b"HTTP/1.0 200 OK\r\n\r\nbody")
                proto.transport.write_eof()
                proto.transport.close()
                await exchange(wire, peer)
                return bytes(peer.received)
            finally:
                tun.close()
        finally:
            sys.setprofile(None)

    received = asyncio.run(run())
    assert received.endswith(b"body")
    assert {"_on_connect", "_on_data", "_on_eof"} <= set(calls.handlers)
    assert set(calls.handler_callers) == {"_dispatch"}
    assert calls.idle_kicks == []


def test_an_fd_port_s_empty_write_batch_is_not_called_per_packet(wired):
    """The native core writes each packet to the TUN fd itself: `FdPort.write_batch` has nothing to do,
    and the dispatch, an answer sent at once and the ACK flush skip the call."""
    names: list[str] = []

    def watch(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.endswith("port.py"):
            names.append(frame.f_code.co_name)

    async def run() -> bytes:
        tun, peer, proto = await _connected(*wired)
        wire = wired[1]
        sys.setprofile(watch)
        try:
            for n in range(3):
                peer.send(b"request %d" % n)
                await exchange(wire, peer)
                proto.transport.write(b"answer %d" % n)
                await exchange(wire, peer)
            return bytes(peer.received)
        finally:
            sys.setprofile(None)
            tun.close()

    assert asyncio.run(run()) == b"answer 0answer 1answer 2"
    assert "read_batch" in names and "write_batch" not in names
