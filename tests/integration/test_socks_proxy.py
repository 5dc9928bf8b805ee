"""The proxy port for real, without namespaces: `SocksServer` on 127.0.0.1 over a real asyncssh connection to
a real OpenSSH sshd on 127.0.0.1, driven by curl (SOCKS5, SOCKS5 with remote names, HTTP CONNECT) and by
small raw clients written here, against an HTTP server, a TCP echo and a UDP echo on loopback.

Names are resolved by a stub resolver injected into the backend (the session's real one asks the server's
resolver through the agent or DNS over TCP). UDP goes through `LocalUdpAgent`, which does on this machine
what the agent does on the server (one UDP socket per flow, replies with their source): the end-to-end UDP
test through the real agent comes with the wiring into the session. Needs root only for sshd.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import http.server
import os
import socket
import socketserver
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from x2ssh.frontends.socks import NameNotFound, ProxyBindRefused, SocksServer, SshChannelBackend
from x2ssh.frontends.socks_protocol import Credentials, build_udp_datagram, parse_udp_datagram

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"), reason="needs root (for sshd) and OpenSSH sshd"
)

WAIT = 60.0
BIG = 50 * 1024 * 1024
NAMES = {"target.lab.test": ["127.0.0.1"], "six.lab.test": ["::1"], "down.lab.test": ["127.0.0.1"]}
CURL_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


# -- targets on loopback ---------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """HTTP on 127.0.0.1 and ::1 serving small.txt and big.bin (50 MiB of random bytes)."""
    root = tmp_path_factory.mktemp("www")
    (root / "small.txt").write_bytes(b"hello through the proxy\n")
    big = os.urandom(BIG)
    (root / "big.bin").write_bytes(big)
    handler = lambda *a: _QuietHandler(*a, directory=str(root))  # noqa: E731
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler), _V6Server(("::1", 0), handler)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {
        "v4": servers[0].server_address[1],
        "v6": servers[1].server_address[1],
        "big_sha": hashlib.sha256(big).hexdigest(),
    }
    for server in servers:
        server.shutdown()
        server.server_close()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture(scope="module")
def tcp_echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def udp_echo() -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                data, addr = sock.recvfrom(65535)
                sock.sendto(data, addr)

    threading.Thread(target=serve, daemon=True).start()
    yield sock.getsockname()[1]
    sock.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once closed


# -- the proxy, on an event loop of its own ---------------------------------------------------------------


class LocalUdpAgent:
    """Stands in for the agent: a UDP socket per (association, destination), replies with their source."""

    def __init__(self, deliver: Callable[[tuple[str, int], tuple[str, int], bytes], None]) -> None:
        self._deliver = deliver
        self._flows: dict[tuple[Any, Any], asyncio.DatagramTransport] = {}
        self.sent: list[tuple[tuple[str, int], tuple[str, int], bytes]] = []

    def send(self, src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
        self.sent.append((src, dst, payload))
        transport = self._flows.get((src, dst))
        if transport is not None:
            transport.sendto(payload)
            return
        agent = self

        class Flow(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
                agent._deliver((addr[0], addr[1]), src, data)

        async def open_flow() -> None:
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(Flow, remote_addr=dst)
            self._flows[(src, dst)] = transport
            transport.sendto(payload)

        asyncio.get_running_loop().create_task(open_flow())

    def close(self) -> None:
        for transport in self._flows.values():
            transport.close()


class Proxy:
    """asyncssh connection + SocksServer on a background event loop; tests call `run()` from their thread."""

    def __init__(self, sshd: Any) -> None:
        self.sshd = sshd
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, context: self.loop_errors.append(context))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.lookups: list[str] = []
        self.conn: asyncssh.SSHClientConnection | None = None
        self.servers: list[SocksServer] = []
        self.agents: dict[int, LocalUdpAgent] = {}  # by proxy port
        self.run(self.reconnect())

    def run(self, coro: Any, timeout: float = WAIT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def reconnect(self) -> None:
        self.conn = await asyncssh.connect("127.0.0.1", **self.sshd.asyncssh_options())

    async def connection(self) -> asyncssh.SSHClientConnection:
        if self.conn is None or self.conn.is_closed():
            raise ConnectionError("no SSH connection")
        return self.conn

    async def resolve(self, name: str) -> list[str]:
        self.lookups.append(name)
        if name not in NAMES:
            raise NameNotFound(name)
        return NAMES[name]

    def start(self, host: str = "127.0.0.1", **kwargs: Any) -> SocksServer:
        async def go() -> SocksServer:
            agent = LocalUdpAgent(lambda src, dst, payload: server.udp_from_remote(src, dst, payload))
            backend = SshChannelBackend(self.connection, self.resolve, agent.send)
            server = SocksServer(backend, host, 0, **kwargs)
            await server.start()
            self.agents[server.addresses[0][1]] = agent
            return server

        server = self.run(go())
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            self.run(server.close())
        for agent in self.agents.values():
            self.loop.call_soon_threadsafe(agent.close)
        if self.conn is not None:
            self.conn.close()
            self.run(self.conn.wait_closed())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from benchmarks.sshd import SshServer

    with SshServer(tmp_path_factory.mktemp("sshd"), host="127.0.0.1", port=0) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(sshd: Any) -> Iterator[Proxy]:
    harness = Proxy(sshd)
    try:
        yield harness
    finally:
        harness.close()
    assert not harness.loop_errors, harness.loop_errors  # e.g. "exception was never retrieved"


@pytest.fixture(scope="module")
def port(proxy: Proxy) -> int:
    return proxy.start().addresses[0][1]


def curl(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", str(int(timeout)), *args],
        capture_output=True,
        env=CURL_ENV,
        timeout=timeout + 10,
    )


# -- a tiny SOCKS5 client --------------------------------------------------------------------------------


def socks_request(
    port: int, command: int, address: bytes, auth: tuple[bytes, bytes] | None = None
) -> socket.socket:
    """Handshake and send a request (ATYP+ADDR+PORT given raw); returns the socket before the reply."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    method = 2 if auth else 0
    sock.sendall(bytes((5, 1, method)))
    assert sock.recv(2) == bytes((5, method))
    if auth:
        sock.sendall(bytes((1, len(auth[0]))) + auth[0] + bytes((len(auth[1]),)) + auth[1])
        assert sock.recv(2) == b"\x01\x00"
    sock.sendall(bytes((5, command, 0)) + address)
    return sock


