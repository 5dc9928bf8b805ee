"""The UDP agent for real: first as a local process spoken to over its Unix socket (under the oldest
Python found, ideally 3.8), then deployed through a real OpenSSH sshd on 127.0.0.1 with `deploy_agent`
and driven through `UdpRelay`, against local UDP echo servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import protocol as p
from agent.zipapp import build_zipapp

WAIT = 20.0  # upper bound for anything to happen; tests poll and never sleep for a fixed time


@functools.cache
def oldest_python() -> str:
    """A Python 3.8 if one runs here (servers still have it), else this interpreter."""
    candidates = [str(path) for path in sorted(Path.home().glob(".pyenv/versions/3.8.*/bin/python3.8"))]
    candidates += [found for found in (shutil.which("python3.8"),) if found]
    for candidate in candidates:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run(
                [candidate, "-I", "-c", "import sys; print(sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=WAIT,
            )
            if probe.stdout.strip() == "(3, 8)":
                return candidate
    return sys.executable


def wait_until(predicate, timeout: float = WAIT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class UdpEcho:
    """A UDP echo server on loopback; with `other_port`, it answers from a second socket."""

    def __init__(self, host: str = "127.0.0.1", other_port: bool = False, port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.1)
        self.reply_sock = socket.socket(family, socket.SOCK_DGRAM) if other_port else self.sock
        if other_port:
            self.reply_sock.bind((host, 0))
        self.address = self.sock.getsockname()[:2]
        self.reply_address = self.reply_sock.getsockname()[:2]
        self.answered = 0
        self.peers: list = []  # source address of every datagram answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.answered += 1
            self.peers.append(peer)  # before the answer: a test that got the answer may look at once
            self.reply_sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
        self.reply_sock.close()


@pytest.fixture
def echo() -> Iterator[UdpEcho]:
    server = UdpEcho()
    yield server
    server.close()


# --- the agent as a local process ---------------------------------------------------------------------


class LocalAgent:
    """The zipapp run directly (no SSH): stdin pipe = the session, its socket reached directly."""

    def __init__(self, root: Path, *args: str) -> None:
        self.directory = root / f".x2ssh-agent-{secrets.token_hex(4)}"
        self.directory.mkdir(mode=0o700)
        self.zipapp = self.directory / "agent.pyz"
        self.zipapp.write_bytes(build_zipapp())
        self.token = secrets.token_bytes(p.TOKEN_SIZE)
        self.proc = subprocess.Popen(
            [oldest_python(), "-I", str(self.zipapp), "--dir", str(self.directory), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.proc.stdin.write(self.token.hex().encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().decode()
        assert line.startswith("X2SSH-AGENT READY "), (line, self.stderr())
        self.socket_path = line.split(" ", 2)[2].strip()
        self._stderr = ""

    def connect(self, hello: bool = True, version: int = 1) -> Conn:
        conn = Conn(self.socket_path)
        if hello:
            conn.send(p.Hello(1, version, self.token))
            welcome = conn.expect(p.Welcome)
            assert welcome.version == version
        return conn

    def wait_exit(self) -> int:
        return self.proc.wait(timeout=WAIT)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self._stderr + self.proc.stderr.read().decode(errors="replace")

    def stderr_so_far(self) -> str:
        """What the running agent logged until now (non-blocking)."""
        import fcntl

        fd = self.proc.stderr.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        with contextlib.suppress(BlockingIOError, TypeError):
            chunk = self.proc.stderr.read()
            if chunk:
                self._stderr += chunk.decode(errors="replace")
        return self._stderr

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class Conn:
    """A blocking client connection speaking frames."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)
        self.decoder = p.Decoder()
        self.frames: list[p.Frame] = []

    def send(self, frame: p.Frame) -> None:
        self.sock.sendall(p.encode(frame))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def next(self) -> p.Frame | None:
        """The next frame, or None at end of stream."""
        while not self.frames:
            data = self.sock.recv(262144)
            if not data:
                self.decoder.eof()
                return None
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    def expect(self, kind: type) -> p.Frame:
        frame = self.next()
        assert isinstance(frame, kind), frame
        return frame

    def at_eof(self) -> bool:
        return self.next() is None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def local_agent(tmp_path: Path, request) -> Iterator[LocalAgent]:
    args = getattr(request, "param", ())
    agent = LocalAgent(tmp_path, *args)
    yield agent
    agent.stop()


