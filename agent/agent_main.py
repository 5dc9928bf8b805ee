"""The x2ssh agent: the server-side program that sends and receives the tunnel's UDP datagrams and pings.

Theory of operation: one thread, one `selectors` loop. It watches the listening Unix socket, every
client connection, one socket per flow (a connected UDP socket, or a ping socket for ICMP echo), stdin
and a self-pipe woken by signals. A client connection is either a Unix-socket connection (streamlocal
forwarding) or the agent's own stdin/stdout (the exec channel, for servers that refuse streamlocal
forwarding): stdin is always read, and if a HELLO arrives there, stdin/stdout is that client.

Client bytes go through the sans-IO `Decoder`; replies are encoded into a per-connection output queue
that is flushed with one `writev` per loop turn. Every queue has a byte cap: beyond it datagrams are
dropped and counted. Flows are kept in two recency-ordered dicts (DNS and others) so idle expiry looks
only at the oldest entries.

Re-attach (protocol v2): when a v2 client's connection ends without GOODBYE, its flows (and their
server-side ports) stay for `--reattach-grace` seconds; a new connection that presents the same token and
sends RESUME first adopts them. Whatever way the loop ends, `cleanup()` removes the socket, the zipapp and
the private directory.

On Windows (see PROTOCOL.md): no listener, so stdio only and no re-attach; stdin/stdout are bridged to a
socket because select() takes only sockets there; no ping sockets and no error queue. Branches that call
what one platform lacks test `sys.platform` directly, so `mypy --platform win32` can check the Windows path.

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
import struct
import sys
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

from agent import netio
from agent import protocol as p

log = logging.getLogger("x2ssh.agent")

READY_PREFIX = "X2SSH-AGENT READY"
ERROR_PREFIX = "X2SSH-AGENT ERROR"
SOCKET_NAME = "agent.sock"
ZIPAPP_NAME = "agent.pyz"
SOFTWARE = "x2ssh-agent/1 python/%d.%d.%d" % sys.version_info[:3]

RECV_BATCH = 128  # datagrams read from one flow socket per loop turn, so one busy flow cannot starve others
SENDMSG_MAX_BUFFERS = 256
CLIENT_RECV_SIZE = 256 * 1024
MAX_CLIENT_BUFFER = 8 * 1024 * 1024  # all replies waiting for one client connection
MAX_SEND_BUFFER = 16 * 1024 * 1024  # all datagrams of all flows waiting for their sockets
HANDSHAKE_TIMEOUT = 10.0
TOKEN_READ_TIMEOUT = 30.0
MAX_SELECT_TIMEOUT = 1.0
RESOLV_CONF = "/etc/resolv.conf"
IS_WINDOWS = sys.platform == "win32"
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n))
# What the platform offers (module flags, so tests on Linux can take the Windows branches):
PING_SOCKETS = not IS_WINDOWS  # unprivileged ICMP datagram sockets: Linux (ping_group_range), not Windows
ERROR_QUEUE = not IS_WINDOWS  # IP_RECVERR and recvmsg(MSG_ERRQUEUE): Windows sockets have no recvmsg at all
# Windows reports a UDP destination's ICMP port unreachable as WSAECONNRESET on the next recv.
CONNRESET_IS_PORT_UNREACHABLE = IS_WINDOWS
# CPython on Windows builds select() with FD_SETSIZE 512: the selector refuses more sockets than that. One
# socket per flow, plus the stdio bridge and the signal wakeup, leave this many flows with some margin.
WINDOWS_MAX_FLOWS = 500
NO_PING_SOCKETS = (
    "ICMP echo is not supported by the agent on Windows (no unprivileged ping sockets there): "
    "pings through the tunnel get 'administratively prohibited'"
)


class AgentConfig:
    """Settings of one agent process (command-line options)."""

    def __init__(
        self,
        directory: str,
        idle_timeout: float = 60.0,
        dns_idle_timeout: float = 10.0,
        max_flows: int = 1024,
        max_queue_bytes: int = 1024 * 1024,
        connect_timeout: float = 30.0,
        zipapp_path: Optional[str] = None,
        resolv_conf: str = RESOLV_CONF,
        client_silence_timeout: float = 60.0,
        reattach_grace: float = 60.0,
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
        # never notice a silently cut connection), so the agent drops it instead of lingering.
        self.client_silence_timeout = client_silence_timeout
        # How long flows of a v2 client lost without GOODBYE wait for it to re-attach (RESUME).
        self.reattach_grace = reattach_grace

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
        self.unreachable = 0
        self.echoes = 0
        self.resumed = 0
        self.drops: Dict[str, int] = collections.Counter()

    def summary(self) -> str:
        drops = ", ".join("%s=%d" % item for item in sorted(self.drops.items())) or "none"
        return (
            "flows opened %d (expired %d, resumed %d); sent %d datagrams / %d B; received %d / %d B; "
            "echo replies %d; unreachable reports %d; drops: %s"
            % (
                self.flows_opened,
                self.flows_expired,
                self.resumed,
                self.datagrams_sent,
                self.bytes_sent,
                self.datagrams_received,
                self.bytes_received,
                self.echoes,
                self.unreachable,
                drops,
            )
        )


class Flow:
    """One conversation: the client's flow id and the server-side socket that carries it.

    `echo` flows carry ICMP echo over a ping socket; the others UDP over a connected socket.
    """

    __slots__ = (
        "bulk",
        "client",
        "dns",
        "echo",
        "family",
        "flow_id",
        "gso",
        "last_active",
        "outbox",
        "pending",
        "pending_bytes",
        "prefix",
        "queued_to_client",
        "sock",
        "sockaddr",
        "writing",
    )

    def __init__(
        self,
        client: Optional[ClientConnection],
        flow_id: int,
        sock: socket.socket,
        sockaddr: tuple,
        dns: bool,
        echo: bool = False,
    ):
        self.client = client  # None while orphaned (waiting for a RESUME)
        self.flow_id = flow_id
        self.sock = sock
        self.sockaddr = sockaddr
        self.family = sock.family
        self.dns = dns
        self.echo = echo
        self.last_active = 0.0
        self.pending: Deque[bytes] = collections.deque()  # datagrams the kernel would not take yet
        self.pending_bytes = 0
        self.queued_to_client = 0  # bytes of this flow's replies in the client's output queue
        self.writing = False
        # UDP flows: the DATAGRAM fields before the payload (flow id, the destination as peer), encoded once.
        self.prefix = b"" if echo else p.datagram_prefix(flow_id, sockaddr[:2])
        self.bulk = False  # its socket's buffers were grown (a full receive batch, or a full send buffer)
        self.gso = not echo and netio.gso_supported(sock)  # datagrams leave in segmented batches
        self.outbox: List[bytes] = []  # datagrams from the client waiting for the end of this loop turn


class ClientConnection:
    """One connection from x2ssh: a Unix-socket connection (through sshd) or the agent's stdin/stdout.

    `rfd`/`wfd` are the descriptors read and written (the same socket, or stdin and stdout).
    """

    def __init__(
        self, rfd: int, wfd: int, accepted_at: float, closer: Callable[[], None], transport: str
    ) -> None:
        self.rfd = rfd
        self.wfd = wfd
        self.closer = closer
        self.transport = transport  # "socket" or "stdio"
        self.accepted_at = accepted_at
        self.decoder = p.Decoder()
        self.authenticated = False
        self.version = 0
        self.frames_seen = 0  # frames after HELLO: RESUME is valid only as the first
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
        listener: Optional[socket.socket],
        stdin_fd: Optional[int],
        wakeup: Optional[socket.socket] = None,
        clock: Callable[[], float] = time.monotonic,
        stdout_fd: Optional[int] = None,
    ) -> None:
        self.config = config
        self.stats = AgentStats()
        self._token = token
        self._listener = listener
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        self._wakeup = wakeup
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._clients: List[ClientConnection] = []
        self._dirty: List[ClientConnection] = []
        self._recency: Dict[bool, Dict[Flow, None]] = {
            True: collections.OrderedDict(),
            False: collections.OrderedDict(),
        }
        self._orphans: Dict[int, Flow] = {}  # flows of a lost v2 client, until RESUME or the grace ends
        self._grace_deadline: Optional[float] = None
        self._stdin_client: Optional[ClientConnection] = None
        self._session_gone = False  # stdin (the exec channel) ended
        self._flow_count = 0
        self._pending_total = 0  # bytes in every flow's send queue
        self._outboxes: List[Flow] = []  # flows with datagrams to send at the end of this loop turn
        self._stop_reason: Optional[str] = None
        self._signal: Optional[int] = None
        self._no_client_deadline: Optional[float] = clock() + config.connect_timeout
        self._ping_refused_logged = False

    # --- loop ---------------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason

    def on_signal(self, signum: int, _frame: object = None) -> None:
        """Signal handler: only records the signal; the self-pipe wakes the loop."""
        self._signal = signum

    def run(self) -> str:
        if self._listener is not None:  # None on Windows: stdio only
            self._selector.register(self._listener, selectors.EVENT_READ, self._on_listener)
        if self._stdin_fd is not None:
            # stdin is a client connection that has not said HELLO (yet): over streamlocal it never will,
            # and its EOF then means the SSH session is gone.
            wfd = self._stdout_fd if self._stdout_fd is not None else -1
            client = ClientConnection(self._stdin_fd, wfd, self._clock(), self._close_stdio, "stdio")
            self._stdin_client = client
            self._clients.append(client)
            self._selector.register(
                client.rfd, selectors.EVENT_READ, lambda mask, c=client: self._on_client(c, mask)
            )
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
            self._send_outboxes()
            self._flush_dirty()
            self._expire(self._clock())
        return self._stop_reason

    def _select_timeout(self, now: float) -> float:
        deadline = now + MAX_SELECT_TIMEOUT
        for dns in (True, False):
            oldest = next(iter(self._recency[dns]), None)
            if oldest is not None:
                deadline = min(deadline, oldest.last_active + self._idle_timeout(dns))
        for limit in (self._no_client_deadline, self._grace_deadline):
            if limit is not None:
                deadline = min(deadline, limit)
        return max(0.0, deadline - now)

    def _idle_timeout(self, dns: bool) -> float:
        return self.config.dns_idle_timeout if dns else self.config.idle_timeout

    def _expire(self, now: float) -> None:
        if self._no_client_deadline is not None and now >= self._no_client_deadline:
            self.stop("no client connected within %g s" % self.config.connect_timeout)
        if self._grace_deadline is not None and now >= self._grace_deadline:
            self._grace_deadline = None
            for flow in list(self._orphans.values()):
                self._close_flow(flow, p.CLOSE_NORMAL, notify=False)
            if not self._authenticated_clients():
                self.stop("no client re-attached within %g s" % self.config.reattach_grace)
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
            if client is self._stdin_client and not client.authenticated:
                continue  # the exec channel: silent by design unless it carries the protocol
            if not client.authenticated and now - client.accepted_at > HANDSHAKE_TIMEOUT:
                log.warning("dropping a connection that sent no HELLO within %g s", HANDSHAKE_TIMEOUT)
                self._drop_client(client)
            elif client.authenticated and now - client.last_rx > self.config.client_silence_timeout:
                silence = self.config.client_silence_timeout
                self._client_lost(client, "client silent for %g s: its SSH session is gone" % silence)
        self._flush_dirty()

    # --- stdin, signals, listener -------------------------------------------------------------------

    def _close_stdio(self) -> None:
        for fd in {self._stdin_fd, self._stdout_fd}:  # one fd on Windows (the stdio bridge's socket)
            if fd is not None:
                with contextlib.suppress(OSError):
                    fd_close(fd)

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
            netio.grow_buffers(sock)  # room in the kernel for bursts of replies while sshd catches up
            fd = sock.fileno()
            client = ClientConnection(fd, fd, self._clock(), sock.close, "socket")
            self._clients.append(client)
            self._selector.register(fd, selectors.EVENT_READ, lambda mask, c=client: self._on_client(c, mask))

    # --- client connections -------------------------------------------------------------------------

    def _on_client(self, client: ClientConnection, mask: int) -> None:
        if client.closed:
            return
        if mask & selectors.EVENT_WRITE and client.wfd == client.rfd:
            self._flush(client)
        if client.closed or not mask & selectors.EVENT_READ:
            return
        try:
            data = fd_read(client.rfd, CLIENT_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("client connection lost: %s", exc)
            data = b""
        client.last_rx = self._clock()
        try:
            if not data:
                if client is self._stdin_client and not client.authenticated:
                    self._stdin_closed()
                    return
                client.decoder.eof()
                self._client_lost(client, "end of stream")
                return
            for frame in client.decoder.feed(data):
                self._handle_frame(client, frame)
                if client.closed:
                    return
        except p.ProtocolError as exc:
            self._protocol_failure(client, exc)

    def _stdin_closed(self) -> None:
        """The exec channel ended: the SSH connection that started us is gone."""
        self._session_gone = True
        if self._stdin_client is not None:
            self._drop_client(self._stdin_client)
        # Stay only for a v2 client attached through another connection, or for one to re-attach.
        v2_client = any(c.authenticated and c.version >= p.VERSION_ICMP for c in self._clients)
        if not v2_client and self._grace_deadline is None:
            self.stop("SSH session gone (stdin closed)")

    def _handle_frame(self, client: ClientConnection, frame: p.Frame) -> None:
        if not client.authenticated:
            self._handshake(client, frame)
            return
        client.frames_seen += 1
        kind = type(frame)
        if kind is p.Datagram:
            self._datagram_from_client(client, frame)
        elif kind is p.Echo and client.version >= p.VERSION_ICMP:
            self._echo_from_client(client, frame)
        elif kind is p.OpenFlow:
            self._open_flow(client, frame)
        elif kind is p.OpenEcho and client.version >= p.VERSION_ICMP:
            self._open_echo(client, frame)
        elif kind is p.CloseFlow:
            flow = client.flows.get(frame.flow_id)
            if flow is not None:
                self._close_flow(flow, p.CLOSE_NORMAL, notify=False)
        elif kind is p.Keepalive:
            if not frame.is_reply:
                self._queue(client, p.encode(p.Keepalive(frame.nonce, True)), None)
        elif kind is p.Resume and client.version >= p.VERSION_ICMP and client.frames_seen == 1:
            self._resume(client)
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
        if client is self._stdin_client and client.wfd < 0:
            raise p.ProtocolError("no stdout to answer on", p.ERR_INTERNAL)
        client.authenticated = True
        client.version = version
        self._no_client_deadline = None
        log.info("client authenticated over %s, protocol version %d", client.transport, version)
        self._queue(client, p.encode(p.Welcome(version, self.config.max_flows, SOFTWARE)), None)

    def _resume(self, client: ClientConnection) -> None:
        """Adopt the flows a lost connection left behind (their sockets, so their ports, unchanged)."""
        for other in list(self._clients):
            if other is not client and other.authenticated and other.version >= p.VERSION_ICMP:
                # The same token resumes: that older connection is stale (its path was cut silently and
                # sshd has not noticed yet). Its flows move over now instead of after the silence timeout.
                log.info("a resuming client replaces a stale connection with %d flows", len(other.flows))
                for flow in other.flows.values():
                    flow.client = None
                    self._orphans[flow.flow_id] = flow
                other.flows.clear()
                self._drop_client(other)
        orphans, self._orphans = self._orphans, {}
        self._grace_deadline = None
        for flow in orphans.values():
            flow.client = client
            flow.queued_to_client = 0
            client.flows[flow.flow_id] = flow
        self.stats.resumed += len(orphans)
        log.info("client re-attached: %d flows resumed", len(orphans))

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
        """A clean end (GOODBYE, or any end of a v1 client): its flows close; the last one stops us."""
        was_authenticated = client.authenticated
        if flush:
            self._flush(client)
        self._drop_client(client)
        if was_authenticated:
            log.info("client disconnected (%s)", how)
            if not self._authenticated_clients():
                self.stop("client disconnected (%s)" % how)

    def _client_lost(self, client: ClientConnection, how: str) -> None:
        """The connection ended without GOODBYE: a v2 client may re-attach, so its flows wait for it.

        Only through the listening socket, though: without one (Windows, stdio only) nobody can come back,
        so the agent ends at once instead of lingering for the grace period."""
        reattachable = self._listener is not None and self.config.reattach_grace > 0
        if not client.authenticated or client.version < p.VERSION_ICMP or not reattachable:
            if client.authenticated and self._listener is None:
                how += "; no re-attach without a listening socket"
            elif client.authenticated and self.config.reattach_grace <= 0:
                how += "; re-attach disabled"
            self._client_finished(client, how, flush=False)
            return
        log.info(
            "client connection lost (%s): keeping its flows %g s for a re-attach",
            how,
            self.config.reattach_grace,
        )
        for flow in client.flows.values():
            flow.client = None
            self._orphans[flow.flow_id] = flow
        client.flows.clear()
        self._drop_client(client)
        if not self._authenticated_clients():
            self._grace_deadline = self._clock() + self.config.reattach_grace

    def _authenticated_clients(self) -> int:
        return sum(1 for c in self._clients if c.authenticated)

    def _drop_client(self, client: ClientConnection) -> None:
        if client.closed:
            return
        client.closed = True
        for flow in list(client.flows.values()):
            self._close_flow(flow, p.CLOSE_NORMAL, notify=False)
        for fd in {client.rfd, client.wfd}:
            if fd >= 0:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(fd)
        client.closer()
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
                sent = fd_writev(client.wfd, buffers)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.info("client connection lost while sending: %s", exc)
                self._client_lost(client, "send failed")
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
        if client.wfd == client.rfd:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            self._selector.modify(client.rfd, events, self._selector.get_key(client.rfd).data)
        elif want:
            self._selector.register(client.wfd, selectors.EVENT_WRITE, lambda _mask, c=client: self._flush(c))
        else:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.wfd)

    # --- flows --------------------------------------------------------------------------------------

    def _admit(self, client: ClientConnection, flow_id: int) -> bool:
        if flow_id in client.flows:
            raise p.ProtocolError("flow %d is already open" % flow_id, p.ERR_UNEXPECTED_FRAME)
        if self._flow_count >= self.config.max_flows:
            self.stats.drops["flow_limit"] += 1
            self._queue(client, p.encode(p.CloseFlow(flow_id, p.CLOSE_LIMIT)), None)
            return False
        return True

    def _refuse_flow(self, client: ClientConnection, flow_id: int, reason: int, code: Optional[int]) -> None:
        if code is not None and client.version >= p.VERSION_ICMP:
            self.stats.unreachable += 1
            self._queue(client, p.encode(p.Unreachable(flow_id, code, 0, None)), None)
        self._queue(client, p.encode(p.CloseFlow(flow_id, reason)), None)

    def _open_flow(self, client: ClientConnection, frame: p.OpenFlow) -> None:
        if not self._admit(client, frame.flow_id):
            return
        destination = frame.destination
        if destination == p.SERVER_RESOLVER:
            destination = read_resolver(self.config.resolv_conf)
            if destination is None:
                self._refuse_flow(client, frame.flow_id, p.CLOSE_NO_RESOLVER, None)
                return
        try:
            # Connected: only the destination's datagrams are accepted, and its ICMP errors are reported.
            sock = netio.open_udp(destination)
        except OSError as exc:
            log.info("cannot open flow %d to %s: %s", frame.flow_id, destination, exc)
            code = netio.error_from_errno(exc.errno) or p.UNREACH_NET
            self._refuse_flow(client, frame.flow_id, p.CLOSE_SOCKET_ERROR, code)
            return
        self._add_flow(
            Flow(client, frame.flow_id, sock, sock.getpeername(), p.is_dns_destination(frame.destination))
        )

    def _open_echo(self, client: ClientConnection, frame: p.OpenEcho) -> None:
        if not self._admit(client, frame.flow_id):
            return
        if not PING_SOCKETS:
            if not self._ping_refused_logged:
                self._ping_refused_logged = True
                log.warning(NO_PING_SOCKETS)
            self._queue(client, p.encode(p.CloseFlow(frame.flow_id, p.CLOSE_NOT_PERMITTED)), None)
            return
        try:
            sock, sockaddr = netio.open_ping(frame.destination)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT):
                if not self._ping_refused_logged:
                    self._ping_refused_logged = True
                    log.warning(
                        "cannot open a ping socket (%s): net.ipv4.ping_group_range excludes this user's "
                        "groups (%s); pings get 'administratively prohibited'",
                        exc,
                        _group_hint(),
                    )
                self._queue(client, p.encode(p.CloseFlow(frame.flow_id, p.CLOSE_NOT_PERMITTED)), None)
                return
            log.info("cannot open echo flow %d to %s: %s", frame.flow_id, frame.destination, exc)
            code = netio.error_from_errno(exc.errno) or p.UNREACH_NET
            self._refuse_flow(client, frame.flow_id, p.CLOSE_SOCKET_ERROR, code)
            return
        self._add_flow(Flow(client, frame.flow_id, sock, sockaddr, False, echo=True))

    def _add_flow(self, flow: Flow) -> None:
        flow.last_active = self._clock()
        flow.client.flows[flow.flow_id] = flow
        self._recency[flow.dns][flow] = None
        self._flow_count += 1
        self.stats.flows_opened += 1
        self._selector.register(flow.sock, selectors.EVENT_READ, lambda mask, f=flow: self._on_flow(f, mask))

    def _close_flow(self, flow: Flow, reason: int, notify: bool) -> None:
        client = flow.client
        if client is None:
            if self._orphans.pop(flow.flow_id, None) is None:
                return
        elif client.flows.pop(flow.flow_id, None) is None:
            return
        self._recency[flow.dns].pop(flow, None)
        self._flow_count -= 1
        self._pending_total -= flow.pending_bytes
        flow.pending.clear()
        flow.pending_bytes = 0
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(flow.sock)
        flow.sock.close()
        if notify and client is not None and not client.closed:
            self._queue(client, p.encode(p.CloseFlow(flow.flow_id, reason)), None)

    def _touch(self, flow: Flow) -> None:
        flow.last_active = self._clock()
        self._recency[flow.dns].move_to_end(flow)

    def _datagram_from_client(self, client: ClientConnection, frame: p.Datagram) -> None:
        if frame.peer is not None:
            raise p.ProtocolError("DATAGRAM from the client must not carry a peer", p.ERR_UNEXPECTED_FRAME)
        flow = client.flows.get(frame.flow_id)
        if flow is None or flow.echo:
            self._unknown_flow(client, frame.flow_id)
            return
        self._send(flow, frame.payload)

    def _echo_from_client(self, client: ClientConnection, frame: p.Echo) -> None:
        flow = client.flows.get(frame.flow_id)
        if flow is None or not flow.echo:
            self._unknown_flow(client, frame.flow_id)
            return
        self._send(flow, netio.echo_request(flow.family, frame.seq, frame.payload))

    def _unknown_flow(self, client: ClientConnection, flow_id: int) -> None:
        # v1: it crossed our CLOSE_FLOW; drop it. v2: also say so, since a resumed client may not have
        # heard about flows that ended while it was away (it reopens the flow on its next datagram).
        self.stats.drops["unknown_flow"] += 1
        if client.version >= p.VERSION_ICMP:
            self._queue(client, p.encode(p.CloseFlow(flow_id, p.CLOSE_UNKNOWN_FLOW)), None)

    def _send(self, flow: Flow, payload: bytes) -> None:
        self._touch(flow)
        if flow.pending:
            self._queue_udp(flow, payload)
            return
        if flow.gso:
            # Collected until the end of the loop turn: a client read carries many datagrams of a flow.
            if not flow.outbox:
                self._outboxes.append(flow)
            flow.outbox.append(payload)
            return
        try:
            if flow.echo:
                flow.sock.sendto(payload, flow.sockaddr)
            else:
                flow.sock.send(payload)
        except (BlockingIOError, InterruptedError):
            self._queue_udp(flow, payload)
            return
        except OSError as exc:
            self._send_failed(flow, exc, payload)
            return
        self.stats.datagrams_sent += 1
        self.stats.bytes_sent += len(payload)

    def _send_outboxes(self) -> None:
        flows, self._outboxes = self._outboxes, []
        for flow in flows:
            payloads, flow.outbox = flow.outbox, []
            if flow.sock.fileno() >= 0:  # else closed meanwhile: the datagrams go with it
                self._send_batch(flow, payloads)

    def _send_batch(self, flow: Flow, payloads: List[bytes]) -> None:
        """Send a flow's datagrams in order: runs of one size (the last of a run may be shorter) as one
        segmented send each, the rest one by one; what the kernel will not take now waits in the queue."""
        stats = self.stats
        count = len(payloads)
        i = 0
        while i < count:
            size = len(payloads[i])
            j = i + 1
            total = size
            if 0 < size <= netio.GSO_MAX_SEGMENT:
                limit = min(count, i + netio.GSO_MAX_SEGMENTS)
                while j < limit and len(payloads[j]) == size and total + size <= netio.GSO_MAX_BYTES:
                    total += size
                    j += 1
                if (
                    j < limit
                    and 0 < len(payloads[j]) < size
                    and total + len(payloads[j]) <= netio.GSO_MAX_BYTES
                ):
                    total += len(payloads[j])
                    j += 1
            try:
                if j - i == 1:
                    flow.sock.send(payloads[i])
                else:
                    netio.send_segments(flow.sock, payloads[i:j], size)
            except (BlockingIOError, InterruptedError):
                for payload in payloads[i:]:
                    self._queue_udp(flow, payload)
                return
            except OSError as exc:
                if j - i > 1 and exc.errno in (errno.EINVAL, errno.EIO, errno.EMSGSIZE, errno.ENOPROTOOPT):
                    # The kernel or the device refuses segmentation here: this flow sends one by one.
                    log.debug(
                        "flow %d: segmented send refused (%s); sending datagrams singly", flow.flow_id, exc
                    )
                    flow.gso = False
                    for payload in payloads[i:]:
                        self._send(flow, payload)
                    return
                self._send_failed(flow, exc, payloads[i])
                if j - i > 1:
                    stats.drops["send_" + errno.errorcode.get(exc.errno or 0, "error")] += j - i - 1
            else:
                stats.datagrams_sent += j - i
                stats.bytes_sent += total
            i = j

    def _queue_udp(self, flow: Flow, payload: bytes) -> None:
        if not flow.bulk:  # the kernel's send buffer is full: a busy flow
            flow.bulk = True
            netio.grow_buffers(flow.sock)
        if flow.pending_bytes + len(payload) > self.config.max_queue_bytes:
            self.stats.drops["send_queue_full"] += 1
            return
        if self._pending_total + len(payload) > MAX_SEND_BUFFER:
            self.stats.drops["send_buffer_full"] += 1
            return
        self._pending_total += len(payload)
        flow.pending.append(payload)
        flow.pending_bytes += len(payload)
        if not flow.writing:
            flow.writing = True
            self._selector.modify(
                flow.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._flow_key(flow)
            )

    def _flow_key(self, flow: Flow) -> Callable[[int], None]:
        return self._selector.get_key(flow.sock).data

    def _send_failed(self, flow: Flow, exc: OSError, payload: bytes) -> None:
        reason = errno.errorcode.get(exc.errno or 0, "error")
        self.stats.drops["send_" + reason] += 1
        log.debug("flow %d: send failed: %s", flow.flow_id, exc)
        # A pending ICMP error surfaces on send too: report it (the error queue says exactly what it was).
        seq = struct.unpack_from("!H", payload, 6)[0] if flow.echo and len(payload) >= 8 else 0
        self._report_errors(flow, exc.errno, seq)

    def _report_errors(self, flow: Flow, number: Optional[int], seq: int = 0) -> None:
        errors = netio.read_errors(flow.sock) if ERROR_QUEUE else []
        if not errors:
            code = unreachable_from_errno(number)
            if code is None:
                return
            errors = [netio.IcmpError(code, None, seq)]
        client = flow.client
        if client is None:
            self.stats.drops["unreachable_while_detached"] += len(errors)
            return
        if client.version < p.VERSION_ICMP:
            return
        for error in errors:
            self.stats.unreachable += 1
            info = error.seq if flow.echo else 0
            self._queue(client, p.encode(p.Unreachable(flow.flow_id, error.code, info, error.reporter)), None)

    def _on_flow(self, flow: Flow, mask: int) -> None:
        # The flow may have been closed by an earlier event of the same select() round.
        owner = flow.client.flows if flow.client is not None else self._orphans
        if owner.get(flow.flow_id) is not flow:
            return
        if mask & selectors.EVENT_WRITE and flow.writing:
            self._drain_udp(flow)
        if mask & selectors.EVENT_READ:
            self._receive(flow)

    def _drain_udp(self, flow: Flow) -> None:
        while flow.pending:
            payload = flow.pending[0]
            try:
                if flow.echo:
                    flow.sock.sendto(payload, flow.sockaddr)
                else:
                    flow.sock.send(payload)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._send_failed(flow, exc, payload)
            else:
                self.stats.datagrams_sent += 1
                self.stats.bytes_sent += len(payload)
            flow.pending.popleft()
            flow.pending_bytes -= len(payload)
            self._pending_total -= len(payload)
        flow.writing = False
        self._selector.modify(flow.sock, selectors.EVENT_READ, self._flow_key(flow))

    def _receive(self, flow: Flow) -> None:
        """Read what the flow's socket holds (up to a batch) and queue it for the client as one buffer."""
        client = flow.client
        sock = flow.sock
        stats = self.stats
        frames: List[bytes] = []
        room = 0
        if client is not None:
            room = self.config.max_queue_bytes - flow.queued_to_client
            room = min(room, MAX_CLIENT_BUFFER - client.out_bytes)
        received = 0
        failure: Optional[OSError] = None
        for _ in range(RECV_BATCH):
            try:
                payload = sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                failure = exc  # an ICMP error for this flow (port/host unreachable ...): reported below
                break
            received += 1
            if flow.echo:
                reply = netio.parse_echo_reply(flow.family, payload)
                if reply is None:
                    stats.drops["not_an_echo_reply"] += 1
                    continue
                stats.echoes += 1
                data = p.encode_echo(flow.flow_id, reply[0], reply[1])
            else:
                stats.datagrams_received += 1
                stats.bytes_received += len(payload)
                data = p.encode_datagram_with(flow.prefix, payload)
            if client is None:
                stats.drops["reply_while_detached"] += 1
            elif len(data) > room:
                stats.drops["reply_queue_full"] += 1
            else:
                room -= len(data)
                frames.append(data)
        else:
            if not flow.bulk:  # a full batch was waiting: a busy flow, give its socket room for bursts
                flow.bulk = True
                netio.grow_buffers(sock)
        if received:
            self._touch(flow)
        if frames:
            # One queue entry (one writev buffer) per batch instead of one per datagram.
            self._queue(client, frames[0] if len(frames) == 1 else b"".join(frames), flow)
        if failure is not None:
            self._report_errors(flow, failure.errno)

    # --- end ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every connection and flow socket (no files are touched)."""
        for client in list(self._clients):
            self._drop_client(client)
        for flow in list(self._orphans.values()):
            self._close_flow(flow, p.CLOSE_NORMAL, notify=False)
        self._selector.close()