def read_reply(sock: socket.socket) -> tuple[int, str, int]:
    head = recv_exact(sock, 4)
    assert head[0] == 5
    if head[3] == 1:
        host, size = socket.inet_ntop(socket.AF_INET, recv_exact(sock, 4)), 0
    elif head[3] == 4:
        host, size = socket.inet_ntop(socket.AF_INET6, recv_exact(sock, 16)), 0
    else:
        size = recv_exact(sock, 1)[0]
        host = recv_exact(sock, size).decode()
    (bound_port,) = struct.unpack("!H", recv_exact(sock, 2))
    return head[1], host, bound_port


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def ipv4(host: str, port: int) -> bytes:
    return b"\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def domain(name: str, port: int) -> bytes:
    return b"\x03" + bytes((len(name),)) + name.encode() + struct.pack("!H", port)


# -- TCP -------------------------------------------------------------------------------------------------


def test_curl_socks5_to_ipv4(port: int, web: dict[str, Any]) -> None:
    done = curl("--socks5", f"127.0.0.1:{port}", f"http://127.0.0.1:{web['v4']}/small.txt")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello through the proxy\n"


def test_curl_socks5_to_ipv6(port: int, web: dict[str, Any]) -> None:
    done = curl("--socks5", f"127.0.0.1:{port}", f"http://[::1]:{web['v6']}/small.txt")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello through the proxy\n"


def test_curl_socks5_hostname_resolved_by_the_backend(
    proxy: Proxy, sshd: Any, port: int, web: dict[str, Any]
) -> None:
    """The name reaches the backend's resolver, never sshd: the channel opens to the address."""
    proxy.lookups.clear()
    done = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://target.lab.test:{web['v4']}/small.txt")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello through the proxy\n"
    assert proxy.lookups == ["target.lab.test"]
    six = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://six.lab.test:{web['v6']}/small.txt")
    assert six.returncode == 0 and six.stdout == b"hello through the proxy\n", six.stderr
    # sshd names what it failed to connect to: the address, never the name.
    dead = closed_port()
    with socks_request(port, 1, domain("down.lab.test", dead)) as sock:
        assert read_reply(sock)[0] == 0x05
    assert f"connect_to 127.0.0.1 port {dead}: failed." in sshd.log_text()
    assert "lab.test" not in sshd.log_text()


def test_unknown_name_is_host_unreachable(port: int, web: dict[str, Any]) -> None:
    done = curl("--socks5-hostname", f"127.0.0.1:{port}", f"http://nowhere.lab.test:{web['v4']}/")
    assert done.returncode == 97, (done.returncode, done.stderr)
    with socks_request(port, 1, domain("nowhere.lab.test", 80)) as sock:
        assert read_reply(sock)[0] == 0x04
        assert sock.recv(1) == b""  # closed after the error reply


