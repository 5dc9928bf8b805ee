"""The SSH connection pool's orchestration, against fake connections that behave like OpenSSH's: a channel
to a closed port is "Connection refused"; past the server process's fd budget every channel is
"open failed"."""

from __future__ import annotations

import asyncio

import asyncssh
import pytest

from x2ssh.ssh.pool import BUSY, ConnectionPool, PoolOpening, is_capacity_refusal
from x2ssh.ssh.tcp_channel import OpenRequest


class FakeSession:
    def __init__(self) -> None:
        self.lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class FakeChannel:
    def __init__(self, conn: FakeConn, session: FakeSession, account) -> None:
        self.conn, self.session, self.account = conn, session, account

    def close(self) -> None:
        self.conn.open -= 1
        if self.account is not None:  # a channel takes itself off its account when it is released
            self.account.channels -= 1
            self.account.established -= 1
        self.session.connection_lost(None)


class FakeConn:
    """An SSH connection whose sshd process can hold `capacity` channels."""

    def __init__(self, capacity: int, closed_ports: frozenset[int] = frozenset({1})) -> None:
        self.capacity = capacity
        self.closed_ports = closed_ports
        self.open = 0
        self.closed = False

    def is_closed(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    async def create_connection(self, factory, host, port, *args, **kwargs):
        await asyncio.sleep(0)  # opens interleave, as they do on a real connection
        return self.open_now(factory, port)

    def open_now(self, factory, port, account=None):
        if port in self.closed_ports:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection refused")
        if self.open >= self.capacity:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "open failed")
        self.open += 1
        session = factory()
        return FakeChannel(self, session, account), session


class FakeOpening:
    """tcp_channel.TcpChannel's open as the pool sees it: counted on its account while it exists, a refusal
    offered to the `refused` hook first, `cancel()` passed on to the open that took over."""

    def __init__(self, conn, factory, host, port, orig_host, orig_port, on_done, window, max_pktsize,
                 account, refused) -> None:  # fmt: skip
        self.conn, self.factory, self.on_done = conn, factory, on_done
        self.request = OpenRequest(factory, host, port, orig_host, orig_port, on_done, window, max_pktsize)
        self.account, self.refused = account, refused
        self.cancelled = False
        self.moved = None
        if account is not None:
            account.channels += 1

    def cancel(self) -> None:
        self.cancelled = True
        if self.moved is not None:
            self.moved.cancel()

    def open_request(self) -> OpenRequest:
        return self.request

    def answer(self) -> None:
        account = self.account
        try:
            factory = FakeSession if self.cancelled else self.factory
            chan, _ = self.conn.open_now(factory, self.request.port, account)
        except asyncssh.ChannelOpenError as exc:
            if account is not None:
                account.channels -= 1
            if self.cancelled:
                return
            if self.refused is not None:
                self.moved = self.refused(self, exc)
                if self.moved is not None:
                    return
            self.on_done(None, exc)
            return
        if account is not None:
            account.established += 1
        if self.cancelled:  # a channel confirmed after the cancel is closed at once
            chan.close()
            return
        self.on_done(chan, None)


def fake_opener(conn, factory, host, port, orig_host, orig_port, on_done, *, window, max_pktsize,
                account=None, refused=None):  # fmt: skip
    """tcp_channel.open_tcp_channel on a FakeConn: the answer comes a loop turn later."""
    if conn.closed:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "SSH connection closed")
    handle = FakeOpening(
        conn, factory, host, port, orig_host, orig_port, on_done, window, max_pktsize, account, refused
    )
    asyncio.get_running_loop().call_soon(handle.answer)
    return handle


async def open_via(via: str, pool: ConnectionPool, factory, host: str, port: int):
    """One channel through the pool: awaited (`create_connection`) or by callback (`open_tcp_channel`)."""
    if via == "await":
        return await pool.create_connection(factory, host, port)
    done = asyncio.get_running_loop().create_future()
    sessions = []

    def make():
        sessions.append(factory())
        return sessions[-1]

    def on_done(chan, exc) -> None:
        assert not done.done()
        if exc is None:
            done.set_result(chan)
        else:
            done.set_exception(exc)

    pool.open_tcp_channel(make, host, port, "", 0, on_done, window=1, max_pktsize=1)
    assert not done.done()
    chan = await done
    return chan, sessions[0]


VIAS = pytest.mark.parametrize("via", ["await", "callback"])


