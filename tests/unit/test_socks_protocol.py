"""The sans-IO SOCKS5 / HTTP CONNECT server: exact bytes of every message and reply, and every refusal."""

from __future__ import annotations

import base64

import pytest

from x2ssh.frontends.socks_protocol import (
    MAX_BUFFER,
    MAX_HTTP_HEAD,
    NEED_DATA,
    AddressType,
    Command,
    Credentials,
    Flavor,
    LocalProtocolError,
    ProtocolError,
    Reply,
    Request,
    ServerConnection,
    build_udp_datagram,
    encode_address,
    http_reply,
    parse_udp_datagram,
    socks5_reply,
)

CREDS = Credentials("alice", "s3cret")
GREET_NOAUTH = b"\x05\x01\x00"
GREET_USERPASS = b"\x05\x01\x02"
AUTH_OK = b"\x01\x05alice\x06s3cret"


def connect_v4(ip: bytes = b"\x7f\x00\x00\x01", port: int = 80) -> bytes:
    return b"\x05\x01\x00\x01" + ip + port.to_bytes(2, "big")


def feed(conn: ServerConnection, data: bytes) -> Request:
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, Request), event
    return event


def refusal(conn: ServerConnection, data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(data)
        while conn.next_event() is not NEED_DATA:
            pass
    return info.value


# -- replies: exact bytes --------------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(Reply))
def test_socks5_reply_bytes_for_every_code(code: Reply) -> None:
    assert socks5_reply(code) == bytes([5, code.value, 0, 1, 0, 0, 0, 0, 0, 0])


def test_reply_codes_are_rfc1928_values() -> None:
    assert [c.value for c in Reply] == list(range(9))
    assert Reply.CONNECTION_REFUSED == 0x05 and Reply.TTL_EXPIRED == 0x06
    assert Reply.COMMAND_NOT_SUPPORTED == 0x07 and Reply.ADDRESS_TYPE_NOT_SUPPORTED == 0x08


def test_socks5_reply_with_bound_addresses() -> None:
    assert socks5_reply(Reply.SUCCEEDED, ("127.0.0.1", 40000)) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x9c\x40"
    six = socks5_reply(Reply.SUCCEEDED, ("::1", 53))
    assert six == b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x00\x35"
    assert socks5_reply(Reply.SUCCEEDED, ("a.b", 1)) == b"\x05\x00\x00\x03\x03a.b\x00\x01"


def test_encode_address_refuses_bad_input() -> None:
    with pytest.raises(LocalProtocolError):
        encode_address("1.2.3.4", 70000)
    with pytest.raises(LocalProtocolError):
        encode_address("x" * 256, 1)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (Reply.SUCCEEDED, b"HTTP/1.1 200 Connection established\r\n\r\n"),
        (Reply.GENERAL_FAILURE, b"HTTP/1.1 502 Bad Gateway\r\n"),
        (Reply.NOT_ALLOWED, b"HTTP/1.1 403 Forbidden\r\n"),
        (Reply.NETWORK_UNREACHABLE, b"HTTP/1.1 502 Bad Gateway\r\n"),
        (Reply.HOST_UNREACHABLE, b"HTTP/1.1 502 Bad Gateway\r\n"),
        (Reply.CONNECTION_REFUSED, b"HTTP/1.1 502 Bad Gateway\r\n"),
        (Reply.TTL_EXPIRED, b"HTTP/1.1 504 Gateway Timeout\r\n"),
        (Reply.COMMAND_NOT_SUPPORTED, b"HTTP/1.1 501 Not Implemented\r\n"),
        (Reply.ADDRESS_TYPE_NOT_SUPPORTED, b"HTTP/1.1 400 Bad Request\r\n"),
    ],
)
def test_http_reply_status_for_every_code(code: Reply, status: bytes) -> None:
    reply = http_reply(code, "t:1")
    assert reply.startswith(status)
    if code != Reply.SUCCEEDED:
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"Connection: close" in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert body.startswith(b"x2ssh: ") and b"(t:1)" in body