def test_local_agent_echo_and_replies_only_from_the_destination(local_agent: LocalAgent) -> None:
    plain, other = UdpEcho(), UdpEcho(other_port=True)
    try:
        conn = local_agent.connect()
        conn.send(p.OpenFlow(1, plain.address))
        conn.send(p.OpenFlow(2, other.address))
        for size in (0, 1, 1400, 65000):
            payload = secrets.token_bytes(size)
            conn.send(p.Datagram(1, None, payload))
            assert conn.expect(p.Datagram) == p.Datagram(1, plain.address, payload)
        # The flow's socket is connected: an answer from another port is not the destination's (anyone
        # could send it), so it never reaches the client. The keepalive reply comes first and alone.
        conn.send(p.Datagram(2, None, b"answer me from elsewhere"))
        wait_until(lambda: other.answered, what="the echo server to answer from its other port")
        conn.send(p.Keepalive(76, False))
        assert conn.expect(p.Keepalive) == p.Keepalive(76, True)
        conn.send(p.Keepalive(77, False))
        assert conn.expect(p.Keepalive) == p.Keepalive(77, True)
        conn.send(p.Goodbye())
        assert conn.at_eof()
        assert local_agent.wait_exit() == 0
        assert not local_agent.directory.exists(), "agent left its directory behind"
    finally:
        plain.close()
        other.close()


def test_a_burst_of_replies_arrives_whole_and_in_order(local_agent: LocalAgent) -> None:
    # The agent reads a burst from a flow's socket in batches and queues each batch as one buffer: the
    # frames must come out intact, in order and each with the destination as its peer.
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(WAIT)
    try:
        address = peer.getsockname()[:2]
        conn = local_agent.connect()
        conn.send(p.OpenFlow(1, address))
        conn.send(p.Datagram(1, None, b"where are you"))
        data, agent_side = peer.recvfrom(65535)
        assert data == b"where are you"
        payloads = [i.to_bytes(2, "big") * 500 for i in range(64)]  # fits the socket's default buffer
        for payload in payloads:
            peer.sendto(payload, agent_side)
        assert [conn.expect(p.Datagram) for _ in payloads] == [p.Datagram(1, address, x) for x in payloads]
        conn.send(p.Goodbye())
        assert conn.at_eof()
    finally:
        peer.close()


def test_a_burst_from_the_client_leaves_as_separate_datagrams_in_order(local_agent: LocalAgent) -> None:
    # Datagrams of one client read go out at the end of the agent's loop turn, runs of one size as one
    # segmented send where the kernel offers it: the destination must still see each datagram as sent.
    sizes = [1400] * 100 + [700] + [1400] * 3 + [0] + [3000] + [100] * 5 + [99] + [1452] * 70 + [1453]
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(WAIT)
    try:
        conn = local_agent.connect()
        conn.send(p.OpenFlow(1, peer.getsockname()[:2]))
        conn.send_raw(b"".join(p.encode(p.Datagram(1, None, payload)) for payload in payloads))
        assert [peer.recv(65535) for _ in payloads] == payloads
        conn.send(p.Goodbye())
        assert conn.at_eof()
        assert local_agent.wait_exit() == 0
        assert f"sent {len(payloads)} datagrams" in local_agent.stderr()
    finally:
        peer.close()


def test_local_agent_ipv6(local_agent: LocalAgent) -> None:
    try:
        server = UdpEcho("::1")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        conn = local_agent.connect()
        conn.send(p.OpenFlow(5, server.address))
        conn.send(p.Datagram(5, None, b"v6"))
        assert conn.expect(p.Datagram) == p.Datagram(5, ("::1", server.address[1]), b"v6")
    finally:
        server.close()


def test_wrong_token_is_dropped_silently_and_agent_keeps_running(local_agent: LocalAgent) -> None:
    intruder = local_agent.connect(hello=False)
    intruder.send(p.Hello(1, 1, bytes(p.TOKEN_SIZE)))
    assert intruder.at_eof()
    not_hello = local_agent.connect(hello=False)
    not_hello.send(p.Keepalive(1, False))
    assert not_hello.at_eof()
    conn = local_agent.connect()  # the real client still gets in
    conn.send(p.Keepalive(2, False))
    assert conn.expect(p.Keepalive).nonce == 2


