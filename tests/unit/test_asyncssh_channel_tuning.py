"""The per-channel asyncssh adjustments (x2ssh.ssh.tuning) change nothing a channel's user can observe.

Each scenario runs against a real asyncssh server in this process (loopback, a throwaway host key) twice:
with asyncssh as shipped and with the adjustments installed, and must give the same results: data both
ways, EOF and close, a refused port refused at once with the same error, an error in a session reported
as asyncssh reports it. The wire-level parts are checked on their own: the AES-GCM shim gives the same
bytes, and the empty IGNORE before each packet is left out only with strict kex and an AEAD cipher.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncssh
import pytest

from x2ssh.ssh import tuning


@contextmanager
def tuned(on: bool) -> Iterator[None]:
    if on:
        tuning.install()
    else:
        tuning.uninstall()
    try:
        yield
    finally:
        tuning.install()  # what the rest of the suite (and x2ssh) runs with


class _OpenServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # no authentication needed

    def connection_requested(self, *args: Any) -> bool:
        return True  # forward to the requested host and port


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()  # a reader that stops taking bytes stops the echo (flow control tests)
        writer.write_eof()  # the client's EOF, passed back after everything it sent
        await writer.drain()
    except OSError:
        pass  # the tests that abort a channel take the echo's peer away mid-round (ENOTCONN, reset)
    finally:
        writer.close()


async def _speak_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"hello from the server")
    await writer.drain()
    await reader.read()
    writer.close()


@asynccontextmanager
async def lab(ciphers: tuple[str, ...] = ("aes128-gcm@openssh.com",)) -> AsyncIterator[dict[str, Any]]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    server = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[key], server_factory=_OpenServer, encryption_algs=list(ciphers)
    )
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    first = await asyncio.start_server(_speak_first, "127.0.0.1", 0)
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    port = server.sockets[0].getsockname()[1]
    conn = await asyncssh.connect(
        "127.0.0.1", port, known_hosts=None, username="u", encryption_algs=list(ciphers)
    )
    try:
        yield {
            "conn": conn,
            "echo": echo.sockets[0].getsockname()[1],
            "first": first.sockets[0].getsockname()[1],
            "closed": closed_port,
        }
    finally:
        conn.close()
        await conn.wait_closed()
        for s in (server, echo, first):
            s.close()
            await s.wait_closed()


class Recorder(asyncssh.SSHTCPSession):
    """Writes down what the channel tells it, in order."""

    def __init__(self, fail_on_data: bool = False) -> None:
        self.events: list[Any] = []
        self.closed = asyncio.get_running_loop().create_future()
        self.fail_on_data = fail_on_data

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self.fail_on_data:
            raise ValueError("session bug")
        if self.events and isinstance(self.events[-1], bytes):
            self.events[-1] += data
        else:
            self.events.append(bytes(data))  # (a long payload comes as a view of its packet)

    def eof_received(self) -> bool:
        self.events.append("eof")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append(("lost", type(exc).__name__ if exc else None))
        if not self.closed.done():
            self.closed.set_result(None)


async def _echo_round(lab_: dict[str, Any]) -> list[Any]:
    conn = lab_["conn"]
    chan, session = await conn.create_connection(Recorder, "127.0.0.1", lab_["echo"], "10.0.0.1", 4444)
    payload = os.urandom(200_000)  # more than one window's worth of packets
    chan.write(payload[:1000])
    chan.write(payload[1000:])
    chan.write_eof()
    await asyncio.wait_for(session.closed, 10)
    assert session.events[0] == payload
    return ["all bytes back", *session.events[1:]]


async def _refused(lab_: dict[str, Any]) -> tuple[int, str]:
    with pytest.raises(asyncssh.ChannelOpenError) as caught:
        await lab_["conn"].create_connection(Recorder, "127.0.0.1", lab_["closed"])
    return caught.value.code, caught.value.reason.replace(str(lab_["closed"]), "PORT")


async def _server_first(lab_: dict[str, Any]) -> list[Any]:
    chan, session = await lab_["conn"].create_connection(Recorder, "127.0.0.1", lab_["first"])
    for _ in range(200):
        if session.events:
            break
        await asyncio.sleep(0.01)
    chan.close()
    await asyncio.wait_for(session.closed, 10)
    return session.events


def _run_both(scenario: Any) -> tuple[Any, Any]:
    results = []
    for on in (False, True):
        with tuned(on):

            async def main() -> Any:
                async with lab() as lab_:
                    return await scenario(lab_)

            results.append(asyncio.run(main()))
    return results[0], results[1]


def test_echo_with_eof_and_close_is_the_same() -> None:
    shipped, adjusted = _run_both(_echo_round)
    assert shipped == adjusted
    assert adjusted[1:] == ["eof", ("lost", None)]


def test_a_closed_port_is_refused_at_once_the_same_way() -> None:
    shipped, adjusted = _run_both(_refused)
    assert shipped == adjusted
    assert adjusted[0] == asyncssh.OPEN_CONNECT_FAILED


def test_bytes_the_server_sends_first_arrive_after_the_open() -> None:
    shipped, adjusted = _run_both(_server_first)
    assert shipped == adjusted
    assert adjusted[0] == b"hello from the server"


def test_many_channels_at_once_each_get_their_own_bytes() -> None:
    async def scenario(lab_: dict[str, Any]) -> list[list[Any]]:
        return await asyncio.gather(*(_echo_round(lab_) for _ in range(20)))

    shipped, adjusted = _run_both(scenario)
    assert [e[1:] for e in shipped] == [e[1:] for e in adjusted]


def test_an_error_in_the_session_while_reading_starts_closes_the_connection_as_before() -> None:
    async def via_task(lab_: dict[str, Any]) -> Any:
        # The same, starting the reading explicitly through create_task (what asyncssh itself calls).
        conn = lab_["conn"]
        chan = conn.create_tcp_channel()
        session = Recorder(fail_on_data=True)
        chan._session = session
        chan._recv_buf.append((b"early", None))
        chan._recv_state = "open"
        conn.create_task(chan._start_reading(), chan.logger)
        await asyncio.wait_for(conn.wait_closed(), 10)
        return conn.is_closed()

    shipped, adjusted = _run_both(via_task)
    assert shipped is True and adjusted is True


def _packets_sent(cipher: str) -> tuple[int, bool]:
    """SSH packets the client sent for one echo round, and whether strict kex was negotiated."""

    async def main() -> tuple[int, bool]:
        async with lab((cipher,)) as lab_:
            conn = lab_["conn"]
            before = conn._send_seq
            await _echo_round(lab_)
            return (conn._send_seq - before) & 0xFFFFFFFF, conn._strict_kex

    return asyncio.run(main())


@pytest.mark.parametrize(
    "cipher", ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"]
)
def test_no_empty_ignore_per_packet_with_strict_kex_and_an_aead_cipher(cipher: str) -> None:
    with tuned(False):
        shipped, strict = _packets_sent(cipher)
    with tuned(True):
        adjusted, _ = _packets_sent(cipher)
    assert strict  # asyncssh on both ends negotiates strict kex
    assert shipped == 2 * adjusted  # as shipped, an IGNORE before each packet


def test_ignores_still_sent_with_a_non_aead_cipher() -> None:
    with tuned(True):
        adjusted, _ = _packets_sent("aes128-ctr")
    with tuned(False):
        shipped, _ = _packets_sent("aes128-ctr")
    assert adjusted == shipped


def _keepalives(interval: float) -> tuple[int, int, bool]:
    """Keepalives sent while bytes keep arriving (every interval/4), then during 3 silent intervals."""

    async def main() -> tuple[int, int, bool]:
        sent: list[float] = []
        original = asyncssh.connection.SSHConnection._make_keepalive_request

        async def counted(self: Any) -> None:
            sent.append(asyncio.get_running_loop().time())
            await original(self)

        asyncssh.connection.SSHConnection._make_keepalive_request = counted  # type: ignore[method-assign]
        try:
            async with lab() as lab_:
                conn = lab_["conn"]
                conn.set_keepalive(interval, 3)
                chan, _ = await conn.create_connection(Recorder, "127.0.0.1", lab_["echo"])
                for _ in range(12):  # 3 intervals of traffic from the server
                    chan.write(b"x")
                    await asyncio.sleep(interval / 4)
                during_traffic = len(sent)
                await asyncio.sleep(3 * interval)
                chan.close()
                return during_traffic, len(sent) - during_traffic, conn.is_closed()
        finally:
            asyncssh.connection.SSHConnection._make_keepalive_request = original  # type: ignore[method-assign]

    return asyncio.run(main())


def test_keepalives_wait_for_silence_and_then_go_out_as_before() -> None:
    for on in (False, True):
        with tuned(on):
            during, after, closed = _keepalives(0.4)
        assert during == 0, on  # bytes kept arriving: no keepalive needed
        assert after >= 1, on  # silence: keepalives go out and are answered
        assert not closed, on


def test_padding_comes_from_a_pool_of_kernel_random_bytes() -> None:
    import asyncssh.connection as connection_module

    with tuned(True):
        pooled = connection_module.os
        assert pooled is not os and pooled.path is os.path and pooled.environ is os.environ
        parts = [pooled.urandom(n) for n in [4, 19, 7] * 300]  # spans several 4 KiB blocks
        assert [len(p) for p in parts] == [4, 19, 7] * 300
        joined = b"".join(parts)
        assert len(set(joined)) > 200  # random bytes, not a repeated pattern
        assert joined.count(joined[:64]) == 1  # no block handed out twice
        assert len(pooled.urandom(10_000)) == 10_000  # larger than the pool: straight from the kernel
    with tuned(False):
        assert connection_module.os is os


async def _bulk_both_ways(lab_: dict[str, Any]) -> tuple[bool, list[Any], int]:
    """4 MiB through the echo server; counts the socket reads larger than one input slice."""
    conn = lab_["conn"]
    large_reads = 0
    feed = conn.data_received

    def counting(data: bytes, datatype: Any = None) -> None:
        nonlocal large_reads
        large_reads += len(data) > tuning.INPUT_SLICE
        feed(data, datatype)

    conn.data_received = counting
    chan, session = await conn.create_connection(Recorder, "127.0.0.1", lab_["echo"])
    payload = os.urandom(4 * 1024 * 1024)
    chan.write(payload)
    chan.write_eof()
    await asyncio.wait_for(session.closed, 30)
    return session.events[0] == payload, session.events[1:], large_reads


def test_large_reads_fed_in_slices_give_the_same_bytes_and_events() -> None:
    shipped, adjusted = _run_both(_bulk_both_ways)
    assert shipped[:2] == adjusted[:2] == (True, ["eof", ("lost", None)])
    assert adjusted[2] > 0  # reads larger than a slice happened, so the sliced path ran


def test_gcm_packets_on_the_wire_are_the_same_bytes() -> None:
    from asyncssh.encryption import GCMEncryption

    key, iv = os.urandom(16), os.urandom(12)
    packets = [(os.urandom(4), os.urandom(n)) for n in (16, 32, 1024, 32768, 48)]
    wires = []
    for on in (False, True):
        with tuned(on):
            sender = GCMEncryption.new("aes128-gcm", key, iv)
            receiver = GCMEncryption.new("aes128-gcm", key, iv)
            wire = [b"".join(sender.encrypt_packet(seq, h, d)) for seq, (h, d) in enumerate(packets)]
            opened = [
                receiver.decrypt_packet(seq, w[:16], w[16:-16], 4, w[-16:]) for seq, w in enumerate(wire)
            ]
            assert opened == [d for _, d in packets]
            forged = GCMEncryption.new("aes128-gcm", key, iv)
            assert forged.decrypt_packet(0, wire[0][:16], wire[0][16:-16], 4, bytes(16)) is None
            wires.append(wire)
    assert wires[0] == wires[1]
