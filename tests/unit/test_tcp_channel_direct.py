"""A `TcpChannel`'s open confirmation, window adjusts, EOF and CLOSE go straight from the receive loop to
the channel.

x2ssh.ssh.tuning hands these packets of a `DirectDataHandler` to it without asyncssh's dispatch
(`process_packet`, `_process_channel_open_confirmation`, an `SSHPacket` per packet): the confirmation,
EOF and CLOSE once per flow each, a good part of the per-connection cost; the window adjusts several
thousand per GB uploaded. Against a real asyncssh server in this process: the flow ends as
it did, the send window and packet size are the server's, and none of the three passes through asyncssh's
dispatch. A malformed or out-of-turn packet (crafted, sealed with the connection's own receive key) ends
the connection with the same error as asyncssh as shipped gives.
"""

from __future__ import annotations

import asyncio
import functools
import types
from collections.abc import Callable
from typing import Any

import pytest
from asyncssh.connection import SSHClientConnection
from asyncssh.constants import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_OPEN_CONFIRMATION,
    MSG_CHANNEL_WINDOW_ADJUST,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.unit.test_asyncssh_channel_tuning import Recorder, lab, tuned
from tests.unit.test_tcp_channel import PKT, WINDOW, _open
from x2ssh.ssh import tuning
from x2ssh.ssh.tcp_channel import TcpChannel


def _u32(*values: int) -> bytes:
    return b"".join(v.to_bytes(4, "big") for v in values)


def _inject(conn: Any, payload: bytes) -> None:
    """Feed `conn` one packet as its server would send it: sealed with the receive key and the next IV."""
    cipher = conn._recv_encryption._cipher
    pad = 16 - (1 + len(payload)) % 16
    if pad < 4:
        pad += 16
    body = bytes([pad]) + payload + bytes(pad)
    header = len(body).to_bytes(4, "big")
    conn.data_received(header + AESGCM(cipher._key).encrypt(cipher._iv, body, header))


class _Spy:
    """Counts the packets of each type that reach asyncssh's dispatch for `TcpChannel`s."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.types: list[int] = []
        confirm = SSHClientConnection._process_channel_open_confirmation
        by_channel = TcpChannel.process_packet

        def confirm_spy(conn: Any, pkttype: int, pktid: int, packet: Any) -> Any:
            self.types.append(pkttype)
            return confirm(conn, pkttype, pktid, packet)

        def channel_spy(chan: Any, pkttype: int, seq: int, packet: Any) -> bool:
            self.types.append(pkttype)
            return by_channel(chan, pkttype, seq, packet)

        handlers = dict(SSHClientConnection._packet_handlers)
        handlers[MSG_CHANNEL_OPEN_CONFIRMATION] = confirm_spy
        monkeypatch.setattr(SSHClientConnection, "_packet_handlers", handlers)
        monkeypatch.setattr(TcpChannel, "process_packet", channel_spy)


async def _round(lab_: dict[str, Any]) -> tuple[list[Any], tuple[int, int]]:
    """Echo a few bytes, the server's EOF and CLOSE: the session's events and the send window/size."""
    chan, session = await _open(lab_["conn"], lab_["echo"])
    limits = (chan._send_window, chan._send_pktsize)
    chan.write(b"ping")
    chan.write_eof()
    await asyncio.wait_for(session.closed, 10)
    return session.events, limits


def _both(scenario: Callable[[dict[str, Any]], Any]) -> tuple[Any, Any]:
    """`scenario` with asyncssh as shipped, then with x2ssh's adjustments."""

    async def main() -> Any:
        async with lab() as lab_:
            return await scenario(lab_)

    results = []
    for on in (False, True):
        with tuned(on):
            results.append(asyncio.run(main()))
    return results[0], results[1]


def test_confirmation_eof_and_close_skip_asyncssh_s_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    shipped, adjusted = _both(_round)
    assert shipped == adjusted
    events, (window, pktsize) = adjusted
    assert events == [b"ping", "eof", ("lost", None)]
    assert window > 0 and pktsize > 0  # the server's, from the confirmation
    # asyncssh as shipped routed the confirmation, EOF and CLOSE through its dispatch; the adjusted path
    # did not (the window adjust and data of the echo may still go either way).
    assert spy.types.count(MSG_CHANNEL_OPEN_CONFIRMATION) == 1
    assert spy.types.count(MSG_CHANNEL_EOF) == 1
    assert spy.types.count(MSG_CHANNEL_CLOSE) == 1


async def _adjusted_window(lab_: dict[str, Any], per_packet: bool) -> tuple[int, int, int]:
    """A write held back by a closed send window, then the server's WINDOW_ADJUST (crafted) lets it out:
    the bytes held before and after the adjust, and the window left after it. `per_packet`: received
    through asyncssh's parser and the per-packet direct path, not the in-place parser of a whole read."""
    conn = lab_["conn"]
    if per_packet:
        conn.data_received = types.MethodType(tuning._data_received_in_slices, conn)
    chan, _ = await _open(conn, lab_["echo"])
    chan._send_window = 0  # as if the bytes before had used it all
    chan.write(b"ping")
    held = chan.get_write_buffer_size()
    # (The crafted packet takes a receive IV the server does not know of, so the connection cannot carry
    # the server's next packet: what the adjust did is read from the channel, and the lab closes.)
    _inject(conn, _msg(MSG_CHANNEL_WINDOW_ADJUST, chan, _u32(1000)))
    return held, chan.get_write_buffer_size(), chan._send_window