def test_unsupported_version_gets_an_error(local_agent: LocalAgent) -> None:
    conn = local_agent.connect(hello=False)
    conn.send(p.Hello(p.MAX_VERSION + 1, p.MAX_VERSION + 2, local_agent.token))
    error = conn.expect(p.Error)
    assert error.code == p.ERR_UNSUPPORTED_VERSION
    assert conn.at_eof()
    assert local_agent.proc.poll() is None


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x00\x00\x00\x99",  # unknown type
        b"\xff\xff\xff\xff\x11",  # oversized
        p.encode(p.OpenFlow(1, ("127.0.0.1", 9)))[:-3] + b"\x00\x00\x00",  # garbled then more frames
        p.encode(p.Hello(1, 1, bytes(32))),  # a second HELLO
    ],
)
def test_malformed_frame_closes_the_connection_not_the_agent(local_agent: LocalAgent, garbage: bytes) -> None:
    conn = local_agent.connect()
    conn.send_raw(garbage + p.encode(p.Keepalive(1, False)))
    error = conn.expect(p.Error)
    assert error.code in (p.ERR_BAD_FRAME, p.ERR_UNEXPECTED_FRAME)
    assert conn.at_eof()
    again = local_agent.connect()  # it survived and accepts the client again
    again.send(p.Keepalive(3, False))
    assert again.expect(p.Keepalive) == p.Keepalive(3, True)


@pytest.mark.parametrize("local_agent", [("--max-flows", "2")], indirect=True)
def test_flow_limit(local_agent: LocalAgent, echo: UdpEcho) -> None:
    conn = local_agent.connect()
    for flow_id in (1, 2, 3):
        conn.send(p.OpenFlow(flow_id, echo.address))
    assert conn.expect(p.CloseFlow) == p.CloseFlow(3, p.CLOSE_LIMIT)
    conn.send(p.CloseFlow(1, p.CLOSE_NORMAL))
    conn.send(p.OpenFlow(4, echo.address))  # room again
    conn.send(p.Datagram(4, None, b"ok"))
    assert conn.expect(p.Datagram).payload == b"ok"


@pytest.mark.parametrize(
    "local_agent", [("--idle-timeout", "0.3", "--dns-idle-timeout", "0.2")], indirect=True
)
def test_idle_flows_expire(local_agent: LocalAgent, echo: UdpEcho) -> None:
    conn = local_agent.connect()
    conn.send(p.OpenFlow(1, echo.address))
    conn.send(p.Datagram(1, None, b"x"))
    assert conn.expect(p.Datagram).payload == b"x"
    assert conn.expect(p.CloseFlow) == p.CloseFlow(1, p.CLOSE_IDLE)
    conn.send(p.Datagram(1, None, b"after close: dropped, not an error"))
    conn.send(p.Keepalive(9, False))
    assert conn.expect(p.Keepalive).nonce == 9


def test_server_resolver_destination(tmp_path: Path) -> None:
    try:
        resolver = UdpEcho("127.0.83.53", port=53)
    except OSError as exc:
        pytest.skip(f"cannot bind a fake resolver on 127.0.83.53:53: {exc}")
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("# test\nsearch lab.test\nnameserver 127.0.83.53\nnameserver 127.0.0.9\n")
    agent = LocalAgent(tmp_path, "--resolv-conf", str(resolv_conf))
    try:
        conn = agent.connect()
        conn.send(p.OpenFlow(1, p.SERVER_RESOLVER))
        conn.send(p.Datagram(1, None, b"dns query"))
        assert conn.expect(p.Datagram) == p.Datagram(1, ("127.0.83.53", 53), b"dns query")
        resolv_conf.unlink()
        conn.send(p.OpenFlow(2, p.SERVER_RESOLVER))
        assert conn.expect(p.CloseFlow) == p.CloseFlow(2, p.CLOSE_NO_RESOLVER)
    finally:
        agent.stop()
        resolver.close()


def test_stdin_eof_means_session_gone(local_agent: LocalAgent) -> None:
    conn = local_agent.connect()
    conn.send(p.OpenFlow(1, ("127.0.0.1", 9)))
    local_agent.proc.stdin.close()
    assert local_agent.wait_exit() == 0
    assert not local_agent.directory.exists()
    assert conn.at_eof()


