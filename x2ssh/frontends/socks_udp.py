"""The UDP relay of one SOCKS5 UDP ASSOCIATE (RFC 1928 section 7), alive as long as its control connection.

A UDP socket is bound on the address the client reached the proxy at. Datagrams are taken only from the
client's address (its IP, and the port it announced or first used); their destination is resolved by the
server's resolver if it is a name (a small cache), and they go to `backend.udp_send(key, destination,
payload)`, where `key` is this relay's own bound address. Replies come back through `to_client()`. A
fragment (FRAG != 0), a malformed header, a stranger or a full socket buffer drops the datagram, counted in
`stats.udp_drops` by reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from x2ssh.frontends.socks_backend import (
    Address,
    SocksBackend,
    SocksSettings,
    SocksStats,
    canonical_host,
    is_address,
)
from x2ssh.frontends.socks_protocol import AddressType, ProtocolError, build_udp_datagram, parse_udp_datagram

log = logging.getLogger(__name__)


class UdpAssociation(asyncio.DatagramProtocol):
    """The UDP relay socket of one UDP ASSOCIATE, alive as long as its control connection."""

    def __init__(
        self,
        backend: SocksBackend,
        settings: SocksSettings,
        stats: SocksStats,
        client_ip: str,
        client_port: int | None,
        on_close: Callable[[UdpAssociation], None],
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.stats = stats
        self._on_close = on_close
        self.client_ip = canonical_host(client_ip)
        self.client: Address | None = (self.client_ip, client_port) if client_port else None
        self.transport: asyncio.DatagramTransport | None = None
        self.key: Address = ("", 0)
        self._names: OrderedDict[str, str] = OrderedDict()
        self._resolving: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a DatagramTransport, not declared as one
        host, port = transport.get_extra_info("sockname")[:2]
        self.key = (str(host), int(port))

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        source = (canonical_host(str(addr[0])), int(addr[1]))
        drops = self.stats.udp_drops
        if source[0] != self.client_ip or (self.client is not None and source != self.client):
            drops["stranger"] += 1
            return
        self.client = source
        try:
            datagram = parse_udp_datagram(data)
        except ProtocolError as exc:
            drops["malformed"] += 1
            log.debug("proxy UDP %s: %s", self.key, exc)
            return
        host = datagram.host
        if datagram.address_type is AddressType.DOMAIN and not is_address(host):
            address = self._names.get(host)
            if address is None:
                self._resolve(host, datagram.port, datagram.payload)
                return
            self._names.move_to_end(host)
            host = address
        self._send(host, datagram.port, datagram.payload)

    def _send(self, host: str, port: int, payload: bytes) -> None:
        self.stats.udp_to_remote += 1
        self.backend.udp_send(self.key, (host, port), payload)

    def _resolve(self, name: str, port: int, payload: bytes) -> None:
        if len(self._resolving) >= self.settings.udp_resolving:
            self.stats.udp_drops["resolving"] += 1
            return
        task = asyncio.get_running_loop().create_task(self._resolve_then_send(name, port, payload))
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve_then_send(self, name: str, port: int, payload: bytes) -> None:
        settings = self.settings
        try:
            found = await asyncio.wait_for(self.backend.resolve(name), settings.resolve_timeout)
        except Exception as exc:
            self.stats.udp_drops["name_not_resolved"] += 1
            log.debug("proxy UDP %s: %s not resolved: %r", self.key, name, exc)
            return
        if not found or self.transport is None:
            self.stats.udp_drops["name_not_resolved"] += 1
            return
        self._names[name] = found[0]
        while len(self._names) > settings.udp_name_cache:
            self._names.popitem(last=False)
        self._send(found[0], port, payload)

    def to_client(self, src: Address, payload: bytes) -> None:
        transport, client = self.transport, self.client
        if transport is None or client is None:
            self.stats.udp_drops["no_client"] += 1
            return
        if transport.get_write_buffer_size() > self.settings.udp_write_limit:
            self.stats.udp_drops["client_backpressure"] += 1
            return
        self.stats.udp_to_client += 1
        transport.sendto(build_udp_datagram(src[0], src[1], payload), client)

    def error_received(self, exc: Exception) -> None:
        log.debug("proxy UDP %s: %s", self.key, exc)  # e.g. ICMP port unreachable from the client

    def close(self) -> None:
        self._on_close(self)
        for task in list(self._resolving):
            task.cancel()
        if self.transport is not None:
            self.transport.close()
            self.transport = None
