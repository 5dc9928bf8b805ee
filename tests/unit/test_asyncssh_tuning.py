"""The asyncssh adjustments keep every byte and its order, and packet debugging still logs."""

from __future__ import annotations

import asyncio
import logging

from asyncssh.logging import SSHLogger
from asyncssh.packet import SSHPacketLogger

from x2ssh.ssh import tuning as asyncssh_tuning


class FakeConnection:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def _send(self, data: bytes) -> None:
        self.writes.append(data)


def test_sends_of_one_loop_turn_leave_as_one_write_in_order() -> None:
    async def scenario() -> None:
        conn = FakeConnection()
        asyncssh_tuning.coalesce_sends(conn)
        for i in range(5):
            conn._send(bytes([i]) * 3)
        assert conn.writes == []  # nothing yet: the turn is not over
        await asyncio.sleep(0)
        assert conn.writes == [b"\x00\x00\x00\x01\x01\x01\x02\x02\x02\x03\x03\x03\x04\x04\x04"]
        conn._send(b"next")
        await asyncio.sleep(0)
        assert conn.writes[-1] == b"next" and len(conn.writes) == 2

    asyncio.run(scenario())


def test_packet_logging_still_works_at_debug_level_3(caplog) -> None:
    asyncssh_tuning.install()

    class Logged(SSHPacketLogger):
        _handler_names = {94: "MSG_CHANNEL_DATA"}

        @property
        def logger(self) -> SSHLogger:
            return SSHLogger()

    previous = SSHLogger._debug_level
    try:
        with caplog.at_level(logging.DEBUG, logger="asyncssh"):
            SSHLogger.set_debug_level(1)
            Logged().log_sent_packet(94, 1, b"payload")
            assert "MSG_CHANNEL_DATA" not in caplog.text
            SSHLogger.set_debug_level(3)
            Logged().log_sent_packet(94, 2, b"payload")
            assert "Sent MSG_CHANNEL_DATA (94), 7 bytes" in caplog.text
    finally:
        SSHLogger.set_debug_level(previous)
