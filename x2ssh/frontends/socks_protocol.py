"""Sans-IO server side of SOCKS5 (RFC 1928, RFC 1929 auth) and HTTP CONNECT, sharing one port.

Theory of operation. A `ServerConnection` is fed the client's bytes with `receive_data()` and yields
events from `next_event()`: `Request` (CONNECT, BIND or UDP ASSOCIATE, from either flavor) or `NEED_DATA`.
Handshake messages that need no decision from the caller (SOCKS5 method selection, RFC 1929 status) are
queued for `data_to_send()`. The caller answers a `Request` with `reply(code)`, which returns the bytes to
write: for SOCKS5 the RFC 1928 reply, for HTTP a status line (200 on success, 4xx/5xx otherwise). After a
successful reply the connection is a tunnel and `trailing_data()` hands over whatever the client sent
after its request; after an error reply the caller closes.

    START --0x05--> GREETING --> [AUTH] --> REQUEST --+
    START --A..Z--> HTTP_HEAD ------------------------+--> AWAIT_REPLY --reply(ok)--> TUNNEL
                                                                     --reply(err)-> CLOSED

The first byte decides the flavor: 0x05 is SOCKS5, an upper-case letter an HTTP request line; anything else
(SOCKS4, TLS, garbage) is refused. Every fault of the client raises `ProtocolError`, whose `reply` holds the
bytes the protocol prescribes for it (possibly empty): send them, then close. Misuse by the caller raises
`LocalProtocolError`. The handshake is parsed as bytes arrive: an HTTP request head must fit in
`MAX_HTTP_HEAD` (a SOCKS5 message is at most 513 bytes anyway), and what the client sends after its request
and before the reply is kept up to `MAX_BUFFER`, so memory per client is bounded whatever it sends.

The UDP ASSOCIATE datagram header (RFC 1928 section 7) is handled by `parse_udp_datagram` and
`build_udp_datagram`; fragments (FRAG != 0) are refused, as most servers do.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import ipaddress
import re
import socket
import struct
from dataclasses import dataclass

MAX_BUFFER = 256 * 1024  # bytes held for one client before its request is answered (one socket read)
MAX_HTTP_HEAD = 8 * 1024  # request line and headers of an HTTP CONNECT
MAX_HTTP_HEADERS = 100
MAX_NAME = 255  # a domain name in SOCKS5 is at most 255 bytes (one length byte)

Address = tuple[str, int]


class Reply(enum.IntEnum):
    """SOCKS5 reply codes (RFC 1928 section 6); also select the HTTP status of an HTTP CONNECT reply."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class Command(enum.IntEnum):
    """SOCKS5 commands; an HTTP CONNECT is a CONNECT."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    """How the client named the destination."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Method(enum.IntEnum):
    """SOCKS5 authentication methods this server knows."""

    NO_AUTH = 0x00
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Flavor(enum.Enum):
    """Which protocol the client speaks."""

    SOCKS5 = "socks5"
    HTTP = "http"


class SocksError(Exception):
    """Base of this module's errors."""


