"""DNS when the UDP agent cannot run: each UDP query becomes DNS-over-TCP through a `direct-tcpip` channel.

The resolver is the server's own (first `nameserver` of its /etc/resolv.conf, read with a plain exec that
needs no Python) for `--vpn-dns remote`, or the configured address. Replies go back to the app from the
address it asked, so the app never learns about the detour.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
from collections.abc import Callable

import asyncssh

from x2ssh.ssh.resolve_outside import TYPE_A, TYPE_AAAA, build_query, nameservers, parse_answers

log = logging.getLogger(__name__)

Address = tuple[str, int]
QUERY_TIMEOUT = 5.0
MAX_INFLIGHT = 256


async def server_resolver(conn: asyncssh.SSHClientConnection, timeout: float = 10.0) -> str:
    """The server's own resolver address (127.0.0.1 if its resolv.conf names none, as glibc does)."""
    try:
        result = await asyncio.wait_for(conn.run("cat /etc/resolv.conf", check=False), timeout)
        text = result.stdout if isinstance(result.stdout, str) else ""
    except (TimeoutError, asyncssh.Error, OSError) as exc:
        log.warning("cannot read the server's /etc/resolv.conf (%s); using 127.0.0.1", exc)
        return "127.0.0.1"
    return next(iter(nameservers(text)), "127.0.0.1")


async def ask_over_tcp(
    conn: asyncssh.SSHClientConnection, resolver: Address, query: bytes, timeout: float = QUERY_TIMEOUT
) -> bytes:
    """One DNS message to `resolver` over TCP through a `direct-tcpip` channel of `conn`; its answer."""
    reader, writer = await asyncio.wait_for(conn.open_connection(*resolver, encoding=None), timeout)
    try:
        writer.write(struct.pack("!H", len(query)) + query)
        size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), timeout))[0]
        return await asyncio.wait_for(reader.readexactly(size), timeout)
    finally:
        writer.close()


async def lookup_name(conn: asyncssh.SSHClientConnection, resolver: str, name: str) -> list[str]:
    """A and AAAA addresses of `name` from the server-side `resolver` (so sshd itself never resolves a name:
    its getaddrinfo would block the whole connection). Empty if the name has none."""
    found: list[str] = []
    for qtype in (TYPE_A, TYPE_AAAA):
        ident = secrets.randbelow(0x10000)
        answer = await ask_over_tcp(conn, (resolver, 53), build_query(name, qtype, ident))
        found += [str(a) for a in parse_answers(answer, ident)]
    return found


class DnsOverTcp:
    """Answers UDP DNS queries by asking `resolver` over TCP through the SSH connection."""

    def __init__(
        self,
        connection: Callable[[], asyncssh.SSHClientConnection | None],
        send_to_app: Callable[[Address, Address, bytes], None],
        resolver: Callable[[Address], Address],
    ) -> None:
        self._connection = connection
        self._send_to_app = send_to_app
        self._resolver = resolver
        self._inflight: set[asyncio.Task[None]] = set()
        self.answered = 0
        self.failed = 0

    def query(self, src: Address, dst: Address, payload: bytes) -> None:
        """Handle one query datagram from the app `src` to `dst` (its DNS server)."""
        if len(self._inflight) >= MAX_INFLIGHT or len(payload) < 12:
            self.failed += 1
            return
        task = asyncio.get_running_loop().create_task(self._ask(src, dst, payload))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _ask(self, src: Address, dst: Address, payload: bytes) -> None:
        conn = self._connection()
        if conn is None:
            self.failed += 1
            return
        host, port = self._resolver(dst)
        try:
            answer = await ask_over_tcp(conn, (host, port), payload)
        except (TimeoutError, asyncssh.Error, OSError, asyncio.IncompleteReadError) as exc:
            self.failed += 1
            log.debug("DNS over TCP to %s:%d failed: %s", host, port, exc)
            return
        try:
            self._send_to_app(dst, src, answer)
            self.answered += 1
        except Exception as exc:
            self.failed += 1
            log.debug("cannot deliver a DNS answer of %d bytes: %s", len(answer), exc)

    def close(self) -> None:
        for task in list(self._inflight):
            task.cancel()
