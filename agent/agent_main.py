"""The x2ssh UDP agent: the server-side program that sends and receives the tunnel's UDP datagrams.

Theory of operation: one thread, one `selectors` loop. It watches the listening Unix socket, every
client connection, one unconnected UDP socket per flow, stdin (EOF means the SSH session is gone) and a
self-pipe woken by signals. Client bytes go through the sans-IO `Decoder`; replies are encoded into a
per-connection output queue that is flushed with one `sendmsg` per loop turn. Every queue has a byte cap:
beyond it datagrams are dropped and counted. Flows are kept in two recency-ordered dicts (DNS and
others) so idle expiry looks only at the oldest entries. Whatever way the loop ends, `cleanup()` removes
the socket, the zipapp and the private directory.

Stdlib only; must run on Python 3.8 (see PROTOCOL.md for the wire format and the lifecycle rules).
"""

from __future__ import annotations

import argparse
import binascii
import collections
import contextlib
import errno
import logging
import os
import select
import selectors
import signal
import socket
import stat
import sys
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

from agent import protocol as p

log = logging.getLogger("x2ssh.agent")

READY_PREFIX = "X2SSH-AGENT READY"
ERROR_PREFIX = "X2SSH-AGENT ERROR"
SOCKET_NAME = "agent.sock"
ZIPAPP_NAME = "agent.pyz"
SOFTWARE = "x2ssh-agent/1 python/%d.%d.%d" % sys.version_info[:3]

RECV_BATCH = 64  # datagrams read from one flow socket per loop turn, so one busy flow cannot starve others
SENDMSG_MAX_BUFFERS = 256
CLIENT_RECV_SIZE = 256 * 1024
MAX_CLIENT_BUFFER = 4 * 1024 * 1024  # all replies waiting for one client connection
HANDSHAKE_TIMEOUT = 10.0
TOKEN_READ_TIMEOUT = 30.0
MAX_SELECT_TIMEOUT = 1.0
RESOLV_CONF = "/etc/resolv.conf"


class AgentConfig:
    """Settings of one agent process (command-line options)."""

    def __init__(
        self,
        directory: str,
        idle_timeout: float = 60.0,
        dns_idle_timeout: float = 10.0,
        max_flows: int = 1024,
        max_queue_bytes: int = 256 * 1024,
        connect_timeout: float = 30.0,
        zipapp_path: Optional[str] = None,
        resolv_conf: str = RESOLV_CONF,
        client_silence_timeout: float = 60.0,
    ) -> None:
        self.directory = directory
        self.idle_timeout = idle_timeout
        self.dns_idle_timeout = dns_idle_timeout
        self.max_flows = max_flows
        self.max_queue_bytes = max_queue_bytes
        self.connect_timeout = connect_timeout
        self.zipapp_path = zipapp_path
        self.resolv_conf = resolv_conf
        # x2ssh sends KEEPALIVEs; a client that says nothing for this long is behind a dead link (sshd may
        # never notice a silently cut connection), so the agent stops instead of lingering.
        self.client_silence_timeout = client_silence_timeout

    @property
    def socket_path(self) -> str:
        return os.path.join(self.directory, SOCKET_NAME)


class AgentStats:
    """Counters, logged when the agent exits."""

    def __init__(self) -> None:
        self.flows_opened = 0
        self.flows_expired = 0
        self.datagrams_sent = 0
        self.bytes_sent = 0
        self.datagrams_received = 0
        self.bytes_received = 0
        self.drops: Dict[str, int] = collections.Counter()

    def summary(self) -> str:
        drops = ", ".join("%s=%d" % item for item in sorted(self.drops.items())) or "none"
        return "flows opened %d (expired %d); sent %d datagrams / %d B; received %d / %d B; drops: %s" % (
            self.flows_opened,
            self.flows_expired,
            self.datagrams_sent,
            self.bytes_sent,
            self.datagrams_received,
            self.bytes_received,
            drops,
        )