class ProtocolError(SocksError):
    """The client broke the protocol or failed authentication. Send `reply` (may be empty), then close."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


class LocalProtocolError(SocksError):
    """The caller used the API wrongly (e.g. replied twice, or before a request)."""


@dataclass(frozen=True)
class Credentials:
    """Username and password a client must present (SOCKS5 RFC 1929 or HTTP Proxy-Authorization Basic)."""

    username: str
    password: str

    def __post_init__(self) -> None:
        for what, value in (("username", self.username), ("password", self.password)):
            if not value or len(value.encode()) > 255:
                raise ValueError(f"the proxy {what} must be 1 to 255 bytes")
        if ":" in self.username:
            raise ValueError("the proxy username cannot contain ':' (HTTP Basic authentication)")

    def matches(self, username: bytes, password: bytes) -> bool:
        """Constant-time comparison of both fields."""
        ok_user = hmac.compare_digest(username, self.username.encode())
        ok_pass = hmac.compare_digest(password, self.password.encode())
        return ok_user and ok_pass


@dataclass(frozen=True)
class Request:
    """A client's request: what to do and where. `host` is canonical text for addresses."""

    flavor: Flavor
    command: Command
    host: str
    port: int
    address_type: AddressType
    username: str | None = None  # who authenticated, if anyone


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""`next_event()` needs more bytes from the client."""


class _State(enum.Enum):
    START = "start"
    GREETING = "greeting"
    AUTH = "auth"
    REQUEST = "request"
    HTTP_HEAD = "http head"
    AWAIT_REPLY = "await reply"
    TUNNEL = "tunnel"
    CLOSED = "closed"
    ERROR = "error"


_UNBOUND: Address = ("0.0.0.0", 0)


def socks5_reply(code: Reply, bound: Address = _UNBOUND) -> bytes:
    """RFC 1928 reply: VER REP RSV ATYP BND.ADDR BND.PORT."""
    if bound == _UNBOUND:  # nearly every reply: made once (parsing "0.0.0.0" each time was a hot spot)
        return _UNBOUND_REPLIES[code]
    return bytes((5, code, 0)) + encode_address(*bound)


_HTTP_STATUS: dict[Reply, tuple[int, str]] = {
    Reply.SUCCEEDED: (200, "Connection established"),
    Reply.GENERAL_FAILURE: (502, "Bad Gateway"),
    Reply.NOT_ALLOWED: (403, "Forbidden"),
    Reply.NETWORK_UNREACHABLE: (502, "Bad Gateway"),
    Reply.HOST_UNREACHABLE: (502, "Bad Gateway"),
    Reply.CONNECTION_REFUSED: (502, "Bad Gateway"),
    Reply.TTL_EXPIRED: (504, "Gateway Timeout"),
    Reply.COMMAND_NOT_SUPPORTED: (501, "Not Implemented"),
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: (400, "Bad Request"),
}

_REPLY_TEXT: dict[Reply, str] = {
    Reply.SUCCEEDED: "succeeded",
    Reply.GENERAL_FAILURE: "general failure",
    Reply.NOT_ALLOWED: "not allowed by the proxy's rules",
    Reply.NETWORK_UNREACHABLE: "network unreachable",
    Reply.HOST_UNREACHABLE: "host unreachable",
    Reply.CONNECTION_REFUSED: "connection refused",
    Reply.TTL_EXPIRED: "timed out",
    Reply.COMMAND_NOT_SUPPORTED: "command not supported",
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}


def http_response(status: int, reason: str, body: str = "", extra_headers: tuple[str, ...] = ()) -> bytes:
    """A complete HTTP/1.1 response; anything but 200 carries a text body and closes the connection."""
    if status == 200:
        return f"HTTP/1.1 200 {reason}\r\n\r\n".encode()
    data = body.encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        *extra_headers,
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(data)}",
        "Connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def http_reply(code: Reply, target: str = "") -> bytes:
    """The HTTP CONNECT answer that stands for SOCKS5 reply `code` (200 on success)."""
    status, reason = _HTTP_STATUS[code]
    where = f" ({target})" if target else ""
    return http_response(status, reason, f"x2ssh: {_REPLY_TEXT[code]}{where}\n")


def describe_reply(code: Reply) -> str:
    """Human text for a reply code (for logs)."""
    return _REPLY_TEXT[code]


_AUTH_REQUIRED = http_response(
    407,
    "Proxy Authentication Required",
    "x2ssh: this proxy needs a username and password\n",
    ('Proxy-Authenticate: Basic realm="x2ssh"',),
)


def encode_address(host: str, port: int) -> bytes:
    """ATYP ADDR PORT as in a SOCKS5 reply or UDP header: an IP literal as IPv4/IPv6, else a domain."""
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port out of range: {port}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna") if not host.isascii() else host.encode()
        if not 0 < len(name) <= MAX_NAME:
            raise LocalProtocolError(f"a domain name must be 1 to {MAX_NAME} bytes: {host!r}") from None
        return bytes((AddressType.DOMAIN, len(name))) + name + struct.pack("!H", port)
    atyp = AddressType.IPV4 if ip.version == 4 else AddressType.IPV6
    return bytes((atyp,)) + ip.packed + struct.pack("!H", port)


_UNBOUND_REPLIES = {code: bytes((5, code, 0)) + encode_address(*_UNBOUND) for code in Reply}
_BAD_ADDRESS_TYPE = _UNBOUND_REPLIES[Reply.ADDRESS_TYPE_NOT_SUPPORTED]
_BAD_NAME = _UNBOUND_REPLIES[Reply.HOST_UNREACHABLE]
_COMMANDS: dict[int, Command] = {int(command): command for command in Command}  # Command(n) is a Python call


_NO_AUTH_GREETING = b"\x05\x01\x00"  # SOCKS5, one method: no authentication
_NO_AUTH_CHOSEN = b"\x05\x00"

_NAME_OK = re.compile(rb"[A-Za-z0-9_.-]+\.?")


def _check_name(raw: bytes, reply: bytes) -> str:
    """A domain name as the client sent it: letters, digits, '-', '_' and dots (IDNs come as punycode)."""
    if not raw or len(raw) > MAX_NAME or not _NAME_OK.fullmatch(raw) or raw.startswith(b"."):
        raise ProtocolError(f"invalid domain name {raw[:64]!r}", reply)
    return raw.decode("ascii")


def _parse_address(
    buf: bytes | bytearray, offset: int, bad_type: bytes = b"", bad_name: bytes = b""
) -> tuple[str, int, AddressType, int] | None:
    """ATYP ADDR PORT at `offset`: (host, port, type, end offset), or None when more bytes are needed.

    `bad_type` and `bad_name` are the replies a `ProtocolError` carries for an unknown ATYP or a bad name."""
    if len(buf) < offset + 1:
        return None
    atyp = buf[offset]
    if atyp == AddressType.IPV4:
        end = offset + 1 + 4
        if len(buf) < end + 2:
            return None
        host = socket.inet_ntoa(bytes(buf[offset + 1 : end]))  # the same text as ipaddress's, faster
        kind = AddressType.IPV4
    elif atyp == AddressType.IPV6:
        end = offset + 1 + 16
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[offset + 1 : end])))
        kind = AddressType.IPV6
    elif atyp == AddressType.DOMAIN:
        if len(buf) < offset + 2:
            return None
        size = buf[offset + 1]
        end = offset + 2 + size
        if len(buf) < end + 2:
            return None
        host = _check_name(bytes(buf[offset + 2 : end]), bad_name)
        kind = AddressType.DOMAIN
    else:
        raise ProtocolError(f"address type {atyp:#04x} not supported", bad_type)
    (port,) = struct.unpack_from("!H", buf, end)
    return host, port, kind, end + 2


class ServerConnection:
    """One client of the proxy port, from its first byte until the tunnel is up (see module docstring)."""

    def __init__(self, credentials: Credentials | None = None) -> None:
        self.credentials = credentials
        self.flavor: Flavor | None = None
        self.request: Request | None = None
        self._state = _State.START
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
        self._ready: Request | None = None
        self._username: str | None = None

    # -- input --

    @property
    def buffered(self) -> int:
        """Bytes received and not consumed yet (never more than `MAX_BUFFER`)."""
        return len(self._buf)

    @property
    def state(self) -> str:
        """The current state's name (for logs and tests)."""
        return self._state.value

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" means it closed its side. Raises `ProtocolError` for a broken client.

        The handshake is parsed as the bytes arrive, so what is held is only an unfinished message (an HTTP
        head up to `MAX_HTTP_HEAD`) or, once the request is complete, what followed it (up to `MAX_BUFFER`;
        the caller stops reading until it has replied)."""
        if self._state in (_State.TUNNEL, _State.CLOSED, _State.ERROR):
            raise LocalProtocolError(f"receive_data() in state {self._state.value}")
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after end of data")
        if not self._buf and self._fast_path(data):
            return
        try:
            if len(self._buf) + len(data) > MAX_BUFFER and self._state is _State.AWAIT_REPLY:
                raise ProtocolError(
                    f"client sent more than {MAX_BUFFER} bytes before its request was answered"
                )
            self._buf += data
            self._advance()
            if len(self._buf) > MAX_BUFFER:
                raise ProtocolError(
                    f"client sent more than {MAX_BUFFER} bytes before its request was answered"
                )
        except ProtocolError:
            self._fail()
            raise

    def _fast_path(self, data: bytes) -> bool:
        """The two messages of nearly every SOCKS5 client, each alone in its read (a client that waits for
        the answer to its greeting): the no-authentication greeting, and a CONNECT to an IPv4 address. They
        take the same steps as through the buffer and `_advance` (the same state, answer and `Request`),
        without the buffer copies and the loop; anything else (and any other split) takes the full parser.
        True when `data` was taken."""
        state = self._state
        if state is _State.START:
            if data != _NO_AUTH_GREETING or self.credentials is not None:
                return False
            self.flavor = Flavor.SOCKS5
            self._out += _NO_AUTH_CHOSEN
            self._state = _State.REQUEST
            return True
        if state is not _State.REQUEST or len(data) != 10 or data[:2] != b"\x05\x01" or data[3] != 1:
            return False
        host = socket.inet_ntoa(data[4:8])
        port = int.from_bytes(data[8:10], "big")
        request = Request(Flavor.SOCKS5, Command.CONNECT, host, port, AddressType.IPV4, self._username)
        self._ready = self._requested(request)
        return True

    def next_event(self) -> Request | _NeedData:
        """The next event: a `Request` (answer it with `reply()`) or `NEED_DATA`. Raises `ProtocolError` if
        the client closed in the middle of the handshake."""
        if self._state in (_State.ERROR, _State.CLOSED, _State.TUNNEL):
            raise LocalProtocolError(f"next_event() in state {self._state.value}")
        ready, self._ready = self._ready, None
        if ready is not None:
            return ready
        if self._state is not _State.AWAIT_REPLY and self._eof:
            state = self._state.value
            self._fail()
            raise ProtocolError(f"client closed the connection during the handshake ({state})")
        return NEED_DATA

    def _advance(self) -> None:
        """Run the handshake over the buffered bytes until it needs more or a request is complete."""
        state = self._state
        while state is not _State.AWAIT_REPLY:
            if state is _State.START:
                event = self._start()
            elif state is _State.GREETING:
                event = self._greeting()
            elif state is _State.AUTH:
                event = self._auth()
            elif state is _State.REQUEST:
                event = self._socks_request()
            else:
                event = self._http_head()
            if event is not None:
                self._ready = event
                return
            if self._state is state:  # no progress: wait for bytes
                return
            state = self._state

    def _fail(self) -> None:
        self._state = _State.ERROR
        self._buf.clear()
        self._ready = None

    def data_to_send(self) -> bytes:
        """Handshake bytes to write to the client now (method selection, auth status)."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    # -- output --

    def reply(self, code: Reply, bound: Address = ("0.0.0.0", 0)) -> bytes:
        """Answer the pending request: the bytes to write. `bound` is BND.ADDR/PORT (SOCKS5 only).

        `Reply.SUCCEEDED` turns the connection into a tunnel; anything else closes it (write, then close)."""
        if self._state is not _State.AWAIT_REPLY or self.request is None:
            raise LocalProtocolError(f"reply() in state {self._state.value}")
        self._state = _State.TUNNEL if code == Reply.SUCCEEDED else _State.CLOSED
        if self.flavor is Flavor.HTTP:
            target = "" if code == Reply.SUCCEEDED else f"{self.request.host}:{self.request.port}"
            return http_reply(code, target)
        return socks5_reply(code, bound)

    def trailing_data(self) -> bytes:
        """After a successful reply: what the client sent after its request (bytes for the tunnel)."""
        if self._state is not _State.TUNNEL:
            raise LocalProtocolError(f"trailing_data() in state {self._state.value}")
        data = bytes(self._buf)
        self._buf.clear()
        return data

    # -- the steps; each consumes bytes and returns an event, or None (more bytes, or a state change) --

    def _start(self) -> None:
        if not self._buf:
            return
        first = self._buf[0]
        if first == 0x05:
            self.flavor = Flavor.SOCKS5
            self._state = _State.GREETING
        elif 0x41 <= first <= 0x5A:  # 'A'..'Z': an HTTP method
            self.flavor = Flavor.HTTP
            self._state = _State.HTTP_HEAD
        elif first == 0x04:
            raise ProtocolError("SOCKS4 is not supported: use SOCKS5", b"\x00\x5b" + bytes(6))
        elif first == 0x16:
            raise ProtocolError("TLS on the proxy port: it speaks SOCKS5 and plain-text HTTP CONNECT")
        else:
            raise ProtocolError(f"neither SOCKS5 nor HTTP: first byte {first:#04x}")

    def _greeting(self) -> None:
        buf = self._buf
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return
        count = buf[1]
        methods = set(buf[2 : 2 + count])
        del buf[: 2 + count]
        wanted = Method.USERNAME_PASSWORD if self.credentials else Method.NO_AUTH
        if wanted not in methods:
            need = "username/password" if self.credentials else "no authentication"
            offered = ", ".join(f"{m:#04x}" for m in sorted(methods)) or "none"
            raise ProtocolError(
                f"no acceptable method: the proxy needs {need}, client offers {offered}", b"\x05\xff"
            )
        self._out += bytes((5, wanted))
        self._state = _State.AUTH if self.credentials else _State.REQUEST

    def _auth(self) -> None:
        buf = self._buf
        failed = b"\x01\x01"
        if len(buf) < 2:
            return
        if buf[0] != 0x01:
            raise ProtocolError(f"username/password negotiation version {buf[0]:#04x}, expected 0x01", failed)
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            return
        username, password = bytes(buf[2 : 2 + ulen]), bytes(buf[3 + ulen : end])
        del buf[:end]
        assert self.credentials is not None
        if not self.credentials.matches(username, password):
            raise ProtocolError(f"wrong username or password (user {username[:64]!r})", failed)
        self._username = self.credentials.username
        self._out += b"\x01\x00"
        self._state = _State.REQUEST

    def _socks_request(self) -> Request | None:
        buf = self._buf
        if len(buf) < 4:
            return None
        if buf[0] != 0x05:
            raise ProtocolError(
                f"request version {buf[0]:#04x}, expected 0x05", socks5_reply(Reply.GENERAL_FAILURE)
            )
        command = _COMMANDS.get(buf[1])
        if command is None:
            raise ProtocolError(
                f"unknown command {buf[1]:#04x}", _UNBOUND_REPLIES[Reply.COMMAND_NOT_SUPPORTED]
            )
        parsed = _parse_address(
            buf, 3, _BAD_ADDRESS_TYPE, _BAD_NAME
        )  # error replies made once, not per request
        if parsed is None:
            return None
        host, port, kind, end = parsed
        del buf[:end]
        return self._requested(Request(Flavor.SOCKS5, command, host, port, kind, self._username))

    def _http_head(self) -> Request | None:
        buf = self._buf
        match = re.search(rb"\r?\n\r?\n", buf[: MAX_HTTP_HEAD + 4])
        if match is None:
            if len(buf) > MAX_HTTP_HEAD:
                raise ProtocolError(
                    f"HTTP request head longer than {MAX_HTTP_HEAD} bytes",
                    http_response(431, "Request Header Fields Too Large", "x2ssh: request head too large\n"),
                )
            return None
        head = bytes(buf[: match.start()])
        del buf[: match.end()]
        lines = [line.rstrip(b"\r") for line in head.split(b"\n")]
        host, port = self._http_request_line(lines[0])
        authorization = self._http_headers(lines[1:])
        username = self._http_authenticate(authorization)
        kind = _address_type(host)
        return self._requested(Request(Flavor.HTTP, Command.CONNECT, host, port, kind, username))

    def _http_request_line(self, line: bytes) -> Address:
        parts = line.split(b" ")
        if len(parts) != 3 or not re.fullmatch(rb"HTTP/1\.[01]", parts[2]):
            raise ProtocolError(
                f"malformed HTTP request line {line[:80]!r}", _bad_request("malformed request line")
            )
        method, target = parts[0], parts[1]
        if method != b"CONNECT":
            raise ProtocolError(
                f"HTTP method {method[:20]!r} on the proxy port: only CONNECT is supported",
                http_response(501, "Not Implemented", "x2ssh: this proxy port supports only CONNECT\n"),
            )
        return _parse_authority(target)

    @staticmethod
    def _http_headers(lines: list[bytes]) -> bytes | None:
        if len(lines) > MAX_HTTP_HEADERS:
            raise ProtocolError("too many HTTP headers", _bad_request("too many headers"))
        authorization = None
        for line in lines:
            name, sep, value = line.partition(b":")
            if not sep or not re.fullmatch(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ProtocolError(f"malformed HTTP header {line[:80]!r}", _bad_request("malformed header"))
            if name.lower() == b"proxy-authorization":
                if authorization is not None:
                    raise ProtocolError("two Proxy-Authorization headers", _bad_request("duplicate header"))
                authorization = value.strip(b" \t")
        return authorization

    def _http_authenticate(self, authorization: bytes | None) -> str | None:
        if self.credentials is None:
            return None
        if authorization is None:
            raise ProtocolError("HTTP CONNECT without Proxy-Authorization", _AUTH_REQUIRED)
        scheme, _, token = authorization.partition(b" ")
        try:
            if scheme.lower() != b"basic":
                raise ValueError("not Basic")
            decoded = base64.b64decode(token.strip(), validate=True)
        except (ValueError, binascii.Error):
            raise ProtocolError("unusable Proxy-Authorization header", _AUTH_REQUIRED) from None
        username, sep, password = decoded.partition(b":")
        if not sep or not self.credentials.matches(username, password):
            raise ProtocolError(f"wrong proxy username or password (user {username[:64]!r})", _AUTH_REQUIRED)
        return self.credentials.username

    def _requested(self, request: Request) -> Request:
        self.request = request
        self._state = _State.AWAIT_REPLY
        return request


def _bad_request(why: str) -> bytes:
    return http_response(400, "Bad Request", f"x2ssh: {why}\n")


def _address_type(host: str) -> AddressType:
    try:
        return AddressType.IPV4 if ipaddress.ip_address(host).version == 4 else AddressType.IPV6
    except ValueError:
        return AddressType.DOMAIN


def _parse_authority(target: bytes) -> Address:
    """`host:port` or `[v6]:port` of an HTTP CONNECT request."""
    bad = ProtocolError(f"bad CONNECT target {target[:80]!r}: expected host:port", _bad_request("bad target"))
    if target.startswith(b"["):
        inside, sep, rest = target[1:].partition(b"]")
        if not sep or not rest.startswith(b":"):
            raise bad
        try:
            host = str(ipaddress.IPv6Address(inside.decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            raise bad from None
        port_text = rest[1:]
    else:
        name, sep, port_text = target.rpartition(b":")
        if not sep or b":" in name:
            raise bad
        host = _check_name(name, bad.reply)
        if _address_type(host) is AddressType.DOMAIN and host.replace(".", "").isdigit():
            raise bad  # 1.2.3, 999.1.1.1: neither an address nor a name
    if not re.fullmatch(rb"[0-9]{1,5}", port_text) or not 0 < int(port_text) <= 0xFFFF:
        raise bad
    return host, int(port_text)


# -- UDP ASSOCIATE datagrams (RFC 1928 section 7) ----------------------------------------------------------


@dataclass(frozen=True)
class UdpDatagram:
    """A datagram a client sent to its UDP relay: where to, and what."""

    host: str
    port: int
    address_type: AddressType
    payload: bytes


def parse_udp_datagram(data: bytes) -> UdpDatagram:
    """RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA. Raises `ProtocolError` (drop it) for fragments and junk."""
    if len(data) < 4:
        raise ProtocolError(f"UDP datagram of {len(data)} bytes: shorter than its header")
    if data[2] != 0:
        raise ProtocolError(f"fragmented UDP datagram (FRAG={data[2]}) dropped")
    parsed = _parse_address(data, 3)
    if parsed is None:
        raise ProtocolError("truncated UDP datagram header")
    host, port, kind, end = parsed
    return UdpDatagram(host, port, kind, bytes(data[end:]))


def build_udp_datagram(host: str, port: int, payload: bytes) -> bytes:
    """The header a relay puts before a reply from `host`:`port` to its client (FRAG 0)."""
    return b"\x00\x00\x00" + encode_address(host, port) + payload