@pytest.mark.parametrize("local_agent", [("--client-silence-timeout", "1")], indirect=True)
def test_exits_when_its_client_falls_silent(local_agent: LocalAgent) -> None:
    """A silently cut link: sshd keeps the session, nothing arrives; the agent must not linger."""
    conn = local_agent.connect()
    conn.send(p.Keepalive(1, False))
    assert conn.expect(p.Keepalive).is_reply
    assert local_agent.wait_exit() == 0
    assert "client silent" in local_agent.stderr()
    assert not local_agent.directory.exists()


# --- protocol v2 on the local agent (run by the oldest Python found) --------------------------------------


def test_v2_closed_port_is_reported_unreachable(local_agent: LocalAgent) -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: loopback answers with ICMP port unreachable
    conn = local_agent.connect(version=2)
    conn.send(p.OpenFlow(1, ("127.0.0.1", port)))
    conn.send(p.Datagram(1, None, b"hello?"))
    error = conn.expect(p.Unreachable)
    assert (error.flow_id, error.code) == (1, p.UNREACH_PORT)
    assert error.reporter in ("127.0.0.1", None)
    conn.send(p.Keepalive(5, False))  # the flow and the agent carry on
    assert conn.expect(p.Keepalive).nonce == 5


def test_v1_client_gets_no_v2_frames(local_agent: LocalAgent) -> None:
    conn = local_agent.connect(version=1)
    conn.send(p.OpenFlow(1, ("127.0.0.1", 9)))
    conn.send(p.Datagram(1, None, b"to a closed port"))
    conn.send(p.Keepalive(6, False))
    assert conn.expect(p.Keepalive).nonce == 6  # no UNREACHABLE before it
    conn.send(p.OpenEcho(2, "127.0.0.1"))
    error = conn.expect(p.Error)
    assert error.code == p.ERR_UNEXPECTED_FRAME


def test_v2_unknown_flow_and_ping_permission(local_agent: LocalAgent) -> None:
    """Where ping sockets are not allowed (this host's ping_group_range), OPEN_ECHO gets NOT_PERMITTED; where
    they are, real replies come back. Either way no fake reply."""
    conn = local_agent.connect(version=2)
    conn.send(p.OpenEcho(3, "127.0.0.1"))
    conn.send(p.Echo(3, 1, b"ping payload"))
    frame = conn.next()
    if isinstance(frame, p.CloseFlow):
        assert frame == p.CloseFlow(3, p.CLOSE_NOT_PERMITTED)
    else:
        assert frame == p.Echo(3, 1, b"ping payload")


def test_v2_resume_keeps_flows_and_their_port(tmp_path: Path) -> None:
    echo = UdpEcho()
    agent = LocalAgent(tmp_path, "--reattach-grace", "30")
    try:
        first = agent.connect(version=2)
        first.send(p.OpenFlow(1, echo.address))
        first.send(p.Datagram(1, None, b"one"))
        assert first.expect(p.Datagram).payload == b"one"
        first.close()  # lost without GOODBYE
        wait_until(lambda: "keeping its flows" in agent.stderr_so_far(), what="the agent to notice")
        second = agent.connect(version=2)
        second.send(p.Resume())
        second.send(p.Datagram(1, None, b"two"))
        assert second.expect(p.Datagram).payload == b"two"
        assert echo.peers[0] == echo.peers[1], echo.peers
        second.send(p.Datagram(77, None, b"no such flow"))
        assert second.expect(p.CloseFlow) == p.CloseFlow(77, p.CLOSE_UNKNOWN_FLOW)
        second.send(p.Goodbye())
        assert second.at_eof()
        assert agent.wait_exit() == 0
    finally:
        agent.stop()
        echo.close()


def test_v2_resume_takes_over_from_a_stale_connection(local_agent: LocalAgent, echo: UdpEcho) -> None:
    """The old path was cut silently (its connection still looks open): a RESUME with the same token takes
    its flows at once, and the stale connection is closed."""
    stale = local_agent.connect(version=2)
    stale.send(p.OpenFlow(1, echo.address))
    stale.send(p.Datagram(1, None, b"one"))
    assert stale.expect(p.Datagram).payload == b"one"
    fresh = local_agent.connect(version=2)
    fresh.send(p.Resume())
    fresh.send(p.Datagram(1, None, b"two"))
    assert fresh.expect(p.Datagram).payload == b"two"
    assert echo.peers[0] == echo.peers[1]
    assert stale.at_eof()


