"""The network-change watcher's sans-IO part: rtnetlink datagrams in, reasons out; the TUN's own changes and
other tables' routes do not count; malformed input never raises. Plus the resume-from-suspend detector."""

from __future__ import annotations

import asyncio
import random
import struct

from x2ssh.host.linux import netwatch
from x2ssh.host.linux.netwatch import (
    RT_TABLE_MAIN,
    RTA_OIF,
    RTA_TABLE,
    RTM_DELADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    NetworkWatch,
    changes,
)

TUN = 7


def message(kind: int, body: bytes) -> bytes:
    length = 16 + len(body)
    padded = body + b"\0" * ((-length) % 4)
    return struct.pack("=IHHII", length, kind, 0, 1, 0) + padded


def link(index: int, kind: int = RTM_NEWLINK) -> bytes:
    return message(kind, struct.pack("=BBHiII", 0, 0, 1, index, 0, 0))


def address(index: int) -> bytes:
    return message(RTM_DELADDR, struct.pack("=BBBBI", 2, 24, 0, 0, index))


def route(table: int, oif: int | None, attr_table: int | None = None) -> bytes:
    body = struct.pack("=BBBBBBBBI", 2, 0, 0, 0, min(table, 255), 3, 0, 1, 0)
    if oif is not None:
        body += struct.pack("=HHI", 8, RTA_OIF, oif)
    if attr_table is not None:
        body += struct.pack("=HHI", 8, RTA_TABLE, attr_table)
    return message(RTM_NEWROUTE, body)


def test_link_address_and_main_routes_count():
    data = link(2) + address(3) + route(RT_TABLE_MAIN, 2)
    assert changes(data, {TUN}) == [
        "link change on interface 2",
        "address change on interface 3",
        "route change in the main table",
    ]


def test_the_tunnels_own_changes_do_not_count():
    data = link(TUN) + address(TUN) + route(RT_TABLE_MAIN, TUN)
    assert changes(data, {TUN}) == []


def test_routes_of_other_tables_do_not_count_also_via_rta_table():
    assert changes(route(252, 2), set()) == []
    assert changes(route(252, 2, attr_table=0x7832), set()) == []  # table id > 255 travels as RTA_TABLE
    assert changes(route(252, 2, attr_table=RT_TABLE_MAIN), set()) == ["route change in the main table"]


def test_malformed_input_never_raises():
    rng = random.Random(3)
    good = link(2) + route(RT_TABLE_MAIN, 2)
    for _ in range(20_000):
        data = bytearray(good if rng.random() < 0.5 else rng.randbytes(rng.randint(0, 80)))
        for _ in range(rng.randint(0, 6)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        cut = bytes(data[: rng.randint(0, len(data))])
        assert isinstance(changes(cut, set()), list)


def test_a_jump_of_the_boot_clock_is_a_resume(monkeypatch):
    """CLOCK_BOOTTIME runs on during suspend, the monotonic clock does not: a gap means we slept."""
    clocks = {"boot": 100.0, "mono": 50.0}
    monkeypatch.setattr(netwatch, "RESUME_CHECK_INTERVAL", 0.01)
    seen: list[str] = []

    async def main() -> None:
        watch = NetworkWatch(seen.append, set, clocks=lambda: (clocks["boot"], clocks["mono"]))
        task = asyncio.get_running_loop().create_task(watch._watch_resume())
        await asyncio.sleep(0.03)
        clocks["boot"] += 600.0  # ten minutes asleep
        clocks["mono"] += 0.01
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(main())
    assert len(seen) == 1 and seen[0].startswith("resumed after 600 s")