@pytest.mark.parametrize("per_packet", [False, True], ids=["in-place", "per-packet"])
def test_a_window_adjust_skips_asyncssh_s_dispatch_and_lets_held_bytes_out(
    monkeypatch: pytest.MonkeyPatch, per_packet: bool
) -> None:
    spy = _Spy(monkeypatch)
    scenario = functools.partial(_adjusted_window, per_packet=per_packet)
    with tuned(False):
        shipped = asyncio.run(_in_lab(scenario))
    through_dispatch = spy.types.count(MSG_CHANNEL_WINDOW_ADJUST)
    spy.types.clear()
    with tuned(True):
        adjusted = asyncio.run(_in_lab(scenario))
    assert shipped == adjusted == (4, 0, 996)  # held for the window, then sent out of the 1000 bytes
    assert through_dispatch == 1  # asyncssh as shipped routes it through process_packet ...
    assert spy.types.count(MSG_CHANNEL_WINDOW_ADJUST) == 0  # ... the adjusted receive path does not


async def _in_lab(scenario: Callable[[dict[str, Any]], Any]) -> Any:
    async with lab() as lab_:
        return await scenario(lab_)


def _disconnect(crafted: Callable[[Any, TcpChannel], list[bytes]], opened: bool) -> tuple[Any, Any]:
    """The disconnect reason a client sends for the `crafted` packets, shipped and adjusted."""

    async def scenario(lab_: dict[str, Any]) -> Any:
        conn = lab_["conn"]
        if opened:
            chan, _ = await _open(conn, lab_["echo"])
        else:  # in the table and being opened, nothing sent: only the crafted confirmation answers it
            chan = TcpChannel(conn, Recorder, lambda *_: None, WINDOW, PKT)
        sent: list[Any] = []
        conn._send_disconnect = lambda code, reason, lang="": sent.append((code, reason))
        for payload in crafted(conn, chan):
            _inject(conn, payload)
        await asyncio.wait_for(conn.wait_closed(), 10)
        return sent

    return _both(scenario)


def _msg(pkttype: int, chan: TcpChannel, extra: bytes = b"") -> bytes:
    return bytes([pkttype]) + _u32(chan._recv_chan or 0) + extra


def _confirm(chan: TcpChannel, pktsize: int = PKT, extra: bytes = b"") -> bytes:
    return bytes([MSG_CHANNEL_OPEN_CONFIRMATION]) + _u32(chan._recv_chan or 0, 7, WINDOW, pktsize) + extra


@pytest.mark.parametrize(
    ("opened", "crafted", "reason"),
    [
        (False, lambda conn, chan: [_confirm(chan, pktsize=0)], "Invalid maximum packet size"),
        (False, lambda conn, chan: [_confirm(chan, extra=b"x")], "Unexpected data at end of packet"),
        (False, lambda conn, chan: [_confirm(chan)[:-1]], "Incomplete packet"),
        (True, lambda conn, chan: [_confirm(chan)], "Channel not being opened"),
        (
            True,
            lambda conn, chan: [bytes([MSG_CHANNEL_OPEN_CONFIRMATION]) + _u32(4242, 7, WINDOW, PKT)],
            "Invalid channel number",
        ),
        (True, lambda conn, chan: [_msg(MSG_CHANNEL_EOF, chan, b"x")], "Unexpected data"),
        (
            True,
            lambda conn, chan: [_msg(MSG_CHANNEL_EOF, chan)] * 2,
            "Channel not open for sending",
        ),
        (True, lambda conn, chan: [_msg(MSG_CHANNEL_CLOSE, chan, b"x")], "Unexpected data"),
        (False, lambda conn, chan: [_msg(MSG_CHANNEL_EOF, chan)], "not open for sending"),
        (False, lambda conn, chan: [_msg(MSG_CHANNEL_CLOSE, chan)], "Channel not open"),
        (True, lambda conn, chan: [_msg(MSG_CHANNEL_WINDOW_ADJUST, chan, _u32(1) + b"x")], "Unexpected data"),
        (True, lambda conn, chan: [_msg(MSG_CHANNEL_WINDOW_ADJUST, chan, b"\0\0\1")], "Incomplete packet"),
        (
            True,
            lambda conn, chan: [bytes([MSG_CHANNEL_WINDOW_ADJUST]) + _u32(4242, 1)],
            "Invalid channel number",
        ),
        (False, lambda conn, chan: [_msg(MSG_CHANNEL_WINDOW_ADJUST, chan, _u32(1))], "Channel not open"),
    ],
    ids=[
        "zero-packet-size", "confirmation-too-long", "confirmation-too-short", "confirmed-twice",
        "unknown-channel", "eof-too-long", "eof-twice", "close-too-long", "eof-while-opening",
        "close-while-opening", "adjust-too-long", "adjust-too-short", "adjust-unknown-channel",
        "adjust-while-opening",
    ],
)  # fmt: skip
def test_a_bad_packet_ends_the_connection_as_asyncssh_does(opened: bool, crafted: Any, reason: str) -> None:
    shipped, adjusted = _disconnect(crafted, opened)
    assert shipped == adjusted
    assert adjusted and reason in adjusted[0][1]