def test_curl_http_connect(port: int, web: dict[str, Any]) -> None:
    url = f"http://target.lab.test:{web['v4']}/small.txt"
    done = curl("--proxytunnel", "-x", f"http://127.0.0.1:{port}", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"hello through the proxy\n"
    refused = curl("--proxytunnel", "-x", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{closed_port()}/")
    assert refused.returncode != 0
    assert b"502" in refused.stderr


def test_fifty_megabytes_byte_exact(port: int, web: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "big.bin"
    done = curl("--socks5", f"127.0.0.1:{port}", f"http://127.0.0.1:{web['v4']}/big.bin", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size == BIG
    assert hashlib.sha256(out.read_bytes()).hexdigest() == web["big_sha"]
    out.unlink()
    done = curl(
        "--proxytunnel", "-x", f"http://127.0.0.1:{port}", f"http://[::1]:{web['v6']}/big.bin", "-o", str(out)
    )
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == web["big_sha"]


def test_echo_both_ways_with_half_close(port: int, tcp_echo: int) -> None:
    """16 MiB up and back through a TCP echo while both directions are busy; FIN travels both ways."""
    payload = os.urandom(16 * 1024 * 1024)
    with socks_request(port, 1, ipv4("127.0.0.1", tcp_echo)) as sock:
        assert read_reply(sock)[0] == 0
        received = bytearray()

        def reader() -> None:
            while chunk := sock.recv(1 << 20):
                received.extend(chunk)

        thread = threading.Thread(target=reader)
        thread.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        thread.join(WAIT)
    assert not thread.is_alive()
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_data_sent_with_the_request_is_not_lost(port: int, tcp_echo: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    with sock:
        sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00" + ipv4("127.0.0.1", tcp_echo) + b"early bytes")
        assert recv_exact(sock, 2) == b"\x05\x00"
        assert read_reply(sock)[0] == 0
        assert recv_exact(sock, 11) == b"early bytes"


def test_closed_port_is_connection_refused_at_once(port: int) -> None:
    dead = closed_port()
    with socks_request(port, 1, ipv4("127.0.0.1", dead)) as sock:
        assert read_reply(sock)[0] == 0x05
    done = curl("--socks5", f"127.0.0.1:{port}", f"http://127.0.0.1:{dead}/")
    assert done.returncode == 97, (done.returncode, done.stderr)
    assert done.stderr.rstrip().endswith(b"(5)")  # curl prints the SOCKS5 reply code


def test_bind_is_not_supported(port: int) -> None:
    with socks_request(port, 2, ipv4("127.0.0.1", 21)) as sock:
        assert read_reply(sock)[0] == 0x07
        assert sock.recv(1) == b""


def test_malformed_clients_are_answered_and_closed_others_unaffected(port: int, web: dict[str, Any]) -> None:
    cases = [
        (b"\x05\x01\x00\x05\x09\x00\x01\x00\x00\x00\x00\x00\x00", b"\x05\x00\x05\x07"),  # bad command
        (b"\x05\x01\x00\x05\x01\x00\x07", b"\x05\x00\x05\x08"),  # bad address type
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b"\x00\x5b"),  # SOCKS4
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 501 "),
        (b"CONNECT nope HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 "),
        (b"\x16\x03\x01\x00\x05hello", b""),  # TLS to the proxy port
        (b"CONNECT x:1 HTTP/1.1\r\n" + b"X: " + b"a" * 20000, b"HTTP/1.1 431 "),
    ]
    lingering = socket.create_connection(("127.0.0.1", port), timeout=WAIT)  # half a greeting, kept open
    lingering.sendall(b"\x05")
    try:
        for data, expected in cases:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    sock.sendall(data)
                answer = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := sock.recv(65536):
                        answer += chunk
                assert answer.startswith(expected), (data[:20], answer[:40])
        done = curl("--socks5", f"127.0.0.1:{port}", f"http://127.0.0.1:{web['v4']}/small.txt")
        assert done.returncode == 0 and done.stdout == b"hello through the proxy\n", done.stderr
    finally:
        lingering.close()


def test_username_password(proxy: Proxy, web: dict[str, Any]) -> None:
    server = proxy.start(credentials=Credentials("alice", "s3cret"))
    authed = server.addresses[0][1]
    url = f"http://127.0.0.1:{web['v4']}/small.txt"
    ok = curl("--socks5", f"127.0.0.1:{authed}", "--proxy-user", "alice:s3cret", url)
    assert ok.returncode == 0 and ok.stdout == b"hello through the proxy\n", ok.stderr
    wrong = curl("--socks5", f"127.0.0.1:{authed}", "--proxy-user", "alice:nope", url)
    assert wrong.returncode == 97
    anonymous = curl("--socks5", f"127.0.0.1:{authed}", url)
    assert anonymous.returncode == 97
    http_ok = curl("--proxytunnel", "-x", f"http://alice:s3cret@127.0.0.1:{authed}", url)
    assert http_ok.returncode == 0 and http_ok.stdout == b"hello through the proxy\n", http_ok.stderr
    http_anonymous = curl("--proxytunnel", "-x", f"http://127.0.0.1:{authed}", url)
    assert http_anonymous.returncode != 0 and b"407" in http_anonymous.stderr


def test_non_loopback_bind_needs_credentials_or_allow_lan(proxy: Proxy) -> None:
    with pytest.raises(ProxyBindRefused, match="--allow-lan"):
        proxy.start(host="0.0.0.0")
    with pytest.raises(ProxyBindRefused):
        proxy.start(host="")
    assert proxy.start(host="0.0.0.0", credentials=Credentials("u", "p")).addresses
    assert proxy.start(host="0.0.0.0", allow_lan=True).addresses


# -- UDP ASSOCIATE ---------------------------------------------------------------------------------------


def test_udp_associate_round_trip(proxy: Proxy, port: int, udp_echo: int) -> None:
    control = socks_request(port, 3, ipv4("0.0.0.0", 0))
    with control:
        code, relay_host, relay_port = read_reply(control)
        assert code == 0 and relay_host == "127.0.0.1" and relay_port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(WAIT)
            # Not 0 bytes: the stand-in agent uses asyncio, whose sendto() drops b"" on Python 3.11.
            for size in (1, 512, 1400, 8000, 60000):
                payload = os.urandom(size)
                udp.sendto(build_udp_datagram("127.0.0.1", udp_echo, payload), (relay_host, relay_port))
                answer = parse_udp_datagram(udp.recv(65535))
                assert (answer.host, answer.port, answer.payload) == ("127.0.0.1", udp_echo, payload)
            udp.sendto(build_udp_datagram("target.lab.test", udp_echo, b"by name"), (relay_host, relay_port))
            answer = parse_udp_datagram(udp.recv(65535))
            assert (answer.host, answer.payload) == ("127.0.0.1", b"by name")
            # A fragment is dropped (nothing reaches the echo); the next datagram still works.
            sent_before = len(proxy.agents[port].sent)
            fragment = b"\x00\x00\x01" + build_udp_datagram("127.0.0.1", udp_echo, b"frag")[3:]
            udp.sendto(fragment, (relay_host, relay_port))
            udp.sendto(build_udp_datagram("127.0.0.1", udp_echo, b"after"), (relay_host, relay_port))
            assert parse_udp_datagram(udp.recv(65535)).payload == b"after"
            assert [p for _, _, p in proxy.agents[port].sent[sent_before:]] == [b"after"]
    # The association ends with its control connection: the relay port is closed.
    key = ("127.0.0.1", relay_port)

    async def gone() -> bool:
        for _ in range(200):
            if all(s._associations.get(key) is None for s in proxy.servers):
                return True
            await asyncio.sleep(0.05)
        return False

    assert proxy.run(gone())


def test_udp_from_a_stranger_is_dropped(port: int, udp_echo: int) -> None:
    with socks_request(port, 3, ipv4("0.0.0.0", 0)) as control:
        _, relay_host, relay_port = read_reply(control)
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as second,
        ):
            first.settimeout(WAIT)
            second.settimeout(0.5)
            first.sendto(build_udp_datagram("127.0.0.1", udp_echo, b"mine"), (relay_host, relay_port))
            assert parse_udp_datagram(first.recv(65535)).payload == b"mine"
            second.sendto(build_udp_datagram("127.0.0.1", udp_echo, b"theirs"), (relay_host, relay_port))
            with pytest.raises(TimeoutError):
                second.recv(65535)


# -- the SSH connection goes away and comes back --------------------------------------------------------


def test_ssh_connection_lost_then_back(proxy: Proxy, port: int, web: dict[str, Any]) -> None:
    url = f"http://127.0.0.1:{web['v4']}/small.txt"
    assert proxy.conn is not None
    proxy.loop.call_soon_threadsafe(proxy.conn.abort)
    proxy.run(proxy.conn.wait_closed())
    with socks_request(port, 1, ipv4("127.0.0.1", web["v4"])) as sock:
        assert read_reply(sock)[0] == 0x01  # general failure while there is no connection
    proxy.run(proxy.reconnect())
    done = curl("--socks5", f"127.0.0.1:{port}", url)
    assert done.returncode == 0 and done.stdout == b"hello through the proxy\n", done.stderr


def test_many_parallel_clients(port: int, web: dict[str, Any]) -> None:
    url = f"http://127.0.0.1:{web['v4']}/small.txt"
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: curl("--socks5", f"127.0.0.1:{port}", url), range(64)))
    assert all(r.returncode == 0 and r.stdout == b"hello through the proxy\n" for r in results)