def test_v2_resume_only_as_the_first_frame(local_agent: LocalAgent) -> None:
    conn = local_agent.connect(version=2)
    conn.send(p.Keepalive(1, False))
    conn.send(p.Resume())
    assert conn.expect(p.Keepalive).nonce == 1
    assert conn.expect(p.Error).code == p.ERR_UNEXPECTED_FRAME


@pytest.mark.parametrize("local_agent", [("--reattach-grace", "0.5")], indirect=True)
def test_v2_agent_exits_when_nobody_reattaches(local_agent: LocalAgent, echo: UdpEcho) -> None:
    conn = local_agent.connect(version=2)
    conn.send(p.OpenFlow(1, echo.address))
    conn.close()
    local_agent.proc.stdin.close()
    assert local_agent.wait_exit() == 0
    assert "no client re-attached" in local_agent.stderr()
    assert not local_agent.directory.exists()


def test_stdio_transport(tmp_path: Path, echo: UdpEcho) -> None:
    """The frames over the agent's own stdin/stdout (what x2ssh does where streamlocal is refused)."""
    agent = LocalAgent(tmp_path)
    try:
        stdin, stdout = agent.proc.stdin, agent.proc.stdout
        decoder = p.Decoder()

        def expect(kind: type) -> p.Frame:
            frames: list = []
            while not frames:
                data = os.read(stdout.fileno(), 65536)
                assert data, agent.stderr()
                frames = decoder.feed(data)
            assert len(frames) == 1 and isinstance(frames[0], kind), frames
            return frames[0]

        stdin.write(p.encode(p.Hello(1, 2, agent.token)))
        stdin.flush()
        assert expect(p.Welcome).version == 2
        stdin.write(p.encode(p.OpenFlow(1, echo.address)) + p.encode(p.Datagram(1, None, b"x" * 60000)))
        stdin.flush()
        assert expect(p.Datagram) == p.Datagram(1, echo.address, b"x" * 60000)
        stdin.write(p.encode(p.Goodbye()))
        stdin.flush()
        assert agent.wait_exit() == 0
        assert not agent.directory.exists()
    finally:
        agent.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signals_clean_up(local_agent: LocalAgent, signum: int) -> None:
    local_agent.connect()
    local_agent.proc.send_signal(signum)
    assert local_agent.wait_exit() == 0
    assert not local_agent.directory.exists()


@pytest.mark.parametrize("local_agent", [("--connect-timeout", "0.5")], indirect=True)
def test_exits_when_no_client_comes(local_agent: LocalAgent) -> None:
    assert local_agent.wait_exit() == 0
    assert "no client connected" in local_agent.stderr()
    assert not local_agent.directory.exists()


def test_refuses_a_directory_others_can_read(tmp_path: Path) -> None:
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o755)
    proc = subprocess.run(
        [oldest_python(), "-m", "agent", "--dir", str(directory)],
        input=secrets.token_hex(32).encode() + b"\n",
        capture_output=True,
        timeout=WAIT,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2
    assert b"X2SSH-AGENT ERROR" in proc.stdout and b"accessible by others" in proc.stdout
    assert directory.exists(), "the agent must not delete a directory that is not its own"


# --- deployed through a real sshd -------------------------------------------------------------------------

needs_sshd = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/sbin/sshd"), reason="needs root and OpenSSH sshd"
)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    from benchmarks.sshd import SshServer

    with SshServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server


async def connect(server):
    import asyncssh

    return await asyncssh.connect(server.host, **server.asyncssh_options())


def agent_processes(directory: str) -> list[int]:
    """PIDs whose command line mentions the agent directory."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if directory.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
    return pids


class AppSide:
    """What the netstack would be: collects datagrams the relay delivers to apps."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[tuple[str, int], tuple[str, int], bytes]] = asyncio.Queue()

    def __call__(self, src, dst, payload) -> None:
        self.queue.put_nowait((src, dst, payload))

    async def get(self):
        return await asyncio.wait_for(self.queue.get(), WAIT)