# --- Windows: stdin/stdout through a socket ---------------------------------------------------------
# select() on Windows takes sockets only, and a socket's fileno() is not a C runtime fd there (os.read,
# os.writev and os.close do not apply). So on Windows stdin/stdout are bridged to one end of a socketpair
# by two threads, and the loop reads, writes and closes that socket through the fd_* functions below.

FILE_ATTRIBUTE_REPARSE_POINT = 0x400
_SOCKETS = {}  # type: Dict[int, socket.socket]


def stdio_bridge(rfd: int, wfd: int) -> socket.socket:
    """A socket that carries what arrives on `rfd` and whose sends go to `wfd` (EOF passed both ways)."""
    ours, theirs = socket.socketpair()

    def pump_in() -> None:
        try:
            while True:
                data = os.read(rfd, CLIENT_RECV_SIZE)
                if not data:
                    break
                theirs.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            theirs.shutdown(socket.SHUT_WR)

    def pump_out() -> None:
        try:
            while True:
                data = theirs.recv(CLIENT_RECV_SIZE)
                if not data:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(wfd, view) :]
        except OSError:
            pass
        with contextlib.suppress(OSError):
            os.close(wfd)  # the client sees the end of our output

    for target in (pump_in, pump_out):
        threading.Thread(target=target, name="stdio-" + target.__name__, daemon=True).start()
    _SOCKETS[ours.fileno()] = ours
    return ours


