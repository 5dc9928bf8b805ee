"""Sans-IO codec of the x2ssh agent protocol (see PROTOCOL.md), shared by the client and the agent.

Theory of operation: bytes go into `Decoder.feed()`, which returns every complete frame as a small
immutable object; `encode()` (or the fast `encode_datagram()`) turns a frame back into bytes. Nothing
here touches sockets, time or asyncio. Malformed input from the peer raises `ProtocolError` with a
reason; misuse by the caller (a bad address string, a payload that is too large) raises `ValueError`.

Stdlib only and Python 3.8 compatible: this module runs on the SSH server inside the agent zipapp.
"""

from __future__ import annotations

import hmac
import socket
import struct
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

PROTOCOL_VERSION = 2
MIN_VERSION = 1
MAX_VERSION = 2
#: The first version with UNREACHABLE, OPEN_ECHO, ECHO and RESUME frames.
VERSION_ICMP = 2

MAGIC = b"X2SA"
TOKEN_SIZE = 32
MAX_PAYLOAD = 65535
MAX_SOFTWARE = 255
MAX_ERROR_MESSAGE = 1024
_MAX_ADDRESS = 1 + 16 + 2
MAX_BODY = 4 + _MAX_ADDRESS + MAX_PAYLOAD
HEADER_SIZE = 5
_PEER_CACHE_SIZE = 256  # decoded DATAGRAM peers a Decoder keeps

# Frame types.
HELLO = 0x01
WELCOME = 0x02
OPEN_FLOW = 0x10
DATAGRAM = 0x11
CLOSE_FLOW = 0x12
KEEPALIVE = 0x20
ERROR = 0x21
GOODBYE = 0x22
# Version 2.
UNREACHABLE = 0x13
OPEN_ECHO = 0x14
ECHO = 0x15
RESUME = 0x23

#: Frame types a connection may carry only once version 2 (or later) was negotiated.
V2_FRAMES = frozenset((UNREACHABLE, OPEN_ECHO, ECHO, RESUME))

# Address kinds.
ADDR_NONE = 0x00
ADDR_IPV4 = 0x04
ADDR_IPV6 = 0x06
ADDR_SERVER_RESOLVER = 0x52

# CLOSE_FLOW reasons.
CLOSE_NORMAL = 0
CLOSE_IDLE = 1
CLOSE_LIMIT = 2
CLOSE_SOCKET_ERROR = 3
CLOSE_NO_RESOLVER = 4
CLOSE_NOT_PERMITTED = 5  # v2: the server may not open a ping socket (net.ipv4.ping_group_range)
CLOSE_UNKNOWN_FLOW = 6  # v2: a DATAGRAM/ECHO for a flow the agent does not have (closed while detached)

# UNREACHABLE codes (v2): what the destination (or a router on the way) said, independent of IPv4/IPv6.
UNREACH_NET = 0
UNREACH_HOST = 1
UNREACH_PORT = 2
UNREACH_PROHIBITED = 3

# ERROR codes.
ERR_BAD_FRAME = 1
ERR_UNSUPPORTED_VERSION = 2
ERR_UNEXPECTED_FRAME = 3
ERR_INTERNAL = 4

Address = Tuple[str, int]

#: Destination meaning "the server's own resolver" (first nameserver of its /etc/resolv.conf, port 53).
SERVER_RESOLVER: Address = ("server-resolver", 53)

_HEADER = struct.Struct("!IB")
_NO_PEER_HEADER = struct.Struct("!IBIB")  # frame header, flow id, peer kind NONE
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_HELLO_FIXED = struct.Struct("!4sBB")
_WELCOME_FIXED = struct.Struct("!BI")
_CLOSE = struct.Struct("!IB")
_KEEPALIVE = struct.Struct("!IB")
_UNREACHABLE = struct.Struct("!IBH")
_ECHO = struct.Struct("!IH")


