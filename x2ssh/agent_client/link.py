"""The framed connection to a running agent (client side, asyncssh): an `AgentLink` for `UdpRelay`.

Two transports carry the same frames (agent/PROTOCOL.md):
- "socket": a `direct-streamlocal@openssh.com` channel to the agent's Unix socket (OpenSSH streamlocal
  forwarding). Best: a new SSH connection can reach the same agent again (re-attach).
- "stdio": the exec channel's stdin/stdout, for servers that refuse streamlocal forwarding
  (`AllowStreamLocalForwarding no`, Win32-OpenSSH). Works with any sshd. A re-attach then runs a small
  connector through a new exec channel that pipes its stdin/stdout to the agent's socket.

Frames written within one event-loop turn (a netstack batch) leave as one channel write: far fewer SSH
packets than one per datagram.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import asyncssh

from agent import protocol as p

log = logging.getLogger(__name__)

TRANSPORT_SOCKET = "socket"
TRANSPORT_STDIO = "stdio"
STDIO_READ_SIZE = 256 * 1024


class AgentUnavailable(Exception):
    """The UDP agent cannot run on this server (no python3, upload failed, did not start, Windows...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"UDP agent unavailable: {reason}")
        self.reason = reason


class AgentReceiver(Protocol):
    """Who gets what the agent sends (`x2ssh.flows.udp_relay.UdpRelay` implements it)."""

    def datagram_from_agent(self, flow_id: int, source: tuple[str, int], payload: bytes) -> None: ...
    def echo_from_agent(self, flow_id: int, seq: int, payload: bytes) -> None: ...
    def unreachable_from_agent(self, flow_id: int, code: int, info: int, reporter: str | None) -> None: ...
    def flow_closed_by_agent(self, flow_id: int, reason: int) -> None: ...
    def agent_lost(self, reason: str) -> None: ...


@dataclass(frozen=True)
class AgentSettings:
    """How the agent is started and what it may use; the timeouts should match the UdpRelay's."""

    idle_timeout: float = 60.0
    dns_idle_timeout: float = 10.0
    max_flows: int = 1024
    # Per flow and direction in the agent (~64 ms at 1 Gbit/s; all of a connection's replies are capped at
    # 8 MiB there too): replies wait while this busy process catches up instead of being dropped.
    # Measured, 1 Gbit/s offered down, 3 runs each: 2 MiB lost 16.6/8.6/15.3 %, 8 MiB 12.3/1.7/6.2 %.
    max_queue_bytes: int = 8 * 1024 * 1024
    connect_timeout: float = 30.0  # the agent exits when no client has connected by then
    keepalive_interval: float = 15.0  # the client proves it is alive this often ...
    client_silence_timeout: float = 60.0  # ... and the agent drops a client after this much silence
    reattach_grace: float = 60.0  # flows of a connection lost without GOODBYE wait this long for a resume
    python_candidates: tuple[str, ...] = ("python3", "/usr/bin/python3", "python")
    probe_timeout: float = 15.0
    start_timeout: float = 20.0
    close_timeout: float = 10.0
    # Datagrams are dropped while more than this waits for the channel: sshd grants an agent channel a 2 MiB
    # window (16 ms at 1 Gbit/s), so this is what rides out a busy moment of sshd or the agent (~130 ms).
    max_write_buffer: int = 16 * 1024 * 1024
    # What the agent may send before we acknowledge it (SSH channel window; asyncssh's default is 2 MiB,
    # 16 ms at 1 Gbit/s): replies then wait in the network, not in the agent's bounded queues, while this
    # process is busy. asyncssh holds at most this much for the channel.
    channel_window: int = 8 * 1024 * 1024
    log_level: str = "INFO"

    def agent_args(self) -> list[str]:
        return [
            "--idle-timeout",
            str(self.idle_timeout),
            "--dns-idle-timeout",
            str(self.dns_idle_timeout),
            "--max-flows",
            str(self.max_flows),
            "--max-queue-bytes",
            str(self.max_queue_bytes),
            "--connect-timeout",
            str(self.connect_timeout),
            "--client-silence-timeout",
            str(self.client_silence_timeout),
            "--reattach-grace",
            str(self.reattach_grace),
            "--log-level",
            self.log_level,
        ]