def _binary_stdio() -> None:
    """No newline translation on fds 0 and 1: they carry frames (CPython sets this too; be explicit)."""
    if sys.platform == "win32":
        import msvcrt

        for fd in (0, 1):
            msvcrt.setmode(fd, os.O_BINARY)


def _socket_read(fd: int, size: int) -> bytes:
    return _SOCKETS[fd].recv(size)


def _socket_writev(fd: int, buffers: List[bytes]) -> int:
    return _SOCKETS[fd].send(b"".join(buffers))


def _socket_close(fd: int) -> None:
    sock = _SOCKETS.pop(fd, None)
    if sock is not None:
        sock.close()


def set_nonblocking(fd: int) -> None:
    if fd in _SOCKETS:
        _SOCKETS[fd].setblocking(False)
    elif sys.platform == "win32":  # every descriptor the loop uses there is a socket
        raise OSError("descriptor %d is not a socket" % fd)
    else:
        os.set_blocking(fd, False)


# `sys.platform` tests (not IS_WINDOWS) where a branch calls what one platform lacks: mypy --platform win32
# then skips the POSIX branch, so a POSIX-only call reachable on Windows fails tests/unit's type check.
fd_read: Callable[[int, int], bytes]
fd_writev: Callable[[int, List[bytes]], int]
fd_close: Callable[[int], None]
if sys.platform == "win32":
    fd_read, fd_writev, fd_close = _socket_read, _socket_writev, _socket_close