class ProtocolError(Exception):
    """The peer sent bytes that break the protocol; `reason` says how, `code` is the ERROR code to send."""

    def __init__(self, reason: str, code: int = ERR_BAD_FRAME) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Hello(NamedTuple):
    min_version: int
    max_version: int
    token: bytes


class Welcome(NamedTuple):
    version: int
    max_flows: int
    software: str


class OpenFlow(NamedTuple):
    flow_id: int
    destination: Address


class Datagram(NamedTuple):
    flow_id: int
    peer: Optional[Address]
    payload: bytes


class CloseFlow(NamedTuple):
    flow_id: int
    reason: int


class Keepalive(NamedTuple):
    nonce: int
    is_reply: bool


class Error(NamedTuple):
    code: int
    message: str


class Goodbye(NamedTuple):
    pass


class Unreachable(NamedTuple):
    """v2, agent to client: the flow's destination is unreachable (`code`, one of UNREACH_*).

    `info`: for echo flows the sequence number of the request it answers, else 0. `reporter`: the address
    of the host that reported it (the destination or a router), None when unknown.
    """

    flow_id: int
    code: int
    info: int
    reporter: Optional[str]


class OpenEcho(NamedTuple):
    """v2, client to agent: open an ICMP echo flow (a ping socket) to the host `destination`."""

    flow_id: int
    destination: str


class Echo(NamedTuple):
    """v2, both ways: an echo request (client to agent) or the real reply (agent to client)."""

    flow_id: int
    seq: int
    payload: bytes


class Resume(NamedTuple):
    """v2, client to agent, right after WELCOME: adopt the flows of the previous (lost) connection."""


Frame = Union[
    Hello,
    Welcome,
    OpenFlow,
    Datagram,
    CloseFlow,
    Keepalive,
    Error,
    Goodbye,
    Unreachable,
    OpenEcho,
    Echo,
    Resume,
]


# --- addresses ---------------------------------------------------------------------------------------


def encode_address(address: Optional[Address]) -> bytes:
    """Encode an address; None is NONE, SERVER_RESOLVER is the special resolver destination."""
    if address is None:
        return b"\x00"
    if address == SERVER_RESOLVER:
        return bytes((ADDR_SERVER_RESOLVER,))
    host, port = address
    if not 0 < port < 65536:
        raise ValueError("port out of range: %r" % (port,))
    return encode_host(host) + _U16.pack(port)


def _decode_address(body: bytes, offset: int) -> Tuple[Optional[Address], int]:
    if offset >= len(body):
        raise ProtocolError("truncated address")
    kind = body[offset]
    offset += 1
    if kind == ADDR_NONE:
        return None, offset
    if kind == ADDR_SERVER_RESOLVER:
        return SERVER_RESOLVER, offset
    host, offset = _decode_ip(body, offset, kind, "address")
    if offset + 2 > len(body):
        raise ProtocolError("truncated address")
    (port,) = _U16.unpack_from(body, offset)
    if port == 0:
        raise ProtocolError("address with port 0")
    return (host, port), offset + 2


def encode_host(host: Optional[str]) -> bytes:
    """Encode a host address without a port (NONE for None): kind, then 4 or 16 bytes."""
    if host is None:
        return b"\x00"
    host = host.split("%", 1)[0]  # a link-local scope id has no meaning on the other end
    try:
        if ":" in host:
            return b"\x06" + socket.inet_pton(socket.AF_INET6, host)
        return b"\x04" + socket.inet_pton(socket.AF_INET, host)
    except OSError:
        raise ValueError("not an IP address: %r" % (host,)) from None


def _decode_host(body: bytes, offset: int) -> Tuple[Optional[str], int]:
    if offset >= len(body):
        raise ProtocolError("truncated address")
    kind = body[offset]
    offset += 1
    if kind == ADDR_NONE:
        return None, offset
    return _decode_ip(body, offset, kind, "host address")