def test_http_refused_reply_exact() -> None:
    assert http_reply(Reply.CONNECTION_REFUSED, "h:2") == (
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 32\r\n"
        b"Connection: close\r\n\r\nx2ssh: connection refused (h:2)\n"
    )


# -- SOCKS5 handshake ------------------------------------------------------------------------------------


def test_connect_ipv4_without_auth() -> None:
    conn = ServerConnection()
    conn.receive_data(GREET_NOAUTH)
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"\x05\x00"
    request = feed(conn, connect_v4(port=8080))
    assert request == Request(Flavor.SOCKS5, Command.CONNECT, "127.0.0.1", 8080, AddressType.IPV4)
    assert conn.next_event() is NEED_DATA
    assert conn.reply(Reply.SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert conn.state == "tunnel"
    assert conn.trailing_data() == b""


def test_pipelined_greeting_request_and_early_data() -> None:
    conn = ServerConnection()
    request = feed(conn, GREET_NOAUTH + connect_v4() + b"GET / HTTP/1.0\r\n\r\n")
    assert request.host == "127.0.0.1"
    assert conn.data_to_send() == b"\x05\x00"
    conn.reply(Reply.SUCCEEDED)
    assert conn.trailing_data() == b"GET / HTTP/1.0\r\n\r\n"


def test_byte_by_byte_gives_the_same_request() -> None:
    conn = ServerConnection(CREDS)
    data = GREET_USERPASS + AUTH_OK + b"\x05\x01\x00\x03\x0btarget.test\x01\xbb"
    events = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        events.append(conn.next_event())
    assert all(e is NEED_DATA for e in events[:-1])
    assert events[-1] == Request(
        Flavor.SOCKS5, Command.CONNECT, "target.test", 443, AddressType.DOMAIN, "alice"
    )
    assert conn.data_to_send() == b"\x05\x02\x01\x00"


def test_ipv6_and_domain_and_udp_associate_and_bind() -> None:
    v6 = b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + b"\x00\x50"
    assert feed(ServerConnection(), GREET_NOAUTH + v6).host == "::1"
    dom = b"\x05\x01\x00\x03\x09localhost\x00\x16"
    assert feed(ServerConnection(), GREET_NOAUTH + dom).port == 22
    udp = feed(ServerConnection(), GREET_NOAUTH + b"\x05\x03\x00\x01" + bytes(6))
    assert (udp.command, udp.host, udp.port) == (Command.UDP_ASSOCIATE, "0.0.0.0", 0)
    bind = feed(ServerConnection(), GREET_NOAUTH + b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x15")
    assert bind.command is Command.BIND


def test_bind_answered_command_not_supported() -> None:
    conn = ServerConnection()
    feed(conn, GREET_NOAUTH + b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x15")
    assert conn.reply(Reply.COMMAND_NOT_SUPPORTED) == b"\x05\x07\x00\x01\x00\x00\x00\x00\x00\x00"
    assert conn.state == "closed"
    with pytest.raises(LocalProtocolError):
        conn.trailing_data()


def test_udp_associate_reply_carries_relay_address() -> None:
    conn = ServerConnection()
    feed(conn, GREET_NOAUTH + b"\x05\x03\x00\x01" + bytes(6))
    assert conn.reply(Reply.SUCCEEDED, ("127.0.0.1", 5353)) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x14\xe9"


def test_no_auth_not_accepted_when_credentials_required() -> None:
    error = refusal(ServerConnection(CREDS), GREET_NOAUTH)
    assert error.reply == b"\x05\xff"
    assert "username/password" in str(error)


def test_username_password_not_selected_without_credentials() -> None:
    conn = ServerConnection()
    conn.receive_data(b"\x05\x02\x02\x00")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"\x05\x00"
    assert refusal(ServerConnection(), b"\x05\x01\x02").reply == b"\x05\xff"
    assert refusal(ServerConnection(), b"\x05\x00").reply == b"\x05\xff"


def test_wrong_password_gets_rfc1929_failure() -> None:
    conn = ServerConnection(CREDS)
    error = refusal(conn, GREET_USERPASS + b"\x01\x05alice\x05wrong")
    assert error.reply == b"\x01\x01"
    assert conn.data_to_send() == b"\x05\x02"
    assert refusal(ServerConnection(CREDS), GREET_USERPASS + b"\x02\x05alice\x06s3cret").reply == b"\x01\x01"
    assert refusal(ServerConnection(CREDS), GREET_USERPASS + b"\x01\x00\x00").reply == b"\x01\x01"


def test_right_password_then_request() -> None:
    conn = ServerConnection(CREDS)
    request = feed(conn, GREET_USERPASS + AUTH_OK + connect_v4())
    assert request.username == "alice"
    assert conn.data_to_send() == b"\x05\x02\x01\x00"


@pytest.mark.parametrize(
    ("request_bytes", "reply_code"),
    [
        (b"\x04\x01\x00\x01" + bytes(6), Reply.GENERAL_FAILURE),  # wrong version
        (b"\x05\x04\x00\x01" + bytes(6), Reply.COMMAND_NOT_SUPPORTED),
        (b"\x05\x00\x00\x01" + bytes(6), Reply.COMMAND_NOT_SUPPORTED),
        (b"\x05\x01\x00\x02" + bytes(6), Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x05" + bytes(6), Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x03\x00\x00\x50", Reply.HOST_UNREACHABLE),  # empty name
        (b"\x05\x01\x00\x03\x03a b\x00\x50", Reply.HOST_UNREACHABLE),
        (b"\x05\x01\x00\x03\x02.a\x00\x50", Reply.HOST_UNREACHABLE),
        (b"\x05\x01\x00\x03\x03\xc3\xa9x\x00\x50", Reply.HOST_UNREACHABLE),
    ],
)
def test_bad_requests_get_the_rfc_reply(request_bytes: bytes, reply_code: Reply) -> None:
    error = refusal(ServerConnection(), GREET_NOAUTH + request_bytes)
    assert error.reply == socks5_reply(reply_code)


def test_first_byte_decides() -> None:
    assert refusal(ServerConnection(), b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00").reply == b"\x00\x5b" + bytes(
        6
    )
    tls = refusal(ServerConnection(), b"\x16\x03\x01")
    assert tls.reply == b"" and "TLS" in str(tls)
    junk = refusal(ServerConnection(), b"\x00")
    assert junk.reply == b"" and "0x00" in str(junk)
    assert refusal(ServerConnection(), b"get / HTTP/1.1\r\n\r\n").reply == b""


def test_eof_in_the_middle_is_a_protocol_error() -> None:
    conn = ServerConnection()
    conn.receive_data(b"\x05\x01")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match="closed"):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.next_event()


def test_misuse_raises_local_errors() -> None:
    conn = ServerConnection()
    with pytest.raises(LocalProtocolError):
        conn.reply(Reply.SUCCEEDED)
    feed(conn, GREET_NOAUTH + connect_v4())
    conn.reply(Reply.SUCCEEDED)
    with pytest.raises(LocalProtocolError):
        conn.reply(Reply.SUCCEEDED)
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")


def test_buffer_bound() -> None:
    conn = ServerConnection()
    feed(conn, GREET_NOAUTH + connect_v4())
    conn.receive_data(b"x" * (MAX_BUFFER - 10))
    with pytest.raises(ProtocolError, match="more than"):
        conn.receive_data(b"y" * 11)
    assert conn.buffered == 0


def test_credentials_validation() -> None:
    with pytest.raises(ValueError):
        Credentials("", "x")
    with pytest.raises(ValueError):
        Credentials("a:b", "x")
    with pytest.raises(ValueError):
        Credentials("a", "p" * 256)


# -- HTTP CONNECT ----------------------------------------------------------------------------------------


def test_http_connect() -> None:
    conn = ServerConnection()
    request = feed(conn, b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\nHELLO")
    assert request == Request(Flavor.HTTP, Command.CONNECT, "example.test", 443, AddressType.DOMAIN)
    assert conn.reply(Reply.SUCCEEDED) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert conn.trailing_data() == b"HELLO"


def test_http_connect_addresses_and_bare_lf() -> None:
    v6 = feed(ServerConnection(), b"CONNECT [fd00::1]:22 HTTP/1.0\n\n")
    assert (v6.host, v6.port, v6.address_type) == ("fd00::1", 22, AddressType.IPV6)
    v4 = feed(ServerConnection(), b"CONNECT 10.0.0.1:80 HTTP/1.1\r\n\r\n")
    assert v4.address_type is AddressType.IPV4


def test_http_connect_failure_reply() -> None:
    conn = ServerConnection()
    feed(conn, b"CONNECT h:2 HTTP/1.1\r\n\r\n")
    assert conn.reply(Reply.CONNECTION_REFUSED) == http_reply(Reply.CONNECTION_REFUSED, "h:2")
    assert conn.state == "closed"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET http://x/ HTTP/1.1\r\n\r\n", b"501"),
        (b"CONNECT x HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT x:0 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT x:65536 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT x:+80 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT ::1:80 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT [zz]:80 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT [::1]80 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT 999.1.1.1:80 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT x:80 HTTP/2.0\r\n\r\n", b"400"),
        (b"CONNECT  x:80 HTTP/1.1\r\n\r\n", b"400"),
        (b"CONNECT x:80 HTTP/1.1\r\nbad header\r\n\r\n", b"400"),
        (b"CONNECT x:80 HTTP/1.1\r\n folded: x\r\n\r\n", b"400"),
        (b"CONNECT x:80 HTTP/1.1\r\n" + b"A: b\r\n" * 101 + b"\r\n", b"400"),
    ],
)
def test_http_bad_requests(head: bytes, status: bytes) -> None:
    error = refusal(ServerConnection(), head)
    assert error.reply.startswith(b"HTTP/1.1 " + status + b" ")
    assert b"Connection: close" in error.reply


def test_http_head_too_large() -> None:
    conn = ServerConnection()
    conn.receive_data(b"CONNECT x:80 HTTP/1.1\r\n")
    assert conn.next_event() is NEED_DATA
    error = refusal(conn, b"X-Pad: " + b"a" * MAX_HTTP_HEAD + b"\r\n")
    assert error.reply.startswith(b"HTTP/1.1 431 ")


def basic(user: str, password: str) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()) + b"\r\n"