else:
    fd_read, fd_writev, fd_close = os.read, os.writev, os.close


def unreachable_from_errno(number: Optional[int]) -> Optional[int]:
    """The UNREACHABLE code an errno from a flow's socket stands for, on this platform (None: none)."""
    code = netio.error_from_errno(number)
    if code is None and CONNRESET_IS_PORT_UNREACHABLE and number == errno.ECONNRESET:
        return p.UNREACH_PORT
    return code


def _group_hint() -> str:
    if sys.platform == "win32":
        return "no groups on Windows"
    return "gid %d" % os.getgid()


def effective_max_flows(requested: int, windows: bool = IS_WINDOWS) -> int:
    """The flow cap the agent can honour: on Windows select() takes at most 512 sockets."""
    return min(requested, WINDOWS_MAX_FLOWS) if windows else requested


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


def check_private_directory(directory: str, windows: bool = IS_WINDOWS) -> None:
    """Raise RuntimeError unless `directory` is a real directory of ours with mode 0700."""
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeError("%s is not a directory" % directory)
    if windows or sys.platform == "win32":
        # No uid or mode bits there: the bootstrap gave the directory an ACL for this user only (icacls).
        # A junction or symlink could lead anywhere: refuse reparse points.
        if getattr(info, "st_file_attributes", 0) & FILE_ATTRIBUTE_REPARSE_POINT:
            raise RuntimeError("%s is a junction or symbolic link" % directory)
        return
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
        chunk = fd_read(fd, 1)  # one byte at a time: whatever follows the line stays unread
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
    """The agent's Unix socket (POSIX only: Windows servers are reached over stdin/stdout)."""
    if sys.platform == "win32":
        raise OSError("no Unix sockets on Windows")
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
    """Remove the socket, the zipapp (when it lives in the directory) and the directory.

    A `lock` file in the directory means a bootstrap waits for us and removes the directory itself (the
    Windows bootstrap: Windows may refuse to delete the zipapp while this process runs from it)."""
    bootstrap_owns_it = os.path.exists(os.path.join(config.directory, "lock"))
    paths = [config.socket_path]
    zipapp = config.zipapp_path
    if zipapp and os.path.dirname(os.path.abspath(zipapp)) == config.directory and not bootstrap_owns_it:
        paths.append(zipapp)
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)
    if bootstrap_owns_it:
        return
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
    parser.add_argument("--max-queue-bytes", type=int, default=1024 * 1024)
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--client-silence-timeout", type=float, default=60.0)
    parser.add_argument("--reattach-grace", type=float, default=60.0)
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
        reattach_grace=args.reattach_grace,
    )
    return args, config


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: Optional[List[str]] = None) -> int:
    args, config = parse_args(argv)
    # After the SSH session is gone, stderr may be a broken pipe: logging must then stay silent, not fail.
    logging.raiseExceptions = False
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="x2ssh-agent[%(process)d] %(levelname)s %(message)s",
    )
    wakeup_r, wakeup_w = socket.socketpair()
    wakeup_r.setblocking(False)
    wakeup_w.setblocking(False)
    stopping = []
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda signum, _frame: stopping.append(signum))
    signal.set_wakeup_fd(wakeup_w.fileno())
    directory_is_ours = False
    stdin_fd, stdout_fd = 0, 1
    try:
        check_private_directory(config.directory)
        directory_is_ours = True
        if IS_WINDOWS:  # select() waits on sockets only there; no Unix socket either: stdio only
            _binary_stdio()
            stdin_fd = stdout_fd = stdio_bridge(0, 1).fileno()
            config.max_flows = effective_max_flows(config.max_flows)
            log.info(
                "Windows: stdin/stdout only (no re-attach), at most %d flows, no ICMP echo", config.max_flows
            )
        token = read_token(stdin_fd, TOKEN_READ_TIMEOUT)
        listener = None if IS_WINDOWS else open_listener(config.socket_path)
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        if directory_is_ours:
            cleanup(config)
        with contextlib.suppress(OSError):
            _say("%s %s" % (ERROR_PREFIX, exc))
        return 2
    agent = Agent(config, token, listener, stdin_fd, wakeup_r, stdout_fd=stdout_fd)
    for signum in STOP_SIGNALS:
        signal.signal(signum, agent.on_signal)
    if stopping:
        agent.on_signal(stopping[0])
    try:
        _say("%s %s" % (READY_PREFIX, config.socket_path if listener is not None else "stdio"))
        # From here on stdout carries frames only (when the client speaks over stdin/stdout).
        set_nonblocking(stdout_fd)
    except OSError:
        agent.stop("stdout closed")
    reason = "crashed"
    try:
        reason = agent.run()
    finally:
        agent.close()
        if listener is not None:
            listener.close()
        cleanup(config)
        log.info("exiting: %s; %s", reason, agent.stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