def _decode_ip(body: bytes, offset: int, kind: int, what: str) -> Tuple[str, int]:
    """The IPv4 or IPv6 address of `kind` at `offset` (after the kind byte) and the offset after it."""
    if kind == ADDR_IPV4:
        size, family = 4, socket.AF_INET
    elif kind == ADDR_IPV6:
        size, family = 16, socket.AF_INET6
    else:
        raise ProtocolError("bad %s kind 0x%02x" % (what, kind))
    end = offset + size
    if end > len(body):
        raise ProtocolError("truncated address")
    return socket.inet_ntop(family, body[offset:end]), end


# --- encoding ----------------------------------------------------------------------------------------


def _frame(frame_type: int, body: bytes) -> bytes:
    return _HEADER.pack(len(body), frame_type) + body


def _check_flow_id(flow_id: int) -> None:
    if not 0 < flow_id <= 0xFFFFFFFF:
        raise ValueError("flow id out of range: %r" % (flow_id,))


def encode_datagram(flow_id: int, payload: bytes, peer: Optional[Address] = None) -> bytes:
    """Encode a DATAGRAM frame (no frame object needed; the client's, without a peer, in one pack)."""
    if peer is not None:
        return encode_datagram_with(datagram_prefix(flow_id, peer), payload)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD))
    _check_flow_id(flow_id)
    return _NO_PEER_HEADER.pack(5 + len(payload), DATAGRAM, flow_id, ADDR_NONE) + payload


def encode_datagram_header(flow_id: int, payload_size: int) -> bytes:
    """The bytes of a peerless DATAGRAM frame before its payload: a sender that joins many frames into one
    write appends header and payload side by side and so copies each payload once, not twice."""
    if not 0 < flow_id <= 0xFFFFFFFF or payload_size > MAX_PAYLOAD:
        raise ValueError("bad DATAGRAM: flow id %r, %d bytes of payload" % (flow_id, payload_size))
    return _NO_PEER_HEADER.pack(5 + payload_size, DATAGRAM, flow_id, ADDR_NONE)


def datagram_prefix(flow_id: int, peer: Optional[Address] = None) -> bytes:
    """The DATAGRAM body's fields before the payload (flow id, peer), for `encode_datagram_with()`.

    A sender of many datagrams on one flow encodes these once, not once per datagram.
    """
    _check_flow_id(flow_id)
    return _U32.pack(flow_id) + encode_address(peer)


def encode_datagram_with(prefix: bytes, payload: bytes) -> bytes:
    """A DATAGRAM frame from a `datagram_prefix()` and the payload (the hot path)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD))
    return _HEADER.pack(len(prefix) + len(payload), DATAGRAM) + prefix + payload


def encode_echo(flow_id: int, seq: int, payload: bytes) -> bytes:
    """Encode an ECHO frame (v2)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes exceeds %d" % (len(payload), MAX_PAYLOAD))
    _check_flow_id(flow_id)
    if not 0 <= seq <= 0xFFFF:
        raise ValueError("echo sequence out of range: %r" % (seq,))
    return _HEADER.pack(6 + len(payload), ECHO) + _ECHO.pack(flow_id, seq) + payload


