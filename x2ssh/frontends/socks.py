"""The SOCKS5 / HTTP CONNECT proxy port (`x2ssh -D`): an asyncio adapter around `socks_protocol`.

Theory of operation. Each client connection runs the sans-IO `ServerConnection` until it yields a request.
Reading then pauses while the request is carried out through a `SocksBackend` (the session's SSH side):

- CONNECT: a domain name is resolved by the *server's* resolver (`backend.resolve`) first, and the channel is
  opened to the address, so sshd never blocks on a lookup. The outcome becomes the reply code (refused,
  host or network unreachable, timed out). On success the client and the channel are spliced as in
  `flows/tcp_bridge.py`: a full channel pauses reading from the client, a full client socket pauses reading
  from the channel, FIN <-> EOF both ways, a reset aborts the other side.
- UDP ASSOCIATE: a UDP socket is bound on the address the client reached us at; datagrams from the client
  (only from its address) go to `backend.udp_send(key, destination, payload)` and replies come back through
  `SocksServer.udp_from_remote(source, key, payload)`. `key` is the association's own bound address, unique
  while it lives; the association ends with its TCP control connection (RFC 1928 section 7).
- BIND: "command not supported".

Memory per client is bounded: the handshake by `socks_protocol.MAX_BUFFER`, the tunnel by the channel window
and the client socket's write-buffer limit (flow control), a UDP association by its write-buffer limit and
a bounded name cache. A client that breaks the protocol gets the protocol's error reply and is closed;
nothing it does reaches another client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from typing import Any

import asyncssh

from x2ssh.errors import UsageError
from x2ssh.frontends.deadlines import Deadlines
from x2ssh.frontends.socks_backend import (
    Address,
    NameNotFound,
    SocksBackend,
    SocksSettings,
    SocksStats,
    SshChannelBackend,
    TcpChannel,
    is_address,
    reply_for_error,
)
from x2ssh.frontends.socks_protocol import (
    NEED_DATA,
    AddressType,
    Command,
    Credentials,
    Flavor,
    ProtocolError,
    Reply,
    Request,
    ServerConnection,
    describe_reply,
)
from x2ssh.frontends.socks_udp import UdpAssociation
from x2ssh.frontends.stream import SocketStream, StreamListener, TurnBatch, listen, supports_streams
from x2ssh.settings import parse_listen
from x2ssh.ssh.tcp_channel import TcpChannel as SshTcpChannel
from x2ssh.ssh.tuning import write_gathered

__all__ = [
    "Credentials",
    "NameNotFound",
    "ProxyBindRefused",
    "SocksBackend",
    "SocksServer",
    "SocksSettings",
    "SocksStats",
    "SshChannelBackend",
    "check_bind",
    "parse_listen",
]

log = logging.getLogger(__name__)

MAX_ADDRESSES_TRIED = 4  # of a resolved name, in the resolver's order


_REQUEST_KEYS: dict[tuple[Flavor, Command], str] = {}
_REPLY_NAMES: dict[Reply, str] = {code: code.name for code in Reply}  # (an enum's .name is a property call)


def _request_key(request: Request) -> str:
    """The stats key of a request, e.g. "socks5 CONNECT" (made once per kind: enum names are slow)."""
    kind = (request.flavor, request.command)
    key = _REQUEST_KEYS.get(kind)
    if key is None:
        key = _REQUEST_KEYS[kind] = f"{request.flavor.value} {request.command.name}"
    return key


class ProxyBindRefused(UsageError):
    """The proxy would listen beyond loopback without credentials (and without an explicit allow_lan)."""


def check_bind(host: str, credentials: Credentials | None, allow_lan: bool) -> None:
    """Refuse to listen beyond loopback without credentials, unless the user explicitly allowed it."""
    if credentials is not None or allow_lan:
        return
    try:
        infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise UsageError(f"cannot resolve the proxy's bind address {host!r}: {exc}") from None
    exposed = sorted({info[4][0] for info in infos if not ipaddress.ip_address(info[4][0]).is_loopback})
    if exposed:
        raise ProxyBindRefused(
            f"refusing to open the proxy on {', '.join(exposed)}: it is reachable from other machines and "
            "would let anyone use your SSH server. Set a proxy username and password in the config file, or "
            "pass --allow-lan if this network is trusted."
        )


class SocksServer:
    """Listens on (`host`, `port`) and serves SOCKS5 and HTTP CONNECT clients through `backend`."""

    def __init__(
        self,
        backend: SocksBackend,
        host: str = "localhost",
        port: int = 1080,
        credentials: Credentials | None = None,
        allow_lan: bool = False,
        settings: SocksSettings | None = None,
        lean: bool = True,
    ) -> None:
        """`lean`: serve clients with `stream.StreamListener` where the loop allows it (a selector loop),
        else (or if False) with asyncio's `create_server`."""
        self.backend = backend
        self.host = host
        self.port = port
        self.credentials = credentials
        self.allow_lan = allow_lan
        self.settings = settings or SocksSettings()
        self.stats = SocksStats()
        self.lean = lean
        self._servers: list[asyncio.Server] = []
        self._listeners: list[StreamListener] = []
        self._clients: set[_Client] = set()
        self._associations: dict[Address, UdpAssociation] = {}
        # One loop timer each for all clients' handshake and channel-open timeouts (set in start()).
        self.handshakes: Deadlines[_Client] | None = None
        self.opens: Deadlines[_Client] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop it serves on (set in start())
        # The calls its clients defer to the next turn (writes to the client, the lean streams'
        # connection_lost): one loop callback per turn for all of them (set in start()).
        self.batch: TurnBatch | None = None

    async def start(self) -> None:
        """Check the bind address (`ProxyBindRefused`), then listen. OSError if the port is taken."""
        check_bind(self.host, self.credentials, self.allow_lan)
        self.loop = loop = asyncio.get_running_loop()
        self.batch = TurnBatch(loop)
        self.handshakes = Deadlines(loop, self.settings.handshake_timeout, _Client.too_slow)
        self.opens = Deadlines(loop, self.settings.open_timeout, _Client.open_too_slow)
        if self.lean and supports_streams(loop):
            sockets = listen(self.host or None, self.port)
            listener = StreamListener(loop, sockets, lambda: _Client(self), self.batch)
            listener.start()
            self._listeners.append(listener)
        else:
            server = await loop.create_server(
                lambda: _Client(self), self.host or None, self.port, reuse_address=True
            )
            self._servers.append(server)
        log.info(
            "proxy (SOCKS5, HTTP CONNECT) listening on %s", ", ".join(f"{h}:{p}" for h, p in self.addresses)
        )

    @property
    def addresses(self) -> list[Address]:
        """The bound (host, port) pairs."""
        socks = [sock for server in self._servers for sock in server.sockets]
        socks += [sock for listener in self._listeners for sock in listener.sockets]
        return [sock.getsockname()[:2] for sock in socks]

    async def close(self) -> None:
        """Stop listening and drop every client and association."""
        for server in self._servers:
            server.close()
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for client in list(self._clients):
            client.abort()
        if self._clients:
            await asyncio.sleep(0)  # their connection_lost (called soon) closes their sockets and channels
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        for deadlines in (self.handshakes, self.opens):
            if deadlines is not None:
                deadlines.close()

    def _forget(self, association: UdpAssociation) -> None:
        if self._associations.get(association.key) is association:
            del self._associations[association.key]

    def has_association(self, key: Address) -> bool:
        """Whether a live UDP association sends with `key` (its replies are ours, not another front end's)."""
        return key in self._associations

    def udp_from_remote(self, src: Address, dst: Address, payload: bytes) -> None:
        """A UDP reply from `src` for the association `dst` (the key it sent with)."""
        association = self._associations.get(dst)
        if association is None:
            self.stats.udp_drops["no_association"] += 1
            return
        association.to_client(src, payload)


