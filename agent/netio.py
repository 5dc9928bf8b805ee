"""Server-side sockets of the agent: connected UDP sockets, unprivileged ping sockets, ICMP error reports.

Why connected UDP sockets: the kernel then delivers only datagrams from the flow's destination (an
off-path host cannot inject replies), and it reports the destination's ICMP errors on the socket
(ECONNREFUSED and friends). With IP_RECVERR / IPV6_RECVERR the error queue also says exactly what the
ICMP message was (type, code, who sent it), which `read_errors()` turns into protocol UNREACHABLE codes.

Ping sockets (`SOCK_DGRAM` + `IPPROTO_ICMP`/`IPPROTO_ICMPV6`) need no privilege where the user's group is
inside `net.ipv4.ping_group_range` (which also governs IPv6). The kernel picks the echo identifier and
fills in the checksum; the agent sends the type, code and sequence number it was given and reports the
real reply with its real timing.

Stdlib only; Python 3.8 compatible (runs on the server inside the zipapp).
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from typing import List, NamedTuple, Optional, Tuple

from agent import protocol as p

# Linux values (the socket module does not export all of them on every Python version).
SOL_IP = 0
SOL_IPV6 = 41
IP_RECVERR = 11
IPV6_RECVERR = 25
MSG_ERRQUEUE = 0x2000
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58

ICMP_ECHO_REQUEST = {socket.AF_INET: 8, socket.AF_INET6: 128}
ICMP_ECHO_REPLY = {socket.AF_INET: 0, socket.AF_INET6: 129}

_EXTENDED_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err
_ECHO_HEADER = struct.Struct("!BBHHH")

# ICMP destination-unreachable codes -> protocol codes (RFC 792/1812; RFC 4443 for ICMPv6).
_V4_UNREACH = {
    0: p.UNREACH_NET,
    1: p.UNREACH_HOST,
    2: p.UNREACH_PORT,  # protocol unreachable: as final as a closed port
    3: p.UNREACH_PORT,
    5: p.UNREACH_HOST,
    6: p.UNREACH_NET,
    7: p.UNREACH_HOST,
    9: p.UNREACH_PROHIBITED,
    10: p.UNREACH_PROHIBITED,
    11: p.UNREACH_NET,
    12: p.UNREACH_HOST,
    13: p.UNREACH_PROHIBITED,
    14: p.UNREACH_PROHIBITED,
    15: p.UNREACH_PROHIBITED,
}
_V6_UNREACH = {
    0: p.UNREACH_NET,
    1: p.UNREACH_PROHIBITED,
    2: p.UNREACH_HOST,
    3: p.UNREACH_HOST,
    4: p.UNREACH_PORT,
    5: p.UNREACH_PROHIBITED,
    6: p.UNREACH_PROHIBITED,
}
# When the error queue holds nothing (IP_RECVERR unavailable), the errno alone.
_ERRNO_UNREACH = {
    errno.ECONNREFUSED: p.UNREACH_PORT,
    errno.EHOSTUNREACH: p.UNREACH_HOST,
    errno.ENETUNREACH: p.UNREACH_NET,
    errno.EACCES: p.UNREACH_PROHIBITED,
    errno.EPERM: p.UNREACH_PROHIBITED,
}


class IcmpError(NamedTuple):
    """One unreachable report: protocol code, who reported it (None: unknown), the original's echo seq."""

    code: int
    reporter: Optional[str]
    seq: int


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _enable_recverr(sock: socket.socket, family: int) -> None:
    if sys.platform != "linux":
        return  # the numbers are Linux's; on Windows 11 and 25 are IP_MULTICAST_LOOP and an IPv6 option
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
        else:
            sock.setsockopt(SOL_IP, IP_RECVERR, 1)
    except OSError:
        pass  # not Linux: errno values still say port/host/net unreachable


def open_udp(destination: p.Address) -> socket.socket:
    """A non-blocking UDP socket connected to `destination` (numeric host), with ICMP error reports on."""
    family = family_of(destination[0])
    sockaddr = socket.getaddrinfo(
        destination[0], destination[1], family, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST
    )[0][4]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        _enable_recverr(sock, family)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


#: Kernel buffer asked for on a busy flow's socket (the kernel caps it at net.core.rmem_max/wmem_max and
#: doubles it for bookkeeping). The default (~208 KiB, ~90 full-size datagrams) overflows within a
#: millisecond at 1 Gbit/s whenever the agent is not scheduled at once.
BULK_SOCKET_BUFFER = 4 * 1024 * 1024


def grow_buffers(sock: socket.socket, size: int = BULK_SOCKET_BUFFER) -> None:
    """Ask for larger receive and send buffers on `sock` (best effort: the kernel caps them)."""
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, option) < size:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            pass


