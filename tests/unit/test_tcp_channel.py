"""x2ssh.ssh.tcp_channel: direct-tcpip channels that behave as asyncssh's, opened by callback, not awaited.

Against a real asyncssh server in this process (the lab of test_asyncssh_channel_tuning): the same bytes
both ways, EOF and close, the same refusal for a closed port, bytes the server sends first, many opens at
once; and what only the callback path does: a cancelled open closes a channel confirmed too late, a lost
connection fails the opens in flight, a failing callback does not end the SSH connection.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import asyncssh
import pytest
from asyncssh.constants import MSG_CHANNEL_OPEN
from asyncssh.packet import SSHPacket, String, UInt32

from tests.unit.test_asyncssh_channel_tuning import Recorder, lab
from tests.unit.test_tcp_channel_flow import RecordingConn
from x2ssh.ssh.tcp_channel import TcpChannel, open_tcp_channel

WINDOW = 2 * 1024 * 1024
PKT = 32 * 1024


async def _open(conn: Any, port: int, factory: Any = Recorder) -> tuple[Any, Any]:
    """The callback path wrapped in a future, for tests only: (channel, session) or the error raised."""
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    sessions: list[Any] = []

    def make() -> Any:
        sessions.append(factory())
        return sessions[-1]

    def on_done(chan: Any, exc: BaseException | None) -> None:
        assert not done.done(), "on_done called twice"
        if exc is None:
            done.set_result(chan)
        else:
            done.set_exception(exc)

    open_tcp_channel(conn, make, "127.0.0.1", port, "10.0.0.1", 4444, on_done, window=WINDOW, max_pktsize=PKT)
    assert not done.done(), "on_done must not run inside open_tcp_channel"
    chan = await asyncio.wait_for(done, 10)
    return chan, sessions[0]


async def _echo_round(lab_: dict[str, Any], via_callback: bool) -> list[Any]:
    conn = lab_["conn"]
    if via_callback:
        chan, session = await _open(conn, lab_["echo"])
    else:
        chan, session = await conn.create_connection(
            Recorder, "127.0.0.1", lab_["echo"], "10.0.0.1", 4444, window=WINDOW, max_pktsize=PKT
        )
    payload = os.urandom(200_000)
    chan.write(payload[:1000])
    chan.write(payload[1000:])
    chan.write_eof()
    await asyncio.wait_for(session.closed, 10)
    assert session.events[0] == payload
    info = (chan.get_extra_info("local_peername"), chan.get_extra_info("remote_peername"))
    return [info, *session.events[1:]]


def _run(scenario: Any) -> Any:
    async def main() -> Any:
        async with lab() as lab_:
            return await scenario(lab_)

    return asyncio.run(main())


def test_echo_with_eof_and_close_matches_create_connection() -> None:
    async def both(lab_: dict[str, Any]) -> tuple[Any, Any]:
        return await _echo_round(lab_, False), await _echo_round(lab_, True)

    shipped, callback = _run(both)
    assert shipped == callback
    assert callback[0] == (("10.0.0.1", 4444), ("127.0.0.1", callback[0][1][1]))
    assert callback[1:] == ["eof", ("lost", None)]


def test_a_closed_port_is_refused_with_asyncssh_s_own_error() -> None:
    async def both(lab_: dict[str, Any]) -> tuple[Any, Any]:
        with pytest.raises(asyncssh.ChannelOpenError) as shipped:
            await lab_["conn"].create_connection(Recorder, "127.0.0.1", lab_["closed"])
        with pytest.raises(asyncssh.ChannelOpenError) as callback:
            await _open(lab_["conn"], lab_["closed"])
        await asyncio.sleep(0.05)
        return (shipped.value.code, shipped.value.reason), (callback.value.code, callback.value.reason)

    shipped, callback = _run(both)
    assert shipped == callback
    assert callback[0] == asyncssh.OPEN_CONNECT_FAILED


def test_no_channel_is_left_behind_after_a_refusal() -> None:
    async def scenario(lab_: dict[str, Any]) -> int:
        for _ in range(5):
            with pytest.raises(asyncssh.ChannelOpenError):
                await _open(lab_["conn"], lab_["closed"])
        await asyncio.sleep(0.05)
        return len(lab_["conn"]._channels)

    assert _run(scenario) == 0


def test_bytes_the_server_sends_first_arrive_after_the_open() -> None:
    async def scenario(lab_: dict[str, Any]) -> list[Any]:
        chan, session = await _open(lab_["conn"], lab_["first"])
        for _ in range(200):
            if session.events:
                break
            await asyncio.sleep(0.01)
        chan.close()
        await asyncio.wait_for(session.closed, 10)
        return session.events

    assert _run(scenario)[0] == b"hello from the server"


def test_many_opens_at_once_each_get_their_own_bytes() -> None:
    async def scenario(lab_: dict[str, Any]) -> list[list[Any]]:
        return await asyncio.gather(*(_echo_round(lab_, True) for _ in range(30)))

    rounds = _run(scenario)
    assert all(r[1:] == ["eof", ("lost", None)] for r in rounds)


def test_a_cancelled_open_closes_the_channel_when_the_confirmation_comes() -> None:
    async def scenario(lab_: dict[str, Any]) -> tuple[list[Any], int, list[Any]]:
        conn = lab_["conn"]
        calls: list[Any] = []
        made: list[Any] = []
        opening = open_tcp_channel(
            conn,
            lambda: made.append(1),
            "127.0.0.1",
            lab_["echo"],
            "",
            0,
            lambda chan, exc: calls.append((chan, exc)),
            window=WINDOW,
            max_pktsize=PKT,
        )
        opening.cancel()
        for _ in range(200):
            if not conn._channels:
                break
            await asyncio.sleep(0.01)
        still_works = await _echo_round(lab_, True)
        return calls + made, len(conn._channels), still_works

    calls, channels_left, still_works = _run(scenario)
    assert calls == []  # no callback, no session after a cancel
    assert channels_left == 0  # the late confirmation closed the channel
    assert still_works[1:] == ["eof", ("lost", None)]


def test_opens_in_flight_fail_when_the_connection_closes() -> None:
    async def scenario(lab_: dict[str, Any]) -> list[Any]:
        conn = lab_["conn"]
        results: list[Any] = []
        for _ in range(3):
            open_tcp_channel(
                conn, Recorder, "127.0.0.1", lab_["echo"], "", 0,
                lambda chan, exc: results.append(type(exc)), window=WINDOW, max_pktsize=PKT,
            )  # fmt: skip
        conn.close()
        await conn.wait_closed()
        await asyncio.sleep(0.05)
        with pytest.raises(asyncssh.ChannelOpenError):  # a closed connection refuses at once
            open_tcp_channel(
                conn, Recorder, "127.0.0.1", 1, "", 0, lambda *a: None, window=WINDOW, max_pktsize=PKT
            )
        return results

    assert _run(scenario) == [asyncssh.ChannelOpenError] * 3


def test_a_failing_callback_is_reported_and_the_connection_lives_on() -> None:
    async def scenario(lab_: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        reported: list[Any] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx["message"]))

        def broken(chan: Any, exc: BaseException | None) -> None:
            raise RuntimeError("bridge bug")

        opening = open_tcp_channel(
            lab_["conn"], Recorder, "127.0.0.1", lab_["closed"], "", 0, broken, window=WINDOW, max_pktsize=PKT
        )
        assert isinstance(opening, TcpChannel)
        for _ in range(200):
            if reported:
                break
            await asyncio.sleep(0.01)
        return reported, await _echo_round(lab_, True)

    reported, still_works = _run(scenario)
    assert reported == ["channel open callback failed"]
    assert still_works[1:] == ["eof", ("lost", None)]


# -- what a pool uses: counting on an account, a refusal offered to a hook ---------------------------------


class Account:
    def __init__(self) -> None:
        self.channels = 0
        self.established = 0


class Moved:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def test_the_channel_counts_itself_on_its_account() -> None:
    async def scenario(lab_: dict[str, Any]) -> list[tuple[int, int]]:
        conn, account, seen = lab_["conn"], Account(), []
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        session = Recorder()
        open_tcp_channel(
            conn, lambda: session, "127.0.0.1", lab_["echo"], "", 0, lambda c, e: done.set_result((c, e)),
            window=WINDOW, max_pktsize=PKT, account=account,
        )  # fmt: skip
        seen.append((account.channels, account.established))  # created: opening
        chan, exc = await asyncio.wait_for(done, 10)
        assert exc is None
        seen.append((account.channels, account.established))  # confirmed: open
        chan.write(b"x")
        chan.write_eof()
        await asyncio.wait_for(session.closed, 10)
        seen.append((account.channels, account.established))  # released
        refused: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        open_tcp_channel(
            conn, Recorder, "127.0.0.1", lab_["closed"], "", 0, lambda c, e: refused.set_result(e),
            window=WINDOW, max_pktsize=PKT, account=account,
        )  # fmt: skip
        seen.append((account.channels, account.established))
        assert isinstance(await asyncio.wait_for(refused, 10), asyncssh.ChannelOpenError)
        seen.append((account.channels, account.established))  # refused: never established, released
        return seen

    assert _run(scenario) == [(1, 0), (1, 1), (0, 0), (1, 0), (0, 0)]


def test_a_refusal_taken_over_by_the_hook_is_not_reported_and_cancel_follows_it() -> None:
    async def scenario(lab_: dict[str, Any]) -> tuple[list[Any], list[Any], bool]:
        conn, calls, offered = lab_["conn"], [], []
        moved = Moved()
        hooked = asyncio.get_running_loop().create_future()

        def refused(chan: TcpChannel, exc: asyncssh.ChannelOpenError) -> Moved:
            offered.append((chan.open_request(), exc.reason))
            hooked.set_result(None)
            return moved

        factory = Recorder
        chan = open_tcp_channel(
            conn, factory, "127.0.0.1", lab_["closed"], "10.0.0.1", 4444, lambda *a: calls.append(a),
            window=WINDOW, max_pktsize=PKT, refused=refused,
        )  # fmt: skip
        await asyncio.wait_for(hooked, 10)
        await asyncio.sleep(0.01)
        chan.cancel()
        return calls, offered, moved.cancelled

    calls, offered, cancelled = _run(scenario)
    assert calls == [], "the open that took over answers the caller"
    ((request, _reason),) = offered
    assert request[:5] == (Recorder, "127.0.0.1", request.port, "10.0.0.1", 4444)
    assert (request.window, request.max_pktsize) == (WINDOW, PKT) and callable(request.on_done)
    assert cancelled


def test_a_refusal_the_hook_declines_reaches_the_caller() -> None:
    async def scenario(lab_: dict[str, Any]) -> list[Any]:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        open_tcp_channel(
            lab_["conn"], Recorder, "127.0.0.1", lab_["closed"], "", 0, lambda c, e: done.set_result((c, e)),
            window=WINDOW, max_pktsize=PKT, refused=lambda chan, exc: None,
        )  # fmt: skip
        return list(await asyncio.wait_for(done, 10))

    chan, exc = _run(scenario)
    assert chan is None and isinstance(exc, asyncssh.ChannelOpenError)


def test_the_open_request_is_the_bytes_asyncssh_sends() -> None:
    async def scenario() -> list[tuple[int, bytes]]:
        conn = RecordingConn()
        open_tcp_channel(
            conn, Recorder, "bücher.example", 443, "fd00::2", 51234, lambda *a: None,  # type: ignore[arg-type]
            window=WINDOW, max_pktsize=PKT,
        )  # fmt: skip
        return conn.sent

    expected = b"".join(
        (
            String(b"direct-tcpip"), UInt32(7), UInt32(WINDOW), UInt32(PKT), String("bücher.example"),
            UInt32(443), String("fd00::2"), UInt32(51234),
        )
    )  # fmt: skip
    assert asyncio.run(scenario()) == [(MSG_CHANNEL_OPEN, expected)]


def test_the_channel_lets_go_of_its_session_factory_once_confirmed() -> None:
    """The factory is often the session's bound method: kept, it would tie channel and session in a cycle
    that only the cyclic garbage collector frees, once per connection."""

    class Session:
        def connection_made(self, chan: Any) -> None:
            pass

    class Factory:
        def __call__(self) -> Session:
            return Session()

    async def scenario() -> tuple[int, int, int]:
        factory = Factory()
        before = sys.getrefcount(factory)
        chan = open_tcp_channel(
            RecordingConn(), factory, "192.0.2.1", 80, "", 0, lambda *a: None,  # type: ignore[arg-type]
            window=WINDOW, max_pktsize=PKT,
        )  # fmt: skip
        opening = sys.getrefcount(factory)
        chan.process_open_confirmation(99, 100, 40, SSHPacket(b""))
        return before, opening, sys.getrefcount(factory)

    before, opening, after = asyncio.run(scenario())
    assert opening == before + 1 and after == before
