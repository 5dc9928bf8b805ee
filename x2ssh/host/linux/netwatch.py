"""Notice when the machine's network changes under a running VPN, so the SSH connection is checked at once.

A laptop's uplink changes (Wi-Fi to Ethernet, a new address, a new default route) and it sleeps and wakes.
The SSH connection's TCP may then be dead without either end knowing; keepalives would take up to
interval times count to notice. This listens to the kernel's rtnetlink multicast groups (no privileges
needed) for link, address and main-table route changes, ignoring the TUN's own, and compares CLOCK_BOOTTIME
with CLOCK_MONOTONIC (the latter stops during suspend) to spot a resume. Both call `on_change(reason)`,
debounced.

`changes()` is the sans-IO part: rtnetlink bytes in, human-readable reasons out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE

RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RT_TABLE_MAIN = 254
RTA_OIF = 4
RTA_TABLE = 15
_NLMSG = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")
_IFINDEX = struct.Struct("=i")

DEBOUNCE = 0.3
RESUME_CHECK_INTERVAL = 2.0
RESUME_GAP = 3.0  # seconds the machine slept beyond what the monotonic clock saw


def sleep_clocks() -> tuple[float, float]:
    """(CLOCK_BOOTTIME, CLOCK_MONOTONIC) now: their difference grows by the time spent suspended."""
    return time.clock_gettime(time.CLOCK_BOOTTIME), time.monotonic()


def changes(data: bytes, ignore: set[int]) -> list[str]:
    """Reasons to re-check the connection in one rtnetlink datagram; interfaces in `ignore` (the TUN) and
    routes outside the main table (e.g. the tunnel's own table) do not count. Malformed input yields []."""
    found: list[str] = []
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size or offset + length > len(data):
            break
        body = data[offset + _NLMSG.size : offset + length]
        offset += (length + 3) & ~3
        if kind in (RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR) and len(body) >= 8:
            index = _IFINDEX.unpack_from(body, 4)[0]
            if index not in ignore:
                what = "link" if kind in (RTM_NEWLINK, RTM_DELLINK) else "address"
                found.append(f"{what} change on interface {index}")
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE) and len(body) >= _RTMSG.size:
            table, oif = _route_table_and_oif(body)
            if table == RT_TABLE_MAIN and oif not in ignore:
                found.append("route change in the main table")
    return found


def _route_table_and_oif(body: bytes) -> tuple[int, int | None]:
    table = _RTMSG.unpack_from(body, 0)[4]
    oif: int | None = None
    pos = _RTMSG.size
    while pos + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, pos)
        if length < _RTATTR.size or pos + length > len(body):
            break
        if kind == RTA_TABLE and length >= 8:
            table = struct.unpack_from("=I", body, pos + 4)[0]
        elif kind == RTA_OIF and length >= 8:
            oif = struct.unpack_from("=I", body, pos + 4)[0]
        pos += (length + 3) & ~3
    return table, oif


class NetworkWatch:
    """Calls `on_change(reason)` (debounced) on network changes and resumes; `start()` inside a loop."""

    def __init__(
        self,
        on_change: Callable[[str], None],
        ignore: Callable[[], set[int]],
        clocks: Callable[[], tuple[float, float]] = sleep_clocks,
    ) -> None:
        self._on_change = on_change
        self._clocks = clocks
        self._ignore = ignore
        self._sock: socket.socket | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._reasons: list[str] = []
        self._resume_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            kind = socket.SOCK_RAW | socket.SOCK_NONBLOCK
            sock = socket.socket(socket.AF_NETLINK, kind, socket.NETLINK_ROUTE)
            sock.bind((0, GROUPS))
        except OSError as e:
            log.warning("cannot watch network changes (%s): relying on keepalives alone", e)
        else:
            self._sock = sock
            loop.add_reader(sock.fileno(), self._readable)
        self._resume_task = loop.create_task(self._watch_resume())

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._pending is not None:
            self._pending.cancel()
        if self._resume_task is not None:
            self._resume_task.cancel()

    def _readable(self) -> None:
        assert self._sock is not None
        ignore = self._ignore()
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:  # ENOBUFS: we missed messages; that alone is a reason to check
                self._schedule([f"network notifications overflowed ({e.strerror})"])
                break
            self._schedule(changes(data, ignore))

    def _schedule(self, reasons: list[str]) -> None:
        if not reasons:
            return
        self._reasons += reasons
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(DEBOUNCE, self._fire)

    def _fire(self) -> None:
        self._pending = None
        reasons, self._reasons = self._reasons, []
        unique = list(dict.fromkeys(reasons))
        self._on_change("; ".join(unique[:3]) + (" …" if len(unique) > 3 else ""))

    async def _watch_resume(self) -> None:
        last_boot, last_mono = self._clocks()
        while True:
            await asyncio.sleep(RESUME_CHECK_INTERVAL)
            boot, mono = self._clocks()
            slept = (boot - last_boot) - (mono - last_mono)
            last_boot, last_mono = boot, mono
            if slept > RESUME_GAP:
                self._on_change(f"resumed after {slept:.0f} s of suspend")