@needs_sshd
def test_deploy_echo_sizes_and_clean_close(sshd, echo: UdpEcho) -> None:
    from x2ssh.agent_client.deploy import deploy_agent
    from x2ssh.flows.udp_relay import UdpRelay

    async def main() -> str:
        async with await connect(sshd) as conn:
            handle = await deploy_agent(conn)
            assert handle.directory.startswith("/tmp/.x2ssh-agent-")
            assert os.stat(handle.directory).st_mode & 0o777 == 0o700
            assert sorted(os.listdir(handle.directory)) == ["agent.pyz", "agent.sock"]
            app = AppSide()
            relay = UdpRelay(app)
            relay.attach(handle)
            src = ("100.100.83.1", 41000)
            for size in (1, 2, 100, 1400, 1500, 9000, 32768, 65000):
                payload = secrets.token_bytes(size)
                relay.datagram_from_app(src, echo.address, payload)
                assert await app.get() == (echo.address, src, payload), size
            assert relay.stats.datagrams_to_app == 8
            await handle.close()
            assert handle.closed
            return handle.directory

    directory = asyncio.run(asyncio.wait_for(main(), 60))
    assert not os.path.exists(directory), "agent files left after a clean close"
    wait_until(lambda: not agent_processes(directory), what="the agent process to exit")


@needs_sshd
def test_fifty_concurrent_flows(sshd) -> None:
    from x2ssh.agent_client.deploy import deploy_agent
    from x2ssh.flows.udp_relay import UdpRelay

    servers = [UdpEcho(), UdpEcho("127.0.0.2")]

    async def main() -> None:
        async with await connect(sshd) as conn:
            handle = await deploy_agent(conn)
            app = AppSide()
            relay = UdpRelay(app)
            relay.attach(handle)
            expected = set()
            for i in range(50):
                src = ("100.100.83.1", 42000 + i)
                server = servers[i % 2]
                for n in range(4):
                    payload = f"flow {i} datagram {n}".encode() * (i + 1)
                    relay.datagram_from_app(src, server.address, payload)
                    expected.add((server.reply_address, src, payload))
            received = set()
            while len(received) < len(expected):
                received.add(await app.get())
            assert received == expected
            assert relay.flow_count == 50
            assert relay.stats.drops == {}
            await handle.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        for server in servers:
            server.close()


@needs_sshd
def test_agent_exits_by_itself_when_the_ssh_connection_drops(sshd) -> None:
    from x2ssh.agent_client.deploy import AgentSettings, deploy_agent

    async def main() -> str:
        conn = await connect(sshd)
        handle = await deploy_agent(conn, AgentSettings(reattach_grace=1.0))
        assert agent_processes(handle.directory)
        conn.abort()  # no GOODBYE, no channel close: the TCP connection just goes away
        await asyncio.wait_for(handle.wait_closed(), WAIT)
        assert handle.lost
        return handle.directory

    directory = asyncio.run(asyncio.wait_for(main(), 60))
    # Nobody re-attaches within the grace period (1 s here): it exits and removes its files.
    wait_until(lambda: not agent_processes(directory), what="the orphaned agent to exit")
    wait_until(lambda: not os.path.exists(directory), what="the orphaned agent to remove its files")


@needs_sshd
@pytest.mark.parametrize("streamlocal", ["yes", "no"])
def test_reattach_keeps_the_flows_server_side_port(tmp_path: Path, echo: UdpEcho, streamlocal: str) -> None:
    """The SSH connection drops without GOODBYE; a new one re-attaches (same token) and the target sees
    the same source port as before. With streamlocal refused, the agent is first reached over its own
    stdin/stdout, then through the connector."""
    from benchmarks.sshd import SshServer
    from x2ssh.agent_client.deploy import deploy_agent, reattach_agent
    from x2ssh.flows.udp_relay import UdpRelay

    async def main(server) -> None:
        app = AppSide()
        relay = UdpRelay(app)
        src = ("100.100.83.1", 41000)
        conn = await connect(server)
        first = await deploy_agent(conn)
        assert first.transport == ("socket" if streamlocal == "yes" else "stdio")
        relay.attach(first)
        relay.datagram_from_app(src, echo.address, b"before")
        assert await app.get() == (echo.address, src, b"before")
        conn.abort()
        await asyncio.wait_for(first.wait_closed(), WAIT)
        assert first.lost and relay.flow_count == 1
        async with await connect(server) as again:
            second = await reattach_agent(again, first)
            assert second.resumed
            relay.attach(second, resumed=True)
            relay.datagram_from_app(src, echo.address, b"after")
            assert await app.get() == (echo.address, src, b"after")
            await second.close()
        wait_until(lambda: not agent_processes(first.directory), what="the agent to exit after GOODBYE")

    with SshServer(tmp_path / "sshd", extra_config=f"AllowStreamLocalForwarding {streamlocal}") as server:
        asyncio.run(asyncio.wait_for(main(server), 90))
    sources = echo.peers
    assert len(sources) == 2 and sources[0] == sources[1], sources