class Flow:
    """One UDP conversation: the client's flow id and the server-side socket that carries it."""

    __slots__ = (
        "client",
        "dns",
        "flow_id",
        "last_active",
        "pending",
        "pending_bytes",
        "queued_to_client",
        "sock",
        "sockaddr",
        "writing",
    )

    def __init__(
        self, client: ClientConnection, flow_id: int, sock: socket.socket, sockaddr: tuple, dns: bool
    ):
        self.client = client
        self.flow_id = flow_id
        self.sock = sock
        self.sockaddr = sockaddr
        self.dns = dns
        self.last_active = 0.0
        self.pending: Deque[bytes] = collections.deque()  # datagrams the kernel would not take yet
        self.pending_bytes = 0
        self.queued_to_client = 0  # bytes of this flow's replies in the client's output queue
        self.writing = False


class ClientConnection:
    """One accepted Unix-socket connection from x2ssh (through sshd)."""

    def __init__(self, sock: socket.socket, accepted_at: float) -> None:
        self.sock = sock
        self.accepted_at = accepted_at
        self.decoder = p.Decoder()
        self.authenticated = False
        self.flows: Dict[int, Flow] = {}
        self.out: Deque[list] = collections.deque()  # [bytes or memoryview, Flow or None]
        self.out_bytes = 0
        self.writing = False
        self.closed = False
        self.last_rx = accepted_at