def encode(frame: Frame) -> bytes:
    """Encode any frame object to bytes (header included)."""
    if isinstance(frame, Datagram):
        return encode_datagram(frame.flow_id, frame.payload, frame.peer)
    if isinstance(frame, OpenFlow):
        _check_flow_id(frame.flow_id)
        if frame.destination is None:
            raise ValueError("OPEN_FLOW needs a destination")
        return _frame(OPEN_FLOW, _U32.pack(frame.flow_id) + encode_address(frame.destination))
    if isinstance(frame, CloseFlow):
        _check_flow_id(frame.flow_id)
        return _frame(CLOSE_FLOW, _CLOSE.pack(frame.flow_id, frame.reason))
    if isinstance(frame, Keepalive):
        return _frame(KEEPALIVE, _KEEPALIVE.pack(frame.nonce, 1 if frame.is_reply else 0))
    if isinstance(frame, Hello):
        if len(frame.token) != TOKEN_SIZE:
            raise ValueError("token must be %d bytes" % TOKEN_SIZE)
        return _frame(HELLO, _HELLO_FIXED.pack(MAGIC, frame.min_version, frame.max_version) + frame.token)
    if isinstance(frame, Welcome):
        software = frame.software.encode("utf-8")[:MAX_SOFTWARE]
        return _frame(WELCOME, _WELCOME_FIXED.pack(frame.version, frame.max_flows) + software)
    if isinstance(frame, Error):
        message = frame.message.encode("utf-8")[:MAX_ERROR_MESSAGE]
        return _frame(ERROR, _U16.pack(frame.code) + message)
    if isinstance(frame, Goodbye):
        return _frame(GOODBYE, b"")
    if isinstance(frame, Echo):
        return encode_echo(frame.flow_id, frame.seq, frame.payload)
    if isinstance(frame, Unreachable):
        _check_flow_id(frame.flow_id)
        body = _UNREACHABLE.pack(frame.flow_id, frame.code, frame.info) + encode_host(frame.reporter)
        return _frame(UNREACHABLE, body)
    if isinstance(frame, OpenEcho):
        _check_flow_id(frame.flow_id)
        if frame.destination is None:
            raise ValueError("OPEN_ECHO needs a destination")
        return _frame(OPEN_ECHO, _U32.pack(frame.flow_id) + encode_host(frame.destination))
    if isinstance(frame, Resume):
        return _frame(RESUME, b"")
    raise TypeError("not a frame: %r" % (frame,))


# --- decoding ----------------------------------------------------------------------------------------


def _flow_id(body: bytes, name: str) -> int:
    if len(body) < 4:
        raise ProtocolError("truncated %s frame" % name)
    (flow_id,) = _U32.unpack_from(body, 0)
    if flow_id == 0:
        raise ProtocolError("flow id 0 is reserved")
    return flow_id