class _ChannelSide(asyncssh.SSHTCPSession):
    """Receives from the SSH channel; feeds the client."""

    def __init__(self, client: _Client) -> None:
        self._client = client

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._client.from_channel(data)

    def eof_received(self) -> bool:
        self._client.from_channel(None)
        return True  # half-open: the client may still send

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.channel_lost(exc)

    def pause_writing(self) -> None:
        self._client.channel_full(True)

    def resume_writing(self) -> None:
        self._client.channel_full(False)


class _Client(asyncio.Protocol):
    """One client connection: handshake, then a splice to a channel (or the control of a UDP association)."""

    # (One per connection: slots make it cheaper to build and its attributes quicker to reach.)
    __slots__ = (
        "__weakref__", "_channel_eof", "_channel_full", "_client_full", "_deadline", "_held", "_loop",
        "_opening", "_pending", "_request", "_task", "association", "channel", "closed", "conn", "early",
        "peer", "server", "spliced", "stats", "transport",
    )  # fmt: skip

    def __init__(self, server: SocksServer) -> None:
        self.server = server
        self.stats = server.stats
        self.conn = ServerConnection(server.credentials)
        self.transport: asyncio.Transport | None = None
        self.peer: Address = ("", 0)
        self.channel: TcpChannel | None = None
        self.association: UdpAssociation | None = None
        self.spliced = False
        self.closed = False
        self.early: list[bytes | None] = []  # channel data (None: EOF) before the reply was written
        self._pending: list[bytes] = []  # channel data for the client, written at the end of this turn
        self._channel_full = False
        self._client_full = False
        self._channel_eof = False  # the channel's EOF came: the server sends nothing more
        self._request: Request | None = None  # the request whose channel is opening by callback
        self._held = b""  # the method selection, held to go out with the reply (greeting+request in one read)
        self._loop = server.loop or asyncio.get_running_loop()  # once: on 3.11 each call costs a getpid()
        self._task: asyncio.Task[None] | None = None
        self._opening: Any = None  # a CONNECT to an address opening by callback (no task)
        self._deadline: Deadlines[_Client] | None = None  # the one (handshake or open) this client is in

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer = (str(peer[0]), int(peer[1]))
        server = self.server
        if len(server._clients) >= server.settings.max_clients:
            self.stats.refused_clients += 1
            log.warning("proxy: %d clients already; refusing %s", len(server._clients), self.label)
            transport.abort()
            return
        server._clients.add(self)
        self.stats.clients += 1
        self.stats.active += 1
        transport.set_write_buffer_limits(high=server.settings.client_write_limit)
        assert server.handshakes is not None
        server.handshakes.add(self)
        self._deadline = server.handshakes

    def data_received(self, data: bytes) -> None:
        if self.spliced:
            if self.channel is not None:
                self.stats.bytes_up += len(data)
                self.channel.write(data)
        elif self.association is not None:
            pass  # nothing is meant to come on a UDP association's control connection (RFC 1928 section 7)
        else:
            self._handshake(data)

    def eof_received(self) -> bool:
        if self.spliced:
            if self.channel is None:
                return True
            if self._channel_eof:
                # Both directions are done: CLOSE instead of EOF saves a packet and the turn in which sshd
                # answers our EOF with its CLOSE (as flows/tcp_bridge.py does). It goes after any bytes still
                # queued for the window, and sshd writes what it holds to the destination before it closes.
                self.channel.close()
            else:
                self.channel.write_eof()
            return True
        if self.association is None and self._task is None and self._opening is None:
            self._handshake(b"")  # mid-handshake: a protocol error, logged and closed
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._no_deadlines()
        if self in self.server._clients:
            self.server._clients.discard(self)
            self.stats.active -= 1
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()  # a channel confirmed later is closed
        channel, self.channel = self.channel, None
        if channel is not None:
            if exc is None:
                channel.close()
            else:
                channel.abort()
        if self.association is not None:
            self.association.close()
            self.association = None

    def pause_writing(self) -> None:
        self._client_full = True
        if self.channel is not None:
            self.channel.pause_reading()

    def resume_writing(self) -> None:
        self._client_full = False
        if self.channel is not None:
            self.channel.resume_reading()

    # -- the handshake --

    @property
    def label(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}"

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _no_deadlines(self) -> None:
        # Only the one it was added to: called three times per connection, two discards each was a hot spot.
        deadline, self._deadline = self._deadline, None
        if deadline is not None:
            deadline.discard(self)

    def too_slow(self) -> None:
        """The handshake deadline passed: close unless a request is being served."""
        if not self.spliced and self.association is None and self._task is None and self._opening is None:
            log.info(
                "proxy client %s: no complete request in %.0f s; closed",
                self.label,
                self.server.settings.handshake_timeout,
            )
            self.abort()

    def _handshake(self, data: bytes) -> None:
        assert self.transport is not None
        conn = self.conn
        try:
            conn.receive_data(data)
            event = conn.next_event()
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            log.info("proxy client %s: %s", self.label, exc)
            self.transport.write(conn.data_to_send() + exc.reply)  # e.g. the method selection, then the error
            self.transport.close()
            return
        out = conn.data_to_send()
        if event is NEED_DATA:
            if out:
                self.transport.write(out)
            return
        assert isinstance(event, Request)
        # The request came in the same read as the messages `out` answers (a client that did not wait for
        # them): they go out with the reply, in order, in one write. Clients that wait get them at once.
        self._held = out
        self._no_deadlines()
        self.transport.pause_reading()
        if event.command is Command.CONNECT and self._connect_now(event):
            return
        self._task = self._loop.create_task(self._serve(event))

    def _connect_now(self, request: Request) -> bool:
        """CONNECT to an address by callback when the backend can start the open now (no task, no future:
        most of a short connection's cost in the proxy); False to take the task path."""
        open_now = getattr(self.server.backend, "open_tcp_now", None)
        if open_now is None or (request.address_type is AddressType.DOMAIN and not is_address(request.host)):
            return False
        opening = open_now(request.host, request.port, lambda: _ChannelSide(self), self.peer,
                           lambda chan, exc: self._opened(request, chan, exc))  # fmt: skip
        if opening is None:
            return False
        self.stats.requests[_request_key(request)] += 1
        self._opening = opening
        self._request = request
        opens = self.server.opens
        assert opens is not None
        opens.add(self)
        self._deadline = opens
        return True

    def _opened(self, request: Request, channel: TcpChannel | None, exc: BaseException | None) -> None:
        self._opening = None
        self._request = None
        self._no_deadlines()
        try:
            if channel is not None:
                self._splice(channel, request)
            else:
                log.debug("proxy: %s:%d failed: %r", request.host, request.port, exc)
                self._answer(reply_for_error(exc or ConnectionError()), request)
        except Exception:  # a bug must not take the proxy down; the client learns it failed
            log.exception("proxy client %s: CONNECT failed", self.label)
            if self.conn.state == "await reply":
                self._answer(Reply.GENERAL_FAILURE, request)
            else:
                self.abort()

    def open_too_slow(self) -> None:
        """The channel-open deadline passed: give up on the channel and tell the client."""
        opening, self._opening = self._opening, None
        request, self._request = self._request, None
        if opening is not None and request is not None:
            opening.cancel()  # a channel confirmed later is closed
            self._answer(reply_for_error(TimeoutError()), request)

    async def _serve(self, request: Request) -> None:
        self.stats.requests[_request_key(request)] += 1
        try:
            if request.command is Command.CONNECT:
                await self._connect(request)
            elif request.command is Command.UDP_ASSOCIATE:
                await self._associate(request)
            else:
                self._answer(Reply.COMMAND_NOT_SUPPORTED, request)
        except Exception:  # a bug must not take the proxy down; the client learns it failed
            log.exception("proxy client %s: %s failed", self.label, request.command.name)
            if self.conn.state == "await reply":
                self._answer(Reply.GENERAL_FAILURE, request)
            else:
                self.abort()

    def _answer(self, code: Reply, request: Request, bound: Address = ("0.0.0.0", 0)) -> None:
        """Write the reply; an error reply closes the client."""
        self.stats.replies[_REPLY_NAMES[code]] += 1
        if code != Reply.SUCCEEDED:
            log.info(
                "proxy client %s: %s %s:%d: %s",
                self.label,
                request.command.name,
                request.host,
                request.port,
                describe_reply(code),
            )
        if self.closed or self.transport is None:
            return
        reply = self.conn.reply(code, bound)
        held, self._held = self._held, b""
        self.transport.write(held + reply if held else reply)
        if code != Reply.SUCCEEDED:
            self.transport.close()

    # -- CONNECT --

    async def _connect(self, request: Request) -> None:
        settings = self.server.settings
        try:
            addresses = await self._addresses(request.host, request.address_type)
        except Exception as exc:
            self._answer(reply_for_error(exc), request)
            return
        error: BaseException = NameNotFound(request.host)
        backend = self.server.backend
        for address in addresses[:MAX_ADDRESSES_TRIED]:
            try:
                async with asyncio.timeout(settings.open_timeout):  # no extra task, unlike wait_for on 3.11
                    channel, _ = await backend.open_tcp(
                        address, request.port, lambda: _ChannelSide(self), self.peer
                    )
            except (asyncssh.Error, OSError, TimeoutError, ConnectionError) as exc:
                error = exc
                log.debug("proxy: %s:%d (%s) failed: %r", request.host, request.port, address, exc)
                continue
            self._splice(channel, request)
            return
        self._answer(reply_for_error(error), request)

    async def _addresses(self, host: str, kind: AddressType) -> list[str]:
        if kind is not AddressType.DOMAIN or is_address(host):
            return [host]
        async with asyncio.timeout(self.server.settings.resolve_timeout):
            found = await self.server.backend.resolve(host)
        if not found:
            raise NameNotFound(host)
        return list(found)

    def _splice(self, channel: TcpChannel, request: Request) -> None:
        if self.closed or self.transport is None:  # the client gave up while the channel was opening
            channel.close()
            return
        self.channel = channel
        self._answer(Reply.SUCCEEDED, request)
        self.spliced = True
        early = self.conn.trailing_data()
        if early:
            self.stats.bytes_up += len(early)
            channel.write(early)
        for item in self.early:
            self._to_client(item)
        self.early.clear()
        if self._client_full:
            channel.pause_reading()
        if type(self.transport) is SocketStream and isinstance(channel, SshTcpChannel):
            self.transport.read_into(self)  # the client's bytes go straight into the channel's packets
        if not self._channel_full and not self.closed:
            self.transport.resume_reading()

    def read_buffers(self) -> list[memoryview] | None:
        """Where the next read from the client may go (`SocketStream.read_into`): the channel's packets."""
        channel = self.channel
        return channel.read_buffers() if isinstance(channel, SshTcpChannel) else None

    def buffers_read(self, n: int) -> None:
        self.stats.bytes_up += n
        channel = self.channel
        assert isinstance(channel, SshTcpChannel)  # read_buffers just gave its buffers
        channel.sent_read_buffers(n)

    def from_channel(self, data: bytes | None) -> None:
        if self.spliced:
            self._to_client(data)
        else:
            self.early.append(data)

    def _to_client(self, data: bytes | None) -> None:
        """Queue channel data for the client; one socket write per event-loop turn (None: EOF after it).

        asyncssh hands over one SSH packet (at most 32 KiB) at a time, several per socket read; writing
        each on its own costs a system call apiece. The queue holds at most what one turn delivered, and
        that is bounded by the channel's window."""
        if data is None:
            self._channel_eof = True
            self._flush_to_client()
            transport = self.transport
            if transport is not None and not transport.is_closing() and transport.can_write_eof():
                transport.write_eof()
            return
        self.stats.bytes_down += len(data)
        pending = self._pending
        if not pending:
            batch = self.server.batch
            if batch is not None:
                batch.call_soon(_Client._flush_to_client, self)
            else:
                self._loop.call_soon(self._flush_to_client)
        pending.append(data)

    def _flush_to_client(self) -> None:
        pending = self._pending
        if not pending:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            pending.clear()
            return
        if len(pending) > 1 and type(transport) is SocketStream:
            transport.writelines(pending)  # one writev, no joined copy
            pending.clear()
            return
        if len(pending) > 1:  # one writev straight from the packets, no joined copy (when asyncio holds none)
            rest = write_gathered(transport, pending)
            if rest is not None:
                pending.clear()
                for part in rest:
                    transport.write(part)
                return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        transport.write(data)

    def channel_lost(self, exc: Exception | None) -> None:
        if self.channel is None or self.transport is None:
            return
        self.channel = None
        if exc is None:
            self._flush_to_client()
            self.transport.close()  # after what is buffered
        else:
            self._pending.clear()
            self.transport.abort()

    def channel_full(self, full: bool) -> None:
        self._channel_full = full
        if self.spliced and self.transport is not None and not self.closed:
            if full:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # -- UDP ASSOCIATE --

    async def _associate(self, request: Request) -> None:
        assert self.transport is not None
        local = self.transport.get_extra_info("sockname")
        client_ip = self.peer[0]
        if (
            request.address_type is not AddressType.DOMAIN
            and not ipaddress.ip_address(request.host).is_unspecified
        ):
            client_ip = request.host
        server = self.server
        association = UdpAssociation(
            server.backend, server.settings, self.stats, client_ip, request.port or None, server._forget
        )
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: association, local_addr=(local[0], 0))
        if self.closed:
            association.close()
            return
        self.association = association
        self.server._associations[association.key] = association
        self._answer(Reply.SUCCEEDED, request, association.key)
        log.debug("proxy client %s: UDP association on %s:%d", self.label, *association.key)
        self.transport.resume_reading()  # to notice when the client closes (that ends the association)