def test_http_proxy_authorization() -> None:
    request = feed(ServerConnection(CREDS), b"CONNECT x:80 HTTP/1.1\r\n" + basic("alice", "s3cret") + b"\r\n")
    assert request.username == "alice"
    for header in (
        b"",
        basic("alice", "nope"),
        basic("bob", "s3cret"),
        b"Proxy-Authorization: Bearer abc\r\n",
        b"Proxy-Authorization: Basic !!!\r\n",
        b"Proxy-Authorization: Basic " + base64.b64encode(b"alices3cret") + b"\r\n",
    ):
        error = refusal(ServerConnection(CREDS), b"CONNECT x:80 HTTP/1.1\r\n" + header + b"\r\n")
        assert error.reply.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
        assert b'Proxy-Authenticate: Basic realm="x2ssh"\r\n' in error.reply
    twice = b"CONNECT x:80 HTTP/1.1\r\n" + basic("alice", "s3cret") * 2 + b"\r\n"
    assert refusal(ServerConnection(CREDS), twice).reply.startswith(b"HTTP/1.1 400 ")


def test_http_authorization_ignored_without_credentials() -> None:
    request = feed(ServerConnection(), b"CONNECT x:80 HTTP/1.1\r\n" + basic("a", "b") + b"\r\n")
    assert request.username is None