def _decode_body(frame_type: int, body: bytes) -> Frame:
    if frame_type == DATAGRAM:
        flow_id = _flow_id(body, "DATAGRAM")
        peer, offset = _decode_address(body, 4)
        if peer == SERVER_RESOLVER:
            raise ProtocolError("DATAGRAM peer cannot be the server resolver")
        if len(body) - offset > MAX_PAYLOAD:
            raise ProtocolError("oversized datagram payload")
        return Datagram(flow_id, peer, body[offset:])
    if frame_type == OPEN_FLOW:
        flow_id = _flow_id(body, "OPEN_FLOW")
        destination, offset = _decode_address(body, 4)
        if destination is None:
            raise ProtocolError("OPEN_FLOW without destination")
        if offset != len(body):
            raise ProtocolError("trailing bytes in OPEN_FLOW frame")
        return OpenFlow(flow_id, destination)
    if frame_type == CLOSE_FLOW:
        if len(body) != _CLOSE.size:
            raise ProtocolError("bad CLOSE_FLOW length %d" % len(body))
        flow_id = _flow_id(body, "CLOSE_FLOW")
        return CloseFlow(flow_id, body[4])
    if frame_type == KEEPALIVE:
        if len(body) != _KEEPALIVE.size:
            raise ProtocolError("bad KEEPALIVE length %d" % len(body))
        nonce, is_reply = _KEEPALIVE.unpack(body)
        if is_reply > 1:
            raise ProtocolError("bad KEEPALIVE reply flag %d" % is_reply)
        return Keepalive(nonce, bool(is_reply))
    if frame_type == HELLO:
        if len(body) < _HELLO_FIXED.size:
            raise ProtocolError("truncated HELLO frame")
        magic, min_version, max_version = _HELLO_FIXED.unpack_from(body, 0)
        if magic != MAGIC:
            raise ProtocolError("bad HELLO magic")
        if min_version == 0 or min_version > max_version:
            raise ProtocolError("bad version range %d..%d" % (min_version, max_version))
        token = body[_HELLO_FIXED.size :]
        if len(token) != TOKEN_SIZE:
            raise ProtocolError("bad token length %d" % len(token))
        return Hello(min_version, max_version, token)
    if frame_type == WELCOME:
        if len(body) < _WELCOME_FIXED.size:
            raise ProtocolError("truncated WELCOME frame")
        if len(body) > _WELCOME_FIXED.size + MAX_SOFTWARE:
            raise ProtocolError("oversized WELCOME frame")
        version, max_flows = _WELCOME_FIXED.unpack_from(body, 0)
        software = body[_WELCOME_FIXED.size :].decode("utf-8", "replace")
        return Welcome(version, max_flows, software)
    if frame_type == ERROR:
        if len(body) < 2:
            raise ProtocolError("truncated ERROR frame")
        if len(body) > 2 + MAX_ERROR_MESSAGE:
            raise ProtocolError("oversized ERROR frame")
        (code,) = _U16.unpack_from(body, 0)
        return Error(code, body[2:].decode("utf-8", "replace"))
    if frame_type == GOODBYE:
        if body:
            raise ProtocolError("trailing bytes in GOODBYE frame")
        return Goodbye()
    if frame_type == ECHO:
        flow_id = _flow_id(body, "ECHO")
        if len(body) < _ECHO.size:
            raise ProtocolError("truncated ECHO frame")
        (seq,) = _U16.unpack_from(body, 4)
        return Echo(flow_id, seq, body[_ECHO.size :])
    if frame_type == UNREACHABLE:
        flow_id = _flow_id(body, "UNREACHABLE")
        if len(body) < _UNREACHABLE.size:
            raise ProtocolError("truncated UNREACHABLE frame")
        _, code, info = _UNREACHABLE.unpack_from(body, 0)
        reporter, offset = _decode_host(body, _UNREACHABLE.size)
        if offset != len(body):
            raise ProtocolError("trailing bytes in UNREACHABLE frame")
        return Unreachable(flow_id, code, info, reporter)
    if frame_type == OPEN_ECHO:
        flow_id = _flow_id(body, "OPEN_ECHO")
        destination, offset = _decode_host(body, 4)
        if destination is None:
            raise ProtocolError("OPEN_ECHO without destination")
        if offset != len(body):
            raise ProtocolError("trailing bytes in OPEN_ECHO frame")
        return OpenEcho(flow_id, destination)
    if frame_type == RESUME:
        if body:
            raise ProtocolError("trailing bytes in RESUME frame")
        return Resume()
    raise ProtocolError("unknown frame type 0x%02x" % frame_type)