def make_pool(capacity: int, max_connections: int = 32) -> tuple[ConnectionPool, list[FakeConn]]:
    made: list[FakeConn] = []

    async def connect() -> FakeConn:
        conn = FakeConn(capacity)
        made.append(conn)
        return conn

    pool = ConnectionPool(connect, max_connections=max_connections, opener=fake_opener)  # type: ignore[arg-type]
    primary = FakeConn(capacity)
    made.append(primary)
    pool.set_primary(primary)  # type: ignore[arg-type]
    return pool, made


def test_capacity_refusal_is_told_apart_from_a_closed_port():
    refused = asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "Connection refused")
    full = asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "open failed")
    shortage = asyncssh.ChannelOpenError(asyncssh.OPEN_RESOURCE_SHORTAGE, "")
    assert not is_capacity_refusal(refused, 5000)
    assert is_capacity_refusal(full, BUSY) and not is_capacity_refusal(full, BUSY - 1)
    assert is_capacity_refusal(shortage, 0)


@VIAS
def test_ten_thousand_concurrent_channels_spread_over_connections_none_refused(via: str):
    async def main() -> None:
        pool, made = make_pool(capacity=1019)
        results = await asyncio.gather(
            *(open_via(via, pool, FakeSession, "198.19.0.2", 80) for _ in range(10_000)),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == []
        assert len(made) == 10  # 10 x 1019 >= 10,000: exactly as many as needed
        assert sum(c.open for c in made) == 10_000
        assert all(c.open <= c.capacity for c in made)
        assert pool.capacity_refusals > 0  # learned, counted, never shown to the app
        assert sorted(m["channels"] for m in pool.describe()) == sorted(c.open for c in made)
        for channel, _ in results:
            channel.close()
        assert [m["channels"] for m in pool.describe()] == [0] * 10

    asyncio.run(main())


@VIAS
def test_a_closed_port_is_refused_at_once_without_growing(via: str):
    async def main() -> None:
        pool, made = make_pool(capacity=100)
        with pytest.raises(asyncssh.ChannelOpenError, match="Connection refused"):
            await open_via(via, pool, FakeSession, "198.19.0.2", 1)
        assert len(made) == 1 and pool.capacity_refusals == 0

    asyncio.run(main())


@VIAS
def test_open_failed_on_an_idle_connection_is_a_real_refusal(via: str):
    async def main() -> None:
        pool, made = make_pool(capacity=0)
        with pytest.raises(asyncssh.ChannelOpenError, match="open failed"):
            await open_via(via, pool, FakeSession, "198.19.0.2", 80)
        assert len(made) == 1

    asyncio.run(main())


@VIAS
def test_a_full_pool_refuses_with_resource_shortage(via: str):
    async def main() -> None:
        pool, made = make_pool(capacity=40, max_connections=2)
        results = await asyncio.gather(
            *(open_via(via, pool, FakeSession, "198.19.0.2", 80) for _ in range(100)),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, asyncssh.ChannelOpenError)]
        assert len(made) == 2 and len(results) - len(errors) == 80
        assert all(e.code == asyncssh.OPEN_RESOURCE_SHORTAGE for e in errors)

    asyncio.run(main())


@VIAS
def test_primary_replaced_on_reconnect_keeps_the_extra_connections(via: str):
    async def main() -> None:
        pool, made = make_pool(capacity=40)
        await asyncio.gather(*(open_via(via, pool, FakeSession, "h", 80) for _ in range(60)))
        assert len(pool.describe()) == 2
        made[0].closed = True
        pool.set_primary(None)
        new_primary = FakeConn(40)
        pool.set_primary(new_primary)  # type: ignore[arg-type]
        labels = [m["label"] for m in pool.describe()]
        assert labels == ["primary", "extra-1"]
        channel, _ = await open_via(via, pool, FakeSession, "h", 80)
        assert channel.conn is new_primary  # the emptiest connection with room

    asyncio.run(main())


def test_a_cancelled_open_gives_its_channel_slot_back_and_no_callback():
    async def main() -> None:
        pool, made = make_pool(capacity=10)
        calls = []
        opening = pool.open_tcp_channel(
            FakeSession, "h", 80, "", 0, lambda *a: calls.append(a), window=1, max_pktsize=1
        )
        assert pool.members[0].channels == 1
        opening.cancel()
        await asyncio.sleep(0.01)
        assert calls == [] and pool.members[0].channels == 0 and made[0].open == 0

    asyncio.run(main())