# -- UDP datagrams ---------------------------------------------------------------------------------------


def test_udp_datagram_round_trip() -> None:
    for host, port in (("127.0.0.1", 7), ("fd00::7", 53), ("echo.test", 9)):
        packed = build_udp_datagram(host, port, b"payload")
        parsed = parse_udp_datagram(packed)
        assert (parsed.host, parsed.port, parsed.payload) == (host, port, b"payload")
    assert build_udp_datagram("10.1.2.3", 53, b"q") == b"\x00\x00\x00\x01\x0a\x01\x02\x03\x00\x35q"


def test_udp_datagram_drops() -> None:
    with pytest.raises(ProtocolError, match="FRAG=1"):
        parse_udp_datagram(b"\x00\x00\x01\x01\x7f\x00\x00\x01\x00\x07x")
    for junk in (
        b"",
        b"\x00\x00\x00",
        b"\x00\x00\x00\x01\x7f",
        b"\x00\x00\x00\x09abcdef",
        b"\x00\x00\x00\x03\x05ab",
    ):
        with pytest.raises(ProtocolError):
            parse_udp_datagram(junk)
    assert parse_udp_datagram(b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x07").payload == b""


def test_a_request_builds_no_reply_and_calls_no_enum(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing a CONNECT makes no error reply in advance and looks its command up without `Command(n)` (both
    were per-request Python calls on the proxy's new-connection path); the request is as before."""
    from x2ssh.frontends import socks_protocol

    made: list[object] = []
    monkeypatch.setattr(socks_protocol, "socks5_reply", lambda *a: made.append(a) or b"")
    real_call = type(Command).__call__

    def counting(cls: type, *args: object, **kwargs: object) -> object:
        if cls is Command:
            made.append(args)
        return real_call(cls, *args, **kwargs)

    monkeypatch.setattr(type(Command), "__call__", counting)
    for command_byte, command in ((1, Command.CONNECT), (2, Command.BIND), (3, Command.UDP_ASSOCIATE)):
        request = feed(ServerConnection(), GREET_NOAUTH + b"\x05" + bytes((command_byte,)) + connect_v4()[2:])
        assert request.command is command
        assert (request.host, request.port, request.address_type) == ("127.0.0.1", 80, AddressType.IPV4)
    assert made == []


@pytest.mark.parametrize("credentials", [None, Credentials("u", "p")], ids=["no-auth", "user-pass"])
def test_the_usual_greeting_and_ipv4_connect_skip_the_parser_loop_with_the_same_outcome(
    monkeypatch: pytest.MonkeyPatch, credentials: Credentials | None
) -> None:
    greeting = b"\x05\x01\x02" if credentials else b"\x05\x01\x00"
    auth = b"\x01\x01u\x01p" if credentials else b""
    request = b"\x05\x01\x00\x01\xc6\x12\x00\x01\x01\xbb"  # CONNECT 198.18.0.1:443
    slow = ServerConnection(credentials)
    for byte in greeting + auth + request:  # byte by byte: always the full parser
        slow.receive_data(bytes([byte]))
    expected_out, expected_event = slow.data_to_send(), slow.next_event()

    fast = ServerConnection(credentials)
    calls: list[str] = []
    real_advance = ServerConnection._advance
    monkeypatch.setattr(
        ServerConnection, "_advance", lambda self: calls.append(self.state) or real_advance(self)
    )
    for message in (greeting, auth, request):
        if message:
            fast.receive_data(message)
    assert fast.data_to_send() == expected_out
    assert (
        fast.next_event()
        == expected_event
        == Request(
            Flavor.SOCKS5, Command.CONNECT, "198.18.0.1", 443, AddressType.IPV4, "u" if credentials else None
        )
    )
    assert fast.state == slow.state == "await reply"
    # the no-auth greeting and the IPv4 CONNECT, each in its own read, took the short path; the
    # username/password greeting and sub-negotiation the parser
    assert calls == (["start", "auth"] if credentials else [])


@pytest.mark.parametrize(
    "message",
    [
        b"\x05\x01\x00\x01\xc6\x12\x00",
        b"\x05\x02\x00\x01\xc6\x12\x00\x01\x01\xbb",
        b"\x05\x01\x00\x03\x01a\x00\x50",
    ],
    ids=["short", "bind", "domain"],
)
def test_other_requests_take_the_full_parser(message: bytes) -> None:
    conn = ServerConnection()
    conn.receive_data(b"\x05\x01\x00")
    conn.receive_data(message)
    event = conn.next_event()
    if message.startswith(b"\x05\x02"):
        assert isinstance(event, Request) and event.command is Command.BIND
    elif len(message) == 7:
        assert event is NEED_DATA and conn.buffered == 7
    else:
        assert isinstance(event, Request) and event.host == "a" and event.port == 80