class Decoder:
    """Turns a byte stream into frames. After a ProtocolError the decoder stays failed."""

    def __init__(self) -> None:
        self._chunks: List[bytes] = []
        self._size = 0
        # Bytes needed before parsing can make progress: received chunks are joined only then, so a
        # peer dribbling a large frame byte by byte costs linear, not quadratic, copying.
        self._need = HEADER_SIZE
        self._error: Optional[ProtocolError] = None
        # Encoded peer address -> decoded: a flow's replies all come from one peer, so decoding it (and
        # allocating its text) once per peer instead of once per datagram matters at high rates.
        self._peers: Dict[bytes, Address] = {}

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return self._size

    def feed(self, data: bytes) -> List[Frame]:
        """Add received bytes; return every frame now complete (possibly none)."""
        if self._error is not None:
            raise self._error
        if data:
            self._chunks.append(bytes(data))
            self._size += len(data)
        if self._size < self._need:
            return []
        buffer = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        frames: List[Frame] = []
        offset = 0
        end = len(buffer)
        need = HEADER_SIZE
        try:
            while end - offset >= HEADER_SIZE:
                length, frame_type = _HEADER.unpack_from(buffer, offset)
                limit = _MAX_BODY_BY_TYPE.get(frame_type)
                if limit is None:
                    raise ProtocolError("unknown frame type 0x%02x" % frame_type)
                if length > limit:
                    raise ProtocolError("oversized frame: %d bytes for type 0x%02x" % (length, frame_type))
                body_start = offset + HEADER_SIZE
                if end - body_start < length:
                    need = HEADER_SIZE + length
                    break
                if frame_type == DATAGRAM:
                    frames.append(self._datagram(buffer, body_start, body_start + length))
                else:
                    frames.append(_decode_body(frame_type, buffer[body_start : body_start + length]))
                offset = body_start + length
        except ProtocolError as exc:
            self._error = exc
            raise
        rest = buffer[offset:] if offset else buffer
        self._chunks = [rest] if rest else []
        self._size = len(rest)
        self._need = need
        return frames

    def _datagram(self, buffer: bytes, start: int, end: int) -> Datagram:
        """DATAGRAM body at buffer[start:end]: the common shapes decoded in place (one copy, the payload;
        peers from a small cache); anything unusual goes through `_decode_body` and its error messages."""
        if end - start >= 5:
            kind = buffer[start + 4]
            if kind == ADDR_NONE:
                flow_id = _U32.unpack_from(buffer, start)[0]
                if flow_id and end - start - 5 <= MAX_PAYLOAD:
                    return Datagram(flow_id, None, buffer[start + 5 : end])
            elif kind in (ADDR_IPV4, ADDR_IPV6):
                payload_at = start + (11 if kind == ADDR_IPV4 else 23)
                if payload_at <= end and end - payload_at <= MAX_PAYLOAD:
                    key = buffer[start + 4 : payload_at]
                    peer = self._peers.get(key)
                    flow_id = _U32.unpack_from(buffer, start)[0]
                    if peer is not None and flow_id:
                        return Datagram(flow_id, peer, buffer[payload_at:end])
                    frame = _decode_body(DATAGRAM, buffer[start:end])
                    if len(self._peers) >= _PEER_CACHE_SIZE:
                        self._peers.clear()
                    self._peers[key] = frame.peer
                    return frame
        return _decode_body(DATAGRAM, buffer[start:end])

    def eof(self) -> None:
        """The stream ended: raise ProtocolError if it ended inside a frame."""
        if self._error is not None:
            raise self._error
        if self._size:
            self._error = ProtocolError("truncated frame at end of stream")
            raise self._error


# Largest body each frame type may have: checked on the header, before any body byte is buffered.
_MAX_BODY_BY_TYPE = {
    HELLO: _HELLO_FIXED.size + TOKEN_SIZE,
    WELCOME: _WELCOME_FIXED.size + MAX_SOFTWARE,
    OPEN_FLOW: 4 + _MAX_ADDRESS,
    DATAGRAM: MAX_BODY,
    CLOSE_FLOW: _CLOSE.size,
    KEEPALIVE: _KEEPALIVE.size,
    ERROR: 2 + MAX_ERROR_MESSAGE,
    GOODBYE: 0,
    UNREACHABLE: _UNREACHABLE.size + 17,
    OPEN_ECHO: 4 + 17,
    ECHO: _ECHO.size + MAX_PAYLOAD,
    RESUME: 0,
}


# --- handshake helpers -------------------------------------------------------------------------------


def negotiate_version(hello: Hello) -> int:
    """Return the highest version both sides speak, or raise ProtocolError(UNSUPPORTED_VERSION)."""
    high = min(hello.max_version, MAX_VERSION)
    if high < max(hello.min_version, MIN_VERSION):
        raise ProtocolError(
            "no common version: peer speaks %d..%d, agent %d..%d"
            % (hello.min_version, hello.max_version, MIN_VERSION, MAX_VERSION),
            ERR_UNSUPPORTED_VERSION,
        )
    return high


def token_matches(expected: bytes, presented: bytes) -> bool:
    """Constant-time token comparison."""
    return hmac.compare_digest(expected, presented)


def is_dns_destination(destination: Address) -> bool:
    """True for destinations that get the short DNS idle timeout."""
    return destination == SERVER_RESOLVER or destination[1] == 53