@needs_sshd
def test_reattach_to_a_gone_agent_is_agent_unavailable(sshd) -> None:
    from x2ssh.agent_client.deploy import AgentSettings, AgentUnavailable, deploy_agent, reattach_agent

    async def main() -> None:
        conn = await connect(sshd)
        first = await deploy_agent(conn, AgentSettings(reattach_grace=0.5))
        conn.abort()
        await asyncio.wait_for(first.wait_closed(), WAIT)
        wait_until(lambda: not agent_processes(first.directory), what="the agent to give up waiting")
        async with await connect(sshd) as again:
            with pytest.raises(AgentUnavailable):
                await reattach_agent(again, first)

    asyncio.run(asyncio.wait_for(main(), 60))


@needs_sshd
def test_stdio_transport_without_streamlocal_forwarding(tmp_path: Path, echo: UdpEcho) -> None:
    """`AllowStreamLocalForwarding no`: the same frames over the exec channel; byte-exact echo."""
    from benchmarks.sshd import SshServer
    from x2ssh.agent_client.deploy import deploy_agent
    from x2ssh.flows.udp_relay import UdpRelay

    async def main(server) -> str:
        async with await connect(server) as conn:
            handle = await deploy_agent(conn)
            assert handle.transport == "stdio"
            app = AppSide()
            relay = UdpRelay(app)
            relay.attach(handle)
            src = ("100.100.83.1", 41000)
            for size in (0, 1, 1400, 65000):
                payload = secrets.token_bytes(size)
                relay.datagram_from_app(src, echo.address, payload)
                assert await app.get() == (echo.address, src, payload), size
            await handle.close()
            return handle.directory

    with SshServer(tmp_path / "sshd", extra_config="AllowStreamLocalForwarding no") as server:
        directory = asyncio.run(asyncio.wait_for(main(server), 60))
        assert "refused" in server.log_text() or "forwarding" in server.log_text().lower()
    assert not os.path.exists(directory), "agent files left after a clean close"


@needs_sshd
def test_stale_directory_of_a_killed_agent_is_removed_by_the_next_deploy(sshd) -> None:
    from x2ssh.agent_client.deploy import deploy_agent

    async def main() -> None:
        async with await connect(sshd) as conn:
            first = await deploy_agent(conn)
            for pid in agent_processes(first.directory):
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not agent_processes(first.directory), what="the killed agent to be gone")
            assert os.path.exists(first.directory)  # SIGKILL: nothing could clean up
            second = await deploy_agent(conn)
            assert not os.path.exists(first.directory)
            await second.close()
            assert not os.path.exists(second.directory)

    asyncio.run(asyncio.wait_for(main(), 60))


@needs_sshd
def test_server_without_python3_gives_agent_unavailable(tmp_path: Path) -> None:
    from benchmarks.sshd import SshServer
    from x2ssh.agent_client.deploy import AgentUnavailable, deploy_agent

    async def main(server) -> AgentUnavailable:
        async with await connect(server) as conn:
            with pytest.raises(AgentUnavailable) as info:
                await deploy_agent(conn)
            result = await conn.run("echo still usable", check=True)
            assert result.stdout.strip() == "still usable"
            return info.value

    with SshServer(tmp_path / "sshd", hide_python3=True) as server:
        error = asyncio.run(asyncio.wait_for(main(server), 60))
    assert "no Python >= 3.8 on the server" in str(error)
    assert "python3: not found" in str(error)
    assert "TCP still works" in str(error)