def test_a_closed_connection_fails_the_open_on_a_later_turn():
    async def main() -> None:
        pool, made = make_pool(capacity=10, max_connections=1)
        made[0].is_closed = lambda: False  # type: ignore[method-assign]  # not yet seen as closed...
        made[0].closed = True  # ...but closed: asyncssh raises at once
        with pytest.raises(asyncssh.ChannelOpenError, match="SSH connection closed"):
            await open_via("callback", pool, FakeSession, "h", 80)
        assert pool.members[0].channels == 0

    asyncio.run(main())


def test_with_room_the_channel_opens_directly_and_counts_itself():
    async def main() -> None:
        pool, _ = make_pool(capacity=10)
        results = []
        opening = pool.open_tcp_channel(
            FakeSession, "h", 80, "", 0, lambda *a: results.append(a), window=1, max_pktsize=1
        )
        assert isinstance(opening, FakeOpening), "no PoolOpening while a connection has room"
        assert pool.members[0].channels == 1 and pool.members[0].established == 0
        await asyncio.sleep(0.01)
        ((chan, exc),) = results
        assert exc is None and pool.members[0].established == 1
        chan.close()
        assert pool.members[0].channels == 0 and pool.members[0].established == 0

    asyncio.run(main())


def test_a_capacity_refusal_on_the_direct_open_is_retried_elsewhere_and_counted():
    async def main() -> None:
        pool, made = make_pool(capacity=BUSY)
        held = [await open_via("callback", pool, FakeSession, "h", 80) for _ in range(BUSY)]
        assert len(made) == 1 and pool.capacity_refusals == 0
        results = []
        first = pool.open_tcp_channel(
            FakeSession, "h", 80, "", 0, lambda *a: results.append(a), window=1, max_pktsize=1
        )
        assert isinstance(first, FakeOpening), "the primary still looks roomy: opened directly"
        for _ in range(50):
            await asyncio.sleep(0.001)
            if results:
                break
        ((chan, exc),) = results
        assert exc is None, "the app never sees a refusal for lack of room"
        assert isinstance(first.moved, PoolOpening)
        assert chan.conn is made[1] and len(made) == 2
        assert pool.capacity_refusals == 1 and pool.members[0].refusals == 1
        assert pool.members[0].bound == BUSY
        assert [m["channels"] for m in pool.describe()] == [BUSY, 1]
        for c, _ in [*held, (chan, None)]:
            c.close()
        assert [(m.channels, m.established) for m in pool.members] == [(0, 0), (0, 0)]

    asyncio.run(main())


def test_cancelling_a_direct_open_that_moved_cancels_the_retry():
    async def main() -> None:
        pool, made = make_pool(capacity=BUSY, max_connections=2)
        for _ in range(BUSY):
            await open_via("callback", pool, FakeSession, "h", 80)
        connected = asyncio.Event()
        release = asyncio.Event()

        async def slow_connect() -> FakeConn:
            connected.set()
            await release.wait()
            conn = FakeConn(BUSY)
            made.append(conn)
            return conn

        pool._connect = slow_connect  # type: ignore[assignment]
        results = []
        first = pool.open_tcp_channel(
            FakeSession, "h", 80, "", 0, lambda *a: results.append(a), window=1, max_pktsize=1
        )
        await asyncio.wait_for(connected.wait(), 5)  # refused, moved, and the pool is growing
        first.cancel()
        assert first.moved is not None
        release.set()
        await asyncio.sleep(0.01)
        assert results == [], "no callback after a cancel, wherever the open had moved"
        assert [m.channels for m in pool.members] == [BUSY]  # (growing was given up with the open)

    asyncio.run(main())


def test_a_closed_port_on_the_direct_open_is_the_callers_refusal():
    async def main() -> None:
        pool, made = make_pool(capacity=BUSY)
        for _ in range(BUSY):  # busy enough that "open failed" would mean full; "Connection refused" never
            await open_via("callback", pool, FakeSession, "h", 80)
        with pytest.raises(asyncssh.ChannelOpenError, match="Connection refused"):
            await open_via("callback", pool, FakeSession, "h", 1)
        assert len(made) == 1 and pool.capacity_refusals == 0 and pool.members[0].channels == BUSY

    asyncio.run(main())
