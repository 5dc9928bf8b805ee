"""Resolve the SSH server's name while the tunnel is down, without going through the tunnel.

While x2ssh reconnects, the machine's resolver points into the tunnel, which has no connection to carry the
query. This asks the resolvers the machine had before x2ssh started (their addresses are kept from the
original resolv.conf) over a UDP socket that carries x2ssh's firewall mark, so the query takes the machine's
own path, never the tunnel. Only A/AAAA records are read; the wire format helpers are sans-IO and tested
on their own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable

from x2ssh.errors import X2sshError

log = logging.getLogger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
TYPE_A, TYPE_AAAA = 1, 28


def nameservers(resolv_conf: str) -> list[str]:
    """Every `nameserver` address of a resolv.conf text, in order."""
    found = []
    for line in resolv_conf.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(fields[1].split("%")[0])))
            except ValueError:
                continue
    return found


def build_query(name: str, qtype: int, ident: int) -> bytes:
    """A recursive DNS query for `name`."""
    labels = b"".join(bytes([len(p)]) + p.encode("idna") for p in name.strip(".").split(".") if p)
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def _skip_name(msg: bytes, pos: int) -> int:
    while True:
        if pos >= len(msg):
            raise ValueError("truncated name")
        length = msg[pos]
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length == 0:
            return pos + 1
        pos += 1 + length


def parse_answers(reply: bytes, ident: int) -> list[IpAddress]:
    """The A and AAAA addresses in the answer section of `reply` (empty when it is not our answer)."""
    if len(reply) < 12:
        return []
    rid, flags, qdcount, ancount = struct.unpack("!HHHH", reply[:8])
    if rid != ident or not flags & 0x8000 or flags & 0x000F:
        return []
    try:
        pos = 12
        for _ in range(qdcount):
            pos = _skip_name(reply, pos) + 4
        found: list[IpAddress] = []
        for _ in range(ancount):
            pos = _skip_name(reply, pos)
            rtype, _cls, _ttl, rdlength = struct.unpack("!HHIH", reply[pos : pos + 10])
            pos += 10
            rdata = reply[pos : pos + rdlength]
            pos += rdlength
            if rtype == TYPE_A and rdlength == 4:
                found.append(ipaddress.IPv4Address(rdata))
            elif rtype == TYPE_AAAA and rdlength == 16:
                found.append(ipaddress.IPv6Address(rdata))
        return found
    except (ValueError, struct.error):
        return []


async def resolve_outside(
    name: str,
    servers: list[str],
    socket_factory: Callable[[int, int], Awaitable[socket.socket]],
    timeout: float = 2.0,
) -> list[IpAddress]:
    """A and AAAA addresses of `name` from `servers`, asked on sockets from `socket_factory` (which keep
    them out of the tunnel)."""
    loop = asyncio.get_running_loop()
    for server in servers:
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        found: list[IpAddress] = []
        try:
            made = await socket_factory(family, socket.SOCK_DGRAM)
        except (OSError, X2sshError) as exc:
            log.debug("no socket to ask %s: %s", server, exc)
            continue
        with made as sock:
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (server, 53))
                for qtype in (TYPE_A, TYPE_AAAA):
                    ident = secrets.randbelow(0x10000)
                    await loop.sock_sendall(sock, build_query(name, qtype, ident))
                    reply = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
                    found += parse_answers(reply, ident)
            except (TimeoutError, OSError) as exc:
                log.debug("resolving %s via %s failed: %s", name, server, exc)
        if found:
            return found
    return []