class Agent:
    """The event loop. `run()` returns the reason it stopped; `cleanup()` must follow."""

    def __init__(
        self,
        config: AgentConfig,
        token: bytes,
        listener: socket.socket,
        stdin_fd: Optional[int],
        wakeup: Optional[socket.socket] = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.stats = AgentStats()
        self._token = token
        self._listener = listener
        self._stdin_fd = stdin_fd
        self._wakeup = wakeup
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._clients: List[ClientConnection] = []
        self._dirty: List[ClientConnection] = []
        self._recency: Dict[bool, Dict[Flow, None]] = {
            True: collections.OrderedDict(),
            False: collections.OrderedDict(),
        }
        self._flow_count = 0
        self._stop_reason: Optional[str] = None
        self._signal: Optional[int] = None
        self._no_client_deadline: Optional[float] = clock() + config.connect_timeout

    # --- loop ---------------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason

    def on_signal(self, signum: int, _frame: object = None) -> None:
        """Signal handler: only records the signal; the self-pipe wakes the loop."""
        self._signal = signum

    def run(self) -> str:
        self._selector.register(self._listener, selectors.EVENT_READ, self._on_listener)
        if self._stdin_fd is not None:
            self._selector.register(self._stdin_fd, selectors.EVENT_READ, self._on_stdin)
        if self._wakeup is not None:
            self._selector.register(self._wakeup, selectors.EVENT_READ, self._on_wakeup)
        while self._stop_reason is None:
            now = self._clock()
            timeout = self._select_timeout(now)
            for key, mask in self._selector.select(timeout):
                key.data(mask)
                if self._stop_reason is not None:
                    break
            if self._signal is not None:
                self.stop("signal %d" % self._signal)
            self._flush_dirty()
            self._expire(self._clock())
        return self._stop_reason

    def _select_timeout(self, now: float) -> float:
        deadline = now + MAX_SELECT_TIMEOUT
        for dns in (True, False):
            oldest = next(iter(self._recency[dns]), None)
            if oldest is not None:
                deadline = min(deadline, oldest.last_active + self._idle_timeout(dns))
        if self._no_client_deadline is not None:
            deadline = min(deadline, self._no_client_deadline)
        return max(0.0, deadline - now)

    def _idle_timeout(self, dns: bool) -> float:
        return self.config.dns_idle_timeout if dns else self.config.idle_timeout

    def _expire(self, now: float) -> None:
        if self._no_client_deadline is not None and now >= self._no_client_deadline:
            self.stop("no client connected within %g s" % self.config.connect_timeout)
        for dns in (True, False):
            recency = self._recency[dns]
            timeout = self._idle_timeout(dns)
            while recency:
                flow = next(iter(recency))
                if flow.last_active + timeout > now:
                    break
                self.stats.flows_expired += 1
                self._close_flow(flow, p.CLOSE_IDLE, notify=True)
        for client in list(self._clients):
            if not client.authenticated and now - client.accepted_at > HANDSHAKE_TIMEOUT:
                log.warning("dropping a connection that sent no HELLO within %g s", HANDSHAKE_TIMEOUT)
                self._drop_client(client)
            elif client.authenticated and now - client.last_rx > self.config.client_silence_timeout:
                silence = self.config.client_silence_timeout
                self.stop("client silent for %g s: its SSH session is gone" % silence)
        self._flush_dirty()

    # --- stdin, signals, listener -------------------------------------------------------------------

    def _on_stdin(self, _mask: int) -> None:
        try:
            data = os.read(self._stdin_fd, 65536)
        except OSError as exc:
            data = b""
            log.debug("stdin: %s", exc)
        if not data:
            self.stop("SSH session gone (stdin closed)")

    def _on_wakeup(self, _mask: int) -> None:
        with contextlib.suppress(OSError):
            self._wakeup.recv(512)

    def _on_listener(self, _mask: int) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            sock.setblocking(False)
            client = ClientConnection(sock, self._clock())
            self._clients.append(client)
            self._selector.register(
                sock, selectors.EVENT_READ, lambda mask, c=client: self._on_client(c, mask)
            )

    # --- client connections -------------------------------------------------------------------------

    def _on_client(self, client: ClientConnection, mask: int) -> None:
        if client.closed:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(client)
        if client.closed or not mask & selectors.EVENT_READ:
            return
        try:
            data = client.sock.recv(CLIENT_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("client connection lost: %s", exc)
            data = b""
        client.last_rx = self._clock()
        try:
            if not data:
                client.decoder.eof()
                self._client_finished(client, "end of stream")
                return
            for frame in client.decoder.feed(data):
                self._handle_frame(client, frame)
                if client.closed:
                    return
        except p.ProtocolError as exc:
            self._protocol_failure(client, exc)

    def _handle_frame(self, client: ClientConnection, frame: p.Frame) -> None:
        if not client.authenticated:
            self._handshake(client, frame)
            return
        kind = type(frame)
        if kind is p.Datagram:
            self._datagram_from_client(client, frame)
        elif kind is p.OpenFlow:
            self._open_flow(client, frame)
        elif kind is p.CloseFlow:
            flow = client.flows.get(frame.flow_id)
            if flow is not None:
                self._close_flow(flow, p.CLOSE_NORMAL, notify=False)
        elif kind is p.Keepalive:
            if not frame.is_reply:
                self._queue(client, p.encode(p.Keepalive(frame.nonce, True)), None)
        elif kind is p.Goodbye:
            self._client_finished(client, "GOODBYE")
        elif kind is p.Error:
            log.warning("client reported error %d: %s", frame.code, frame.message)
            self._client_finished(client, "client error")
        else:
            raise p.ProtocolError(
                "unexpected %s frame from the client" % kind.__name__, p.ERR_UNEXPECTED_FRAME
            )

    def _handshake(self, client: ClientConnection, frame: p.Frame) -> None:
        if not isinstance(frame, p.Hello):
            log.warning("dropping a connection whose first frame is %s, not HELLO", type(frame).__name__)
            self._drop_client(client)
            return
        if not p.token_matches(self._token, frame.token):
            log.warning("dropping a connection with a wrong token")
            self._drop_client(client)
            return
        version = p.negotiate_version(frame)  # ProtocolError(UNSUPPORTED_VERSION) -> ERROR + close
        client.authenticated = True
        self._no_client_deadline = None
        log.info("client authenticated, protocol version %d", version)
        self._queue(client, p.encode(p.Welcome(version, self.config.max_flows, SOFTWARE)), None)

    def _protocol_failure(self, client: ClientConnection, exc: p.ProtocolError) -> None:
        log.warning("protocol error from client: %s; closing its connection", exc.reason)
        if client.authenticated or exc.code == p.ERR_UNSUPPORTED_VERSION:
            self._queue(client, p.encode(p.Error(exc.code, exc.reason)), None)
            self._flush(client)
        was_authenticated = client.authenticated
        self._drop_client(client)
        if was_authenticated and not self._authenticated_clients():
            # Keep running: x2ssh may reconnect; the no-client deadline bounds how long we wait.
            self._no_client_deadline = self._clock() + self.config.connect_timeout

    def _client_finished(self, client: ClientConnection, how: str, flush: bool = True) -> None:
        was_authenticated = client.authenticated
        if flush:
            self._flush(client)
        self._drop_client(client)
        if was_authenticated:
            log.info("client disconnected (%s)", how)
            if not self._authenticated_clients():
                self.stop("client disconnected (%s)" % how)

    def _authenticated_clients(self) -> int:
        return sum(1 for c in self._clients if c.authenticated)

    def _drop_client(self, client: ClientConnection) -> None:
        if client.closed:
            return
        client.closed = True
        for flow in list(client.flows.values()):
            self._close_flow(flow, p.CLOSE_NORMAL, notify=False)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()
        client.out.clear()
        self._clients.remove(client)

    # --- client output ------------------------------------------------------------------------------

    def _queue(self, client: ClientConnection, data: bytes, flow: Optional[Flow]) -> None:
        client.out.append([data, flow])
        client.out_bytes += len(data)
        if flow is not None:
            flow.queued_to_client += len(data)
        if len(client.out) == 1:
            self._dirty.append(client)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, []
        for client in dirty:
            if not client.closed:
                self._flush(client)

    def _flush(self, client: ClientConnection) -> None:
        out = client.out
        while out and not client.closed:
            buffers = [item[0] for item in (out[i] for i in range(min(len(out), SENDMSG_MAX_BUFFERS)))]
            try:
                sent = client.sock.sendmsg(buffers)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.info("client connection lost while sending: %s", exc)
                self._client_finished(client, "send failed", flush=False)
                return
            client.out_bytes -= sent
            while sent:
                item = out[0]
                size = len(item[0])
                if sent >= size:
                    out.popleft()
                    sent -= size
                    if item[1] is not None:
                        item[1].queued_to_client -= size
                else:
                    item[0] = memoryview(item[0])[sent:]
                    if item[1] is not None:
                        item[1].queued_to_client -= sent
                    sent = 0
        self._want_write(client, bool(out) and not client.closed)

    def _want_write(self, client: ClientConnection, want: bool) -> None:
        if client.closed or client.writing == want:
            return
        client.writing = want
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
        self._selector.modify(client.sock, events, self._selector.get_key(client.sock).data)

    # --- flows --------------------------------------------------------------------------------------

    def _open_flow(self, client: ClientConnection, frame: p.OpenFlow) -> None:
        if frame.flow_id in client.flows:
            raise p.ProtocolError("flow %d is already open" % frame.flow_id, p.ERR_UNEXPECTED_FRAME)
        if self._flow_count >= self.config.max_flows:
            self.stats.drops["flow_limit"] += 1
            self._queue(client, p.encode(p.CloseFlow(frame.flow_id, p.CLOSE_LIMIT)), None)
            return
        destination = frame.destination
        if destination == p.SERVER_RESOLVER:
            destination = read_resolver(self.config.resolv_conf)
            if destination is None:
                self._queue(client, p.encode(p.CloseFlow(frame.flow_id, p.CLOSE_NO_RESOLVER)), None)
                return
        try:
            family = socket.AF_INET6 if ":" in destination[0] else socket.AF_INET
            sockaddr = socket.getaddrinfo(
                destination[0], destination[1], family, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST
            )[0][4]
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            log.info("cannot open flow %d to %s: %s", frame.flow_id, destination, exc)
            self._queue(client, p.encode(p.CloseFlow(frame.flow_id, p.CLOSE_SOCKET_ERROR)), None)
            return
        try:
            sock.setblocking(False)
            # Unconnected on purpose: recvfrom then also sees replies from other addresses or ports.
            sock.bind(("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0))
        except OSError as exc:
            sock.close()
            log.info("cannot bind a socket for flow %d: %s", frame.flow_id, exc)
            self._queue(client, p.encode(p.CloseFlow(frame.flow_id, p.CLOSE_SOCKET_ERROR)), None)
            return
        flow = Flow(client, frame.flow_id, sock, sockaddr, p.is_dns_destination(frame.destination))
        flow.last_active = self._clock()
        client.flows[frame.flow_id] = flow
        self._recency[flow.dns][flow] = None
        self._flow_count += 1
        self.stats.flows_opened += 1
        self._selector.register(sock, selectors.EVENT_READ, lambda mask, f=flow: self._on_flow(f, mask))

    def _close_flow(self, flow: Flow, reason: int, notify: bool) -> None:
        client = flow.client
        if client.flows.pop(flow.flow_id, None) is None:
            return
        self._recency[flow.dns].pop(flow, None)
        self._flow_count -= 1
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(flow.sock)
        flow.sock.close()
        if notify and not client.closed:
            self._queue(client, p.encode(p.CloseFlow(flow.flow_id, reason)), None)

    def _touch(self, flow: Flow) -> None:
        flow.last_active = self._clock()
        self._recency[flow.dns].move_to_end(flow)

    def _datagram_from_client(self, client: ClientConnection, frame: p.Datagram) -> None:
        if frame.peer is not None:
            raise p.ProtocolError("DATAGRAM from the client must not carry a peer", p.ERR_UNEXPECTED_FRAME)
        flow = client.flows.get(frame.flow_id)
        if flow is None:
            self.stats.drops["unknown_flow"] += 1
            return
        self._touch(flow)
        payload = frame.payload
        if flow.pending:
            self._queue_udp(flow, payload)
            return
        try:
            flow.sock.sendto(payload, flow.sockaddr)
        except (BlockingIOError, InterruptedError):
            self._queue_udp(flow, payload)
            return
        except OSError as exc:
            self._send_failed(flow, exc)
            return
        self.stats.datagrams_sent += 1
        self.stats.bytes_sent += len(payload)

    def _queue_udp(self, flow: Flow, payload: bytes) -> None:
        if flow.pending_bytes + len(payload) > self.config.max_queue_bytes:
            self.stats.drops["send_queue_full"] += 1
            return
        flow.pending.append(payload)
        flow.pending_bytes += len(payload)
        if not flow.writing:
            flow.writing = True
            self._selector.modify(
                flow.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._flow_key(flow)
            )

    def _flow_key(self, flow: Flow) -> Callable[[int], None]:
        return self._selector.get_key(flow.sock).data

    def _send_failed(self, flow: Flow, exc: OSError) -> None:
        reason = errno.errorcode.get(exc.errno or 0, "error")
        self.stats.drops["send_" + reason] += 1
        log.debug("flow %d: sendto failed: %s", flow.flow_id, exc)

    def _on_flow(self, flow: Flow, mask: int) -> None:
        # The flow may have been closed by an earlier event of the same select() round.
        if flow.client.flows.get(flow.flow_id) is not flow:
            return
        if mask & selectors.EVENT_WRITE:
            self._drain_udp(flow)
        if mask & selectors.EVENT_READ:
            self._receive_udp(flow)

    def _drain_udp(self, flow: Flow) -> None:
        while flow.pending:
            payload = flow.pending[0]
            try:
                flow.sock.sendto(payload, flow.sockaddr)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._send_failed(flow, exc)
            else:
                self.stats.datagrams_sent += 1
                self.stats.bytes_sent += len(payload)
            flow.pending.popleft()
            flow.pending_bytes -= len(payload)
        flow.writing = False
        self._selector.modify(flow.sock, selectors.EVENT_READ, self._flow_key(flow))

    def _receive_udp(self, flow: Flow) -> None:
        client = flow.client
        limit = self.config.max_queue_bytes
        for _ in range(RECV_BATCH):
            try:
                payload, source = flow.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # e.g. an ICMP error queued on the socket: not fatal for an unconnected socket.
                log.debug("flow %d: recvfrom failed: %s", flow.flow_id, exc)
                return
            self._touch(flow)
            self.stats.datagrams_received += 1
            self.stats.bytes_received += len(payload)
            data = p.encode_datagram(flow.flow_id, payload, (source[0], source[1]))
            if flow.queued_to_client + len(data) > limit or client.out_bytes + len(data) > MAX_CLIENT_BUFFER:
                self.stats.drops["reply_queue_full"] += 1
                continue
            self._queue(client, data, flow)

    # --- end ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection and flow socket (no files are touched)."""
        for client in list(self._clients):
            self._drop_client(client)
        self._selector.close()


def read_resolver(path: str = RESOLV_CONF) -> Optional[p.Address]:
    """The first nameserver of a resolv.conf as (host, 53); 127.0.0.1 when it names none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    return (fields[1], 53)
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    return ("127.0.0.1", 53)


def check_private_directory(directory: str) -> None:
    """Raise RuntimeError unless `directory` is a real directory of ours with mode 0700."""
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeError("%s is not a directory" % directory)
    if info.st_uid != os.getuid():
        raise RuntimeError("%s is not owned by uid %d" % (directory, os.getuid()))
    if info.st_mode & 0o077:
        raise RuntimeError("%s is accessible by others (mode %o)" % (directory, info.st_mode & 0o777))


def read_token(fd: int, timeout: float) -> bytes:
    """Read the first line of `fd` (64 hex digits) without reading past it."""
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise RuntimeError("no token on stdin within %g s" % timeout)
        chunk = os.read(fd, 1)  # one byte at a time: whatever follows the line stays unread
        if not chunk:
            raise RuntimeError("stdin closed before the token")
        line += chunk
        if len(line) > 2 * p.TOKEN_SIZE + 2:
            raise RuntimeError("token line too long")
    try:
        token = binascii.unhexlify(line.strip())
    except (binascii.Error, ValueError):
        raise RuntimeError("token is not hex") from None
    if len(token) != p.TOKEN_SIZE:
        raise RuntimeError("token must be %d bytes" % p.TOKEN_SIZE)
    return token


def open_listener(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    listener.listen(16)
    listener.setblocking(False)
    return listener


def cleanup(config: AgentConfig) -> None:
    """Remove the socket, the zipapp (when it lives in the directory) and the directory."""
    paths = [config.socket_path]
    if config.zipapp_path and os.path.dirname(os.path.abspath(config.zipapp_path)) == config.directory:
        paths.append(config.zipapp_path)
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)
    try:
        os.rmdir(config.directory)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", config.directory, exc)


def parse_args(argv: Optional[List[str]]) -> Tuple[argparse.Namespace, AgentConfig]:
    parser = argparse.ArgumentParser(prog="x2ssh-agent", description="x2ssh UDP agent (started by x2ssh)")
    parser.add_argument("--dir", required=True, help="private 0700 directory for the socket")
    parser.add_argument("--idle-timeout", type=float, default=60.0)
    parser.add_argument("--dns-idle-timeout", type=float, default=10.0)
    parser.add_argument("--max-flows", type=int, default=1024)
    parser.add_argument("--max-queue-bytes", type=int, default=256 * 1024)
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--client-silence-timeout", type=float, default=60.0)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--resolv-conf", default=RESOLV_CONF, help=argparse.SUPPRESS)  # tests only
    args = parser.parse_args(argv)
    config = AgentConfig(
        directory=os.path.abspath(args.dir),
        idle_timeout=args.idle_timeout,
        dns_idle_timeout=args.dns_idle_timeout,
        max_flows=args.max_flows,
        max_queue_bytes=args.max_queue_bytes,
        connect_timeout=args.connect_timeout,
        zipapp_path=os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else None,
        resolv_conf=args.resolv_conf,
        client_silence_timeout=args.client_silence_timeout,
    )
    return args, config


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: Optional[List[str]] = None) -> int:
    args, config = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="x2ssh-agent[%(process)d] %(levelname)s %(message)s",
    )
    wakeup_r, wakeup_w = socket.socketpair()
    wakeup_r.setblocking(False)
    wakeup_w.setblocking(False)
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, lambda signum, _frame: stopping.append(signum))
    signal.set_wakeup_fd(wakeup_w.fileno())
    directory_is_ours = False
    try:
        check_private_directory(config.directory)
        directory_is_ours = True
        token = read_token(0, TOKEN_READ_TIMEOUT)
        listener = open_listener(config.socket_path)
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        if directory_is_ours:
            cleanup(config)
        with contextlib.suppress(OSError):
            _say("%s %s" % (ERROR_PREFIX, exc))
        return 2
    agent = Agent(config, token, listener, 0, wakeup_r)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, agent.on_signal)
    if stopping:
        agent.on_signal(stopping[0])
    try:
        _say("%s %s" % (READY_PREFIX, config.socket_path))
    except OSError:
        agent.stop("stdout closed")
    reason = "crashed"
    try:
        reason = agent.run()
    finally:
        agent.close()
        listener.close()
        cleanup(config)
        log.info("exiting: %s; %s", reason, agent.stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
