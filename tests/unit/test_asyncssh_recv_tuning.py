"""The direct receive path of x2ssh.ssh.tuning: what asyncssh does, for every packet it does not take.

The scenarios of test_asyncssh_channel_tuning (data, EOF, close, refusals, many channels) already run
through it. Here, against a real asyncssh server in this process (whose side is tuned as well): a rekey in
the middle of a connection (KEXINIT, NEWKEYS and the new cipher go through asyncssh), a packet that fails
its tag (the same disconnect as asyncssh's), and a channel number nobody opened (the same protocol error).
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import asyncssh
from asyncssh.constants import MSG_CHANNEL_DATA
from asyncssh.packet import String, UInt32

from tests.unit.test_asyncssh_channel_tuning import Recorder, lab, tuned
from x2ssh.ssh import tuning

tuning.install()  # as x2ssh runs (importing x2ssh.ssh.connect does the same)


async def _echo(lab_: dict[str, Any], payload: bytes) -> bytes:
    chan, session = await lab_["conn"].create_connection(Recorder, "127.0.0.1", lab_["echo"])
    chan.write(payload)
    chan.write_eof()
    await asyncio.wait_for(session.closed, 10)
    return session.events[0]


def _run(scenario: Any) -> Any:
    async def main() -> Any:
        async with lab() as lab_:
            return await scenario(lab_)

    return asyncio.run(main())


def _run_both(scenario: Any) -> tuple[Any, Any]:
    results = []
    for on in (False, True):
        with tuned(on):
            results.append(_run(scenario))
    return results[0], results[1]


def test_a_rekey_mid_connection_goes_through_asyncssh_and_traffic_goes_on() -> None:
    async def scenario(lab_: dict[str, Any]) -> tuple[bytes, bytes, bool]:
        conn = lab_["conn"]
        before = await _echo(lab_, b"before")
        old_cipher = conn._recv_encryption._cipher
        conn._rekey_bytes_sent = conn._rekey_bytes  # the next packet starts a key exchange
        after = await _echo(lab_, b"after" * 10000)
        return before, after, conn._recv_encryption._cipher is not old_cipher

    before, after, rekeyed = _run(scenario)
    assert before == b"before" and after == b"after" * 10000
    assert rekeyed


def _disconnect_for(garbage: Any) -> Any:
    async def scenario(lab_: dict[str, Any]) -> Any:
        conn = lab_["conn"]
        sent: list[Any] = []
        conn._send_disconnect = lambda code, reason, lang="": sent.append((code, reason))
        conn.data_received(garbage(conn))
        await asyncio.wait_for(conn.wait_closed(), 10)
        return sent

    return _run_both(scenario)


def test_a_packet_that_fails_its_tag_ends_the_connection_as_asyncssh_does() -> None:
    shipped, adjusted = _disconnect_for(lambda conn: bytes(4) + bytes(range(16)) + bytes(16))
    assert shipped == adjusted
    assert adjusted and "MAC" in adjusted[0][1]


def _live_server_connections() -> list[Any]:
    """The server side of the lab's connection (same process; asyncssh.listen does not hand it out)."""
    return [o for o in gc.get_objects() if isinstance(o, asyncssh.SSHServerConnection) and not o.is_closed()]


def test_data_for_a_channel_nobody_opened_is_the_same_protocol_error() -> None:
    async def scenario(lab_: dict[str, Any]) -> Any:
        conn = lab_["conn"]
        sent: list[Any] = []
        conn._send_disconnect = lambda code, reason, lang="": sent.append((code, reason))
        (server,) = _live_server_connections()
        server.send_packet(MSG_CHANNEL_DATA, UInt32(4242), String(b"stray"))
        await asyncio.wait_for(conn.wait_closed(), 10)
        return sent

    shipped, adjusted = _run_both(scenario)
    assert shipped == adjusted
    assert adjusted and "4242" in adjusted[0][1]