# UDP generic segmentation offload (Linux 4.18+): one send carries many datagrams of one size (the last
# may be shorter) and the kernel cuts them apart, so the stack is walked once per batch, not per datagram.
SOL_UDP = 17
UDP_SEGMENT = 103
GSO_MAX_SEGMENTS = 64  # the kernel's limit (UDP_MAX_SEGMENTS) on older versions
GSO_MAX_BYTES = 65000  # one send is one UDP datagram before segmentation: under 64 KiB
GSO_MAX_SEGMENT = 1452  # larger datagrams may not fit the path's MTU unfragmented: sent one by one
_GSO_SIZE = struct.Struct("=H")


def gso_supported(sock: socket.socket) -> bool:
    """True when `sock` can send segmented batches (asked of the socket: an older kernel does not know the
    option, and would otherwise ignore the control message and send one large datagram)."""
    if not hasattr(sock, "sendmsg"):
        return False
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def send_segments(sock: socket.socket, payloads: List[bytes], size: int) -> None:
    """Send `payloads` (each `size` bytes, the last possibly shorter) as separate datagrams in one call."""
    if sys.platform == "win32":
        raise OSError("no UDP segmentation offload on Windows")  # gso_supported() says False there
    sock.sendmsg([b"".join(payloads)], [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))])


def open_ping(destination: str) -> Tuple[socket.socket, tuple]:
    """A non-blocking unprivileged ping socket for `destination` and the sockaddr to send to.

    Raises PermissionError (EACCES) where `net.ipv4.ping_group_range` excludes the user's groups.
    """
    family = family_of(destination)
    proto = IPPROTO_ICMPV6 if family == socket.AF_INET6 else IPPROTO_ICMP
    sockaddr = socket.getaddrinfo(destination, 0, family, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)[0][4]
    sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    try:
        sock.setblocking(False)
        _enable_recverr(sock, family)
    except BaseException:
        sock.close()
        raise
    return sock, sockaddr


def echo_request(family: int, seq: int, payload: bytes) -> bytes:
    """An echo request for a ping socket (the kernel sets the identifier and the checksum)."""
    return _ECHO_HEADER.pack(ICMP_ECHO_REQUEST[family], 0, 0, 0, seq) + payload


def parse_echo_reply(family: int, data: bytes) -> Optional[Tuple[int, bytes]]:
    """(seq, payload) of an echo reply read from a ping socket, or None for anything else."""
    if len(data) < _ECHO_HEADER.size:
        return None
    kind, code, _checksum, _ident, seq = _ECHO_HEADER.unpack_from(data, 0)
    if kind != ICMP_ECHO_REPLY[family] or code != 0:
        return None
    return seq, data[_ECHO_HEADER.size :]


def _offender(raw: bytes) -> Optional[str]:
    if len(raw) < 8:
        return None
    (family,) = struct.unpack_from("=H", raw, 0)
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8])
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24])
    return None


def parse_extended_error(cmsg_data: bytes, original: bytes) -> Optional[IcmpError]:
    """Turn one IP_RECVERR/IPV6_RECVERR control message into an IcmpError (None: not an unreachable)."""
    if len(cmsg_data) < _EXTENDED_ERR.size:
        return None
    _errno, origin, icmp_type, icmp_code, _pad, _info, _data = _EXTENDED_ERR.unpack_from(cmsg_data, 0)
    if origin == SO_EE_ORIGIN_ICMP and icmp_type == 3:
        code = _V4_UNREACH.get(icmp_code)
    elif origin == SO_EE_ORIGIN_ICMP6 and icmp_type == 1:
        code = _V6_UNREACH.get(icmp_code)
    else:
        return None  # too big, time exceeded, local errors: the kernel handles or they do not apply
    if code is None:
        return None
    seq = struct.unpack_from("!H", original, 6)[0] if len(original) >= 8 else 0
    return IcmpError(code, _offender(cmsg_data[_EXTENDED_ERR.size :]), seq)


def read_errors(sock: socket.socket, limit: int = 64) -> List[IcmpError]:
    """Drain the socket's error queue (it must be drained: epoll keeps reporting it otherwise)."""
    found: List[IcmpError] = []
    if sys.platform == "win32":
        return found  # no error queue (and no recvmsg) there
    for _ in range(limit):
        try:
            original, ancillary, _flags, _address = sock.recvmsg(512, 512, MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        for level, kind, data in ancillary:
            if (level, kind) in ((SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)):
                error = parse_extended_error(data, original)
                if error is not None:
                    found.append(error)
    return found


def error_from_errno(number: Optional[int]) -> Optional[int]:
    """The protocol code an errno stands for (ECONNREFUSED: port unreachable ...), or None."""
    return _ERRNO_UNREACH.get(number or 0)
