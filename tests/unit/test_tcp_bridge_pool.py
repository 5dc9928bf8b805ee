"""The bridge on the connection pool (orchestration logic, fake connections as in test_pool): a new flow's
channel opens directly on a connection with room, a capacity refusal on that direct open is retried on
another connection without the app noticing and is counted, a closed port is the app's refusal at once, and
flows that arrive before any connection wait for one (bounded by the open timeout)."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.unit.test_flow_limits import FakeFlow, FakeTun
from tests.unit.test_pool import BUSY, FakeOpening, make_pool
from x2ssh.flows.tcp_bridge import BridgeLimits, TcpBridge
from x2ssh.ssh.pool import PoolOpening


async def settle(turns: int = 20) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def test_a_flow_opens_directly_and_its_flow_object_is_the_channels_session() -> None:
    async def main() -> None:
        pool, made = make_pool(capacity=10)
        tun = FakeTun()
        bridge = TcpBridge(lambda: tun)  # type: ignore[arg-type, return-value]
        bridge.set_connection(pool)  # type: ignore[arg-type]
        flow = FakeFlow(80)
        bridge.on_tcp(flow)  # type: ignore[arg-type]
        (opening,) = bridge._opening
        assert isinstance(opening.handle, FakeOpening), "no pool object per flow while there is room"
        assert bridge.stats.opening == 1 and pool.members[0].channels == 1
        await settle()
        assert tun.accepted == [flow] and made[0].open == 1
        assert opening.channel.session is opening, "the flow object is the channel's session"
        assert bridge.stats.opened == 1 and bridge.stats.active == 1 and bridge.stats.opening == 0
        opening.channel.close()  # the server closes the channel
        assert bridge.stats.active == 0 and pool.members[0].channels == 0

    asyncio.run(main())


def test_a_capacity_refusal_on_the_direct_open_reaches_no_app_and_is_counted() -> None:
    async def main() -> None:
        pool, made = make_pool(capacity=BUSY)
        tun = FakeTun()
        bridge = TcpBridge(lambda: tun)  # type: ignore[arg-type, return-value]
        bridge.set_connection(pool)  # type: ignore[arg-type]
        flows = [FakeFlow(10_000 + i) for i in range(BUSY + 5)]
        for flow in flows:
            bridge.on_tcp(flow)  # type: ignore[arg-type]
        assert all(isinstance(o.handle, FakeOpening) for o in bridge._opening), (
            "all direct: room as far as known"
        )
        for _ in range(50):
            await settle()
            if len(tun.accepted) == len(flows):
                break
        assert sorted(f.id for f in tun.accepted) == [f.id for f in flows]
        assert not any(f.refused for f in flows)
        assert len(made) == 2 and [c.open for c in made] == [BUSY, 5]  # the 5 refused opens moved
        assert pool.capacity_refusals == 5 and bridge.stats.refused == 0 and bridge.stats.opened == len(flows)

    asyncio.run(main())


def test_a_closed_port_is_refused_at_once_and_counted_by_the_bridge() -> None:
    async def main() -> None:
        pool, made = make_pool(capacity=BUSY)
        tun = FakeTun()
        bridge = TcpBridge(lambda: tun)  # type: ignore[arg-type, return-value]
        bridge.set_connection(pool)  # type: ignore[arg-type]
        closed = FakeFlow(1)  # FakeConn's closed port
        bridge.on_tcp(closed)  # type: ignore[arg-type]
        await settle()
        assert closed.refused and tun.accepted == []
        assert bridge.stats.refused == 1 and pool.capacity_refusals == 0 and len(made) == 1
        assert pool.members[0].channels == 0

    asyncio.run(main())


def test_flows_before_any_connection_wait_for_one_then_open_through_the_pool() -> None:
    async def main() -> None:
        pool, made = make_pool(capacity=10)
        tun = FakeTun()
        bridge = TcpBridge(lambda: tun)  # type: ignore[arg-type, return-value]
        early = FakeFlow(80)
        bridge.on_tcp(early)  # type: ignore[arg-type]
        (opening,) = bridge._opening
        assert isinstance(opening.handle, asyncio.Task)  # waiting for a connection
        await settle()
        assert tun.accepted == [] and not early.refused
        bridge.set_connection(pool)  # type: ignore[arg-type]
        await settle()
        assert tun.accepted == [early] and made[0].open == 1 and bridge.stats.opened == 1

    asyncio.run(main())


def test_without_a_connection_the_wait_ends_with_the_open_timeout() -> None:
    async def main() -> None:
        tun = FakeTun()
        bridge = TcpBridge(lambda: tun, limits=BridgeLimits(open_timeout=0.05))  # type: ignore[arg-type, return-value]
        flow = FakeFlow(80)
        bridge.on_tcp(flow)  # type: ignore[arg-type]
        for _ in range(100):
            await asyncio.sleep(0.01)
            if flow.refused:
                break
        assert flow.refused and bridge.stats.failed == 1 and bridge.stats.opening == 0
        await settle()
        assert all(t.done() for t in asyncio.all_tasks() if t is not asyncio.current_task())

    asyncio.run(main())


def test_a_retry_that_cannot_grow_refuses_the_app_with_resource_shortage() -> None:
    async def main() -> None:
        pool, made = make_pool(capacity=BUSY, max_connections=1)
        tun = FakeTun()
        bridge = TcpBridge(lambda: tun)  # type: ignore[arg-type, return-value]
        bridge.set_connection(pool)  # type: ignore[arg-type]
        flows = [FakeFlow(10_000 + i) for i in range(BUSY + 1)]
        for flow in flows:
            bridge.on_tcp(flow)  # type: ignore[arg-type]
        for _ in range(50):
            await settle()
            if len(tun.accepted) + sum(f.refused for f in flows) == len(flows):
                break
        assert (
            sum(f.refused for f in flows) == 1
            and len(tun.accepted) == BUSY
            and bridge.stats.refused == 1
            and pool.capacity_refusals == 1
        )
        assert len(made) == 1

    asyncio.run(main())


def _handles(bridge: TcpBridge) -> list[Any]:
    return [o.handle for o in bridge._opening]


def test_the_retry_of_a_moved_open_is_what_the_bridge_cancels_on_close() -> None:
    async def main() -> None:
        pool, _ = make_pool(capacity=BUSY, max_connections=2)
        tun = FakeTun()
        bridge = TcpBridge(lambda: tun)  # type: ignore[arg-type, return-value]
        bridge.set_connection(pool)  # type: ignore[arg-type]
        for i in range(BUSY):
            bridge.on_tcp(FakeFlow(10_000 + i))  # type: ignore[arg-type]
        await settle()
        gate = asyncio.Event()

        async def stuck_connect() -> Any:
            await gate.wait()
            raise AssertionError("cancelled before it connects")

        pool._connect = stuck_connect  # type: ignore[assignment]
        late = FakeFlow(9)
        bridge.on_tcp(late)  # type: ignore[arg-type]
        await settle()
        (handle,) = _handles(bridge)
        assert isinstance(handle.moved, PoolOpening)  # refused for room, now growing the pool
        bridge.close()
        await settle()
        assert handle.cancelled and handle.moved._state == 2 and bridge.stats.opening == 0
        assert tun.accepted[-1] is not late and not late.refused

    asyncio.run(main())