@dataclass(frozen=True)
class ServerPython:
    """A usable python found on the server."""

    command: str
    version: tuple[int, int]
    platform: str
    executable: str


class _AgentChannelSession(asyncssh.SSHUNIXSession):
    def __init__(self, handle: AgentHandle) -> None:
        self._handle = handle

    def connection_made(self, chan: asyncssh.SSHUNIXChannel) -> None:
        self._handle._chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._handle._data_received(data)

    def eof_received(self) -> bool:
        self._handle._stream_ended("the agent closed its connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._handle._stream_ended(f"connection lost: {exc}" if exc else "connection closed")


class AgentHandle:
    """A running agent and the framed connection to it; an `AgentLink` for `UdpRelay`.

    `process` is the exec channel that started the agent (or runs the re-attach connector); None when the
    agent was reached again over streamlocal only. `transport` is "socket" or "stdio".
    """

    def __init__(
        self,
        process: asyncssh.SSHClientProcess | None,
        directory: str,
        socket_path: str,
        python: ServerPython,
        token: bytes,
        settings: AgentSettings,
        stderr_tail: collections.deque[str],
        stderr_task: asyncio.Task[None] | None = None,
    ) -> None:
        self.process = process
        self._stderr_task = stderr_task  # forwards the agent's log lines; referenced so it is not collected
        self._stdout_task: asyncio.Task[None] | None = None
        self.directory = directory
        self.socket_path = socket_path
        self.python = python
        self.settings = settings
        self.transport = TRANSPORT_SOCKET
        self.version = 0
        self.software = ""
        self.max_flows = 0
        self.resumed = False
        self.drops: collections.Counter[str] = collections.Counter()
        self._token = token
        self._stderr_tail = stderr_tail
        self._chan: Any = None  # SSHUNIXChannel, or the exec process's SSHClientChannel for stdio
        self._decoder = p.Decoder()
        self._receiver: AgentReceiver | None = None
        self._loop = asyncio.get_running_loop()
        self._welcome: asyncio.Future[p.Welcome] = self._loop.create_future()
        # Nobody may be waiting when the link fails (deployment gave up earlier, or the handshake timed
        # out): mark the outcome as seen so asyncio never logs "Future exception was never retrieved".
        self._welcome.add_done_callback(_consume_outcome)
        self._closed = asyncio.Event()
        self._closing = False
        self._lost_without_goodbye = False
        self._keepalive_replies = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    @property
    def token(self) -> bytes:
        return self._token

    @property
    def lost(self) -> bool:
        """The link ended without our GOODBYE: the agent may still be waiting for a re-attach."""
        return self._lost_without_goodbye

    # --- transports -------------------------------------------------------------------------------------

    async def open_socket(self, conn: asyncssh.SSHClientConnection) -> None:
        """Reach the agent's Unix socket through streamlocal forwarding (raises asyncssh errors)."""
        await conn.create_unix_connection(
            lambda: _AgentChannelSession(self), self.socket_path, window=self.settings.channel_window
        )
        self.transport = TRANSPORT_SOCKET

    def use_stdio(self, process: asyncssh.SSHClientProcess) -> None:
        """Speak over `process`'s stdin/stdout (the agent's own, or a connector's)."""
        self.process = process
        self._chan = process.channel
        self.transport = TRANSPORT_STDIO
        self._stdout_task = asyncio.get_running_loop().create_task(self._read_stdout(process))

    async def _read_stdout(self, process: asyncssh.SSHClientProcess) -> None:
        try:
            while not self._closed.is_set():
                data = await process.stdout.read(STDIO_READ_SIZE)
                if not data:
                    break
                self._data_received(data)
        except (asyncssh.Error, OSError) as exc:
            self._stream_ended(f"exec channel failed: {exc}")
            return
        self._stream_ended("the agent's stdout ended")

    # --- AgentLink ------------------------------------------------------------------------------------

    def set_receiver(self, receiver: AgentReceiver | None) -> None:
        self._receiver = receiver

    @property
    def supports_icmp(self) -> bool:
        return self.version >= p.VERSION_ICMP

    def open_flow(self, flow_id: int, destination: tuple[str, int]) -> None:
        self._write(p.encode(p.OpenFlow(flow_id, destination)))

    def open_echo(self, flow_id: int, destination: str) -> None:
        self._write(p.encode(p.OpenEcho(flow_id, destination)))

    def send_datagram(self, flow_id: int, payload: bytes) -> bool:
        """Queue a datagram for the agent; False (dropped) when the link is gone or backed up."""
        # The hot path of an upload (~90,000 calls a second at 1 Gbit/s): `_room()` and `_write()` inline,
        # and the frame queued as header and payload, joined (copied) once per flush.
        chan, pending = self._chan, self._pending
        if chan is None or self._closed.is_set():
            return False
        size = len(payload)
        if chan.get_write_buffer_size() + self._pending_bytes > self.settings.max_write_buffer:
            self.drops["write_buffer_full"] += 1
            return False
        header = p.encode_datagram_header(flow_id, size)
        if not pending:
            self._loop.call_soon(self._flush)
        pending.append(header)
        pending.append(payload)
        self._pending_bytes += len(header) + size
        return True

    def send_echo(self, flow_id: int, seq: int, payload: bytes) -> bool:
        """Queue an echo request for the agent; False (dropped) when the link is gone or backed up."""
        if not self._room():
            return False
        self._write(p.encode_echo(flow_id, seq, payload))
        return True

    def _room(self) -> bool:
        chan = self._chan
        if chan is None or self._closed.is_set():
            return False
        if chan.get_write_buffer_size() + self._pending_bytes > self.settings.max_write_buffer:
            self.drops["write_buffer_full"] += 1
            return False
        return True

    def close_flow(self, flow_id: int) -> None:
        self._write(p.encode(p.CloseFlow(flow_id, p.CLOSE_NORMAL)))

    def send_keepalive(self, nonce: int) -> None:
        self._write(p.encode(p.Keepalive(nonce & 0xFFFFFFFF, False)))

    @property
    def keepalive_replies(self) -> int:
        return self._keepalive_replies

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        """Say GOODBYE and wait (bounded) until the agent has removed its files and exited."""
        self._closing = True
        if self._chan is not None and not self._closed.is_set():
            self._write(p.encode(p.Goodbye()))
            self._flush()
            self._chan.write_eof()
        try:
            if self.process is not None:
                await asyncio.wait_for(self.process.wait(), self.settings.close_timeout)
            else:
                await asyncio.wait_for(self._closed.wait(), self.settings.close_timeout)
        except (TimeoutError, asyncssh.Error, OSError) as exc:
            log.warning("UDP agent did not exit cleanly within %g s: %s", self.settings.close_timeout, exc)
        finally:
            self._shutdown("closed")
            if self.process is not None:
                self.process.close()
            if self.drops:
                counts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.drops.items()))
                log.info("UDP agent link: datagrams dropped: %s", counts)

    async def handshake(self, timeout: float, resume: bool = False) -> None:
        """HELLO with the token; WELCOME completes it. `resume`: then ask for the previous flows."""
        self._write(p.encode(p.Hello(p.MIN_VERSION, p.MAX_VERSION, self._token)))
        welcome = await asyncio.wait_for(asyncio.shield(self._welcome), timeout)
        self.version, self.max_flows, self.software = welcome.version, welcome.max_flows, welcome.software
        if resume:
            if self.version < p.VERSION_ICMP:
                raise AgentUnavailable(f"the agent speaks protocol {self.version}: it cannot resume flows")
            self._write(p.encode(p.Resume()))
            self.resumed = True

    def _write(self, data: bytes) -> None:
        if self._chan is not None and not self._closed.is_set():
            if not self._pending:
                self._loop.call_soon(self._flush)
            self._pending.append(data)
            self._pending_bytes += len(data)

    def _flush(self) -> None:
        if not self._pending:
            return  # already flushed (close() flushes at once)
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if self._chan is not None and not self._closed.is_set():
            try:
                self._chan.write(data)
            except (BrokenPipeError, asyncssh.Error) as exc:  # the channel closed under us
                self._shutdown(f"agent channel closed: {exc}")

    def _shutdown(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if not self._closing and self._welcome.done() and not self._welcome.cancelled():
            self._lost_without_goodbye = self._welcome.exception() is None
        if not self._welcome.done():
            self._welcome.set_exception(AgentUnavailable(f"agent connection ended before WELCOME: {reason}"))
        if self._chan is not None:
            self._chan.close()
        receiver, self._receiver = self._receiver, None
        if receiver is not None and not self._closing:
            receiver.agent_lost(reason)

    def _stream_ended(self, reason: str) -> None:
        if not self._closed.is_set():
            try:
                self._decoder.eof()
            except p.ProtocolError as exc:
                reason = f"{reason} ({exc.reason})"
            if not self._closing:
                log.warning("UDP agent connection ended: %s", reason)
            self._shutdown(reason)

    def _data_received(self, data: bytes) -> None:
        if self._closed.is_set():
            return
        try:
            for frame in self._decoder.feed(data):
                # The hot path (a reply datagram) without the dispatch below; the receiver is looked up
                # each time since a frame may end the link.
                receiver = self._receiver
                if type(frame) is p.Datagram and frame.peer is not None and receiver is not None:
                    receiver.datagram_from_agent(frame.flow_id, frame.peer, frame.payload)
                else:
                    self._handle_frame(frame)
        except p.ProtocolError as exc:
            log.error("protocol error from the UDP agent: %s; closing the agent connection", exc.reason)
            self._write(p.encode(p.Error(exc.code, exc.reason)))
            self._flush()  # the agent should learn why before the channel closes
            self._shutdown(f"protocol error: {exc.reason}")

    def _handle_frame(self, frame: p.Frame) -> None:
        kind = type(frame)
        receiver = self._receiver
        if kind is p.Datagram:
            if frame.peer is None:
                raise p.ProtocolError("DATAGRAM from the agent without a source", p.ERR_UNEXPECTED_FRAME)
            if receiver is None:
                self.drops["no_receiver"] += 1
            else:
                receiver.datagram_from_agent(frame.flow_id, frame.peer, frame.payload)
        elif kind is p.Echo and self.version >= p.VERSION_ICMP:
            if receiver is not None:
                receiver.echo_from_agent(frame.flow_id, frame.seq, frame.payload)
        elif kind is p.Unreachable and self.version >= p.VERSION_ICMP:
            if receiver is not None:
                receiver.unreachable_from_agent(frame.flow_id, frame.code, frame.info, frame.reporter)
        elif kind is p.CloseFlow:
            if receiver is not None:
                receiver.flow_closed_by_agent(frame.flow_id, frame.reason)
        elif kind is p.Keepalive:
            if frame.is_reply:
                self._keepalive_replies += 1
            else:
                self._write(p.encode(p.Keepalive(frame.nonce, True)))
        elif kind is p.Welcome and not self._welcome.done():
            self._welcome.set_result(frame)
        elif kind is p.Error:
            log.error("UDP agent reported error %d: %s", frame.code, frame.message)
            if not self._welcome.done():
                self._welcome.set_exception(
                    AgentUnavailable(f"agent refused the connection: {frame.message}")
                )
        else:
            raise p.ProtocolError(f"unexpected {kind.__name__} frame from the agent", p.ERR_UNEXPECTED_FRAME)


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
