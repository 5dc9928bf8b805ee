"""A lean listening port for selector event loops: accept without a task per socket, and a small transport.

Why. asyncio's own accept path costs, per accepted socket, a Task (`_accept_connection2`), a waiter Future,
two `getpeername`/`getsockname` calls and three extra loop turns (connection_made, add_reader and the waiter
go through `call_soon`). For the proxy port, whose short connections are most of its work, that machinery
is a large share of the CPU per connection. `StreamListener` accepts on the listening socket from a reader
callback, until EAGAIN, and hands each socket to a `SocketStream` whose protocol learns of it at once.

`SocketStream` is an `asyncio.Transport` with asyncio's semantics for what the proxy uses: writes go to the
socket first and the rest is buffered (write-buffer limits call the protocol's pause_writing/resume_writing),
`writelines` is one `writev`, `write_eof` after the buffer, `close` after the buffer, `abort` at once,
`connection_lost` once, in a later turn (the listener's streams through one `TurnBatch`: one loop callback
per turn for all the connections that ended in it). Two differences, both invisible to a protocol:
pausing reading is lazy (the reader stays registered until data actually comes while paused, so a
pause/resume around a channel open costs no epoll change when the client sends nothing meanwhile), and the
peer's address comes from accept() instead of a getpeername call. (TCP_DEFER_ACCEPT, so that the first
bytes could be read with the accept, was measured: no gain in CPU per connection, and a silent client
would go unseen by the client limit; not used.)

Only for loops with `add_reader` on sockets (`supports_streams`); elsewhere (Windows' proactor loop, other
loops) the caller uses `loop.create_server`.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import selectors
import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Bytes per read. asyncio's transports read 256 KiB; on a bulk upload the client's socket always held more
# (perf syscall counts: every read was full), so each 256 KiB cost a loop turn, a writev and the per-write
# work of the send path. 512 KiB: half the turns. 1 MiB cut the proxy's CPU a little more, but its bursts
# cost sshd ~0.07 s/GB more and the upload was ~6 % slower than with 512 KiB (benchmarks.profile_socks
# --compare, 4 rounds, server side CPU per GB). Memory per client stays bounded by this read plus the
# channel's buffer limit.
MAX_READ = 512 * 1024
BULK_READ = 64 * 1024  # see SocketStream.read_into
ACCEPT_BATCH = 128  # sockets accepted per readiness event, so one busy port cannot starve the loop
ACCEPT_RETRY_DELAY = 1.0  # after EMFILE and friends, as asyncio
BACKLOG = 128  # as OpenSSH's forwarded ports
_IOV_MAX = 1024
_writev = getattr(os, "writev", None)
_TRY_AGAIN = (BlockingIOError, InterruptedError)
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_RESOURCE_ERRORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

ProtocolFactory = Callable[[], asyncio.Protocol]


class ReadInto(Protocol):
    """Where a `SocketStream` may read straight into (see `SocketStream.read_into`)."""

    def read_buffers(self) -> list[memoryview] | None:
        """Buffers for the next read, in order (None or empty: read into bytes, data_received)."""

    def buffers_read(self, n: int) -> None:
        """The last read put `n` bytes (> 0) into the buffers `read_buffers` returned."""


def _immutable(data: Any) -> bool:
    """Whether `data` can be kept as it is until sent: bytes, or a view of bytes (a channel's payload is a
    view of its opened packet: copying it would double the memory a turn's packets hold)."""
    return type(data) is bytes or (type(data) is memoryview and type(data.obj) is bytes)


def supports_streams(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether `loop` can run a `StreamListener` (a selector loop: add_reader/add_writer on sockets)."""
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)


class TurnBatch:
    """Calls for the loop's next turn, all of them run by one loop callback.

    Why. `loop.call_soon` costs a Handle, a context run and a trip through the loop's ready queue per call.
    The proxy's short connections each defer two calls (the write of the channel's bytes gathered in a turn,
    and connection_lost after the close); under the connection-rate benchmark one loop turn serves many
    connections, so one callback per turn runs them all. Calls keep their order; a call made while the batch
    runs goes to the next turn, as with call_soon; a call that raises is reported to the loop's exception
    handler (as a failing callback is) and the others still run."""

    __slots__ = ("_calls", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._calls: list[tuple[Callable[[Any], None], Any]] = []

    def call_soon(self, callback: Callable[[Any], None], arg: Any) -> None:
        """`callback(arg)` on the loop's next turn, after the calls already batched."""
        calls = self._calls
        if not calls:
            self._loop.call_soon(self._run)
        calls.append((callback, arg))

    def _run(self) -> None:
        calls, self._calls = self._calls, []
        for callback, arg in calls:
            try:
                callback(arg)
            except Exception as exc:
                self._loop.call_exception_handler(
                    {"message": f"Exception in callback {callback!r}", "exception": exc}
                )


class SocketStream(asyncio.Transport):
    """A connected non-blocking socket as an asyncio transport (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        protocol: asyncio.Protocol,
        peername: Any = None,
        batch: TurnBatch | None = None,
    ) -> None:
        """`batch`: where connection_lost is deferred to (one loop callback for many streams); None: the
        loop's call_soon."""
        super().__init__()
        # A selector loop (`supports_streams`): the stream adds and removes its reader and writer with the
        # loop's own `_add_reader` & co., without the public methods' check that the fd belongs to none of
        # asyncio's transports: ours never does, and for a socket asyncio has not seen that check raises and
        # catches a KeyError (through weakref's Python-level lookup), once per client as its reader is
        # removed, more in bulk as the writer comes and goes.
        self._loop: Any = loop
        self._batch = batch
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._peername = peername
        self._buffer: collections.deque[bytes | memoryview] = collections.deque()  # unsent, immutable
        self._buffered = 0
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._writing_paused = False  # the protocol was told pause_writing
        self._reading_paused = False  # the protocol asked for no data_received
        self._reader_on = False  # registered with the selector
        self._writer_on = False
        self._closing = False
        self._eof_pending = False  # write_eof(): shut down once the buffer is out
        self._lost = False
        self._into: ReadInto | None = None  # reads go into its buffers when it has some (see read_into)
        self._bulk = False  # the last read was large: the next one goes into `_into`'s buffers
        self._exc: Exception | None = None  # for connection_lost, when it goes through `_batch`

    # -- start --

    def start(self) -> None:
        """Tell the protocol (connection_made, now) and register for reading."""
        try:
            self._protocol.connection_made(self)
        except Exception as exc:
            self._fatal(exc, "connection_made")
            return
        if not self._closing and not self._reading_paused:
            self._reader_on = True
            _register_new_reader(self._loop, self._fd, self._read_ready)

    # -- reading --

    def _add_reader(self) -> None:
        if not self._reader_on:
            self._reader_on = True
            self._loop._add_reader(self._fd, self._read_ready)

    def _remove_reader(self) -> None:
        if self._reader_on:
            self._reader_on = False
            self._loop._remove_reader(self._fd)

    def read_into(self, target: ReadInto | None) -> None:
        """Read into `target`'s buffers whenever it offers some (`read_buffers`), reporting the count
        (`buffers_read`) instead of calling data_received; None: back to data_received only.

        Only while reads are large (from a read of BULK_READ bytes until one that fills less than offered
        and less than BULK_READ): a scatter read costs more per call than a plain one (a buffer per packet
        to set up), which pays off only in bulk; short exchanges (a request and its answer) keep the plain
        read."""
        self._into = target

    def _read_ready(self) -> None:
        if self._reading_paused:  # lazy pause: only now that data is waiting does the selector forget us
            self._remove_reader()
            return
        into = self._into
        if into is not None and self._bulk:
            try:
                buffers = into.read_buffers()
            except Exception as exc:
                self._fatal(exc, "read_buffers")
                return
            if buffers:
                try:
                    n = self._sock.recvmsg_into(buffers)[0]
                except _TRY_AGAIN:
                    return
                except OSError as exc:
                    self._fatal(exc, None)
                    return
                if n:
                    if n < BULK_READ and n < sum(map(len, buffers)):  # (not: a window that was short)
                        self._bulk = False
                    try:
                        into.buffers_read(n)
                    except Exception as exc:
                        self._fatal(exc, "buffers_read")
                    return
                self._eof()
                return
        try:
            data = self._sock.recv(MAX_READ)
        except _TRY_AGAIN:
            return
        except OSError as exc:
            self._fatal(exc, None)
            return
        if data:
            if into is not None and len(data) >= BULK_READ:
                self._bulk = True
            self._deliver(data)
            return
        self._eof()

    def _eof(self) -> None:
        self._remove_reader()  # level-triggered: an EOF would be reported again and again
        try:
            keep_open = self._protocol.eof_received()
        except Exception as exc:
            self._fatal(exc, "eof_received")
            return
        if not keep_open:
            self.close()

    def _deliver(self, data: bytes) -> None:
        try:
            self._protocol.data_received(data)
        except Exception as exc:
            self._fatal(exc, "data_received")

    def pause_reading(self) -> None:
        """No more data_received until resume_reading (the selector is told only if data comes)."""
        self._reading_paused = True

    def resume_reading(self) -> None:
        """data_received again."""
        self._reading_paused = False
        if not self._closing:
            self._add_reader()

    def is_reading(self) -> bool:
        """Whether data_received may be called."""
        return not self._reading_paused and not self._closing

    # -- writing --

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data` now as far as the socket takes it; buffer the rest (in order)."""
        if self._closing or self._eof_pending or not data:
            return
        if not self._buffer:
            try:
                sent = self._sock.send(data)
            except _TRY_AGAIN:
                sent = 0
            except OSError as exc:
                self._fatal(exc, None)
                return
            if sent == len(data):
                return
            data = data[sent:] if _immutable(data) else bytes(data[sent:])
        elif not _immutable(data):
            data = bytes(data)
        self._queue(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        """Send the parts with one writev when nothing is buffered (no joined copy); buffer the rest."""
        parts = [p if _immutable(p) else bytes(p) for p in list_of_data if p]
        if not parts or self._closing or self._eof_pending:
            return
        if self._buffer or _writev is None or len(parts) == 1:
            for part in parts:
                self.write(part)
            return
        try:
            sent = _writev(self._fd, parts[:_IOV_MAX])
        except _TRY_AGAIN:
            sent = 0
        except OSError as exc:
            self._fatal(exc, None)
            return
        for i, part in enumerate(parts):
            if sent < len(part):
                self._queue(part[sent:] if sent else part)
                for rest in parts[i + 1 :]:
                    self._queue(rest)
                return
            sent -= len(part)

    def _queue(self, data: bytes | memoryview) -> None:
        self._buffer.append(data)
        self._buffered += len(data)
        if not self._writer_on:
            self._writer_on = True
            self._loop._add_writer(self._fd, self._write_ready)
        if not self._writing_paused and self._buffered > self._high:
            self._writing_paused = True
            try:
                self._protocol.pause_writing()
            except Exception as exc:
                self._fatal(exc, "pause_writing")

    def _write_ready(self) -> None:
        buffer = self._buffer
        while buffer:
            head = buffer[0]
            try:
                sent = self._sock.send(head)
            except _TRY_AGAIN:
                return
            except OSError as exc:
                self._fatal(exc, None)
                return
            self._buffered -= sent
            if sent < len(head):
                buffer[0] = head[sent:]
                break
            buffer.popleft()
        if self._writing_paused and self._buffered <= self._low:
            self._writing_paused = False
            try:
                self._protocol.resume_writing()
            except Exception as exc:
                self._fatal(exc, "resume_writing")
                return
        if buffer:
            return
        self._writer_on = False
        self._loop._remove_writer(self._fd)
        if self._closing:
            self._lose(None)
        elif self._eof_pending:
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fatal(exc, None)

    def write_eof(self) -> None:
        """FIN to the client once the buffer is out."""
        if self._closing or self._eof_pending:
            return
        self._eof_pending = True
        if not self._buffer:
            self._shutdown()

    def can_write_eof(self) -> bool:
        return True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """As asyncio: high defaults to 64 KiB, low to high // 4."""
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    # -- closing --

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; close once the buffer is out (connection_lost(None) in a later turn)."""
        if self._closing:
            return
        self._closing = True
        self._remove_reader()
        if not self._buffer:
            self._lose(None)

    def abort(self) -> None:
        """Close now; what is buffered is dropped."""
        self._force_close(None)

    def _fatal(self, exc: BaseException, where: str | None) -> None:
        if where is not None:  # a bug in the protocol, not the network
            log.error("%s failed on %r", where, self, exc_info=exc)
        elif not isinstance(exc, OSError):
            log.error("socket error on %r", self, exc_info=exc)
        self._force_close(exc if isinstance(exc, Exception) else None)

    def _force_close(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._remove_reader()
        if self._writer_on:
            self._writer_on = False
            self._loop._remove_writer(self._fd)
        self._buffer.clear()
        self._buffered = 0
        self._closing = True
        self._lose(exc)

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self._batch is not None:
            self._exc = exc
            self._batch.call_soon(SocketStream._batched_connection_lost, self)
        else:
            self._loop.call_soon(self._connection_lost, exc)

    def _batched_connection_lost(self) -> None:
        self._connection_lost(self._exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        try:
            if self._writing_paused:
                self._writing_paused = False
            self._protocol.connection_lost(exc)
        finally:
            self._sock.close()
            self._protocol = None  # type: ignore[assignment]
            self._into = None

    # -- the rest of the Transport API --

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            if self._peername is None:
                try:
                    self._peername = self._sock.getpeername()
                except OSError:
                    return default
            return self._peername
        if name == "sockname":
            try:
                return self._sock.getsockname()
            except OSError:
                return default
        if name == "socket":
            return self._sock
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return f"<SocketStream fd={self._fd} peer={self._peername} {state}>"


def _register_new_reader(loop: asyncio.AbstractEventLoop, fd: int, callback: Callable[[], None]) -> None:
    """`loop.add_reader(fd, callback)` for a socket just accepted, straight with the loop's selector.

    For an fd it has not seen, asyncio's add_reader raises and catches three KeyErrors (`get_key` twice in
    `selectors`, `_ensure_fd_no_transport`): 4% of the proxy's CPU in py-spy under the connection-rate
    benchmark. This registers the same thing the same way (asyncio's selector loops keep `(reader handle,
    writer handle)` as the key's data), so the loop's remove_reader/add_writer work on it as usual; any
    other loop, or an fd that is registered after all, takes the loop's own add_reader."""
    selector = getattr(loop, "_selector", None)
    if isinstance(selector, selectors.BaseSelector) and supports_streams(loop):
        handle = asyncio.Handle(callback, (), loop, None)
        try:
            selector.register(fd, selectors.EVENT_READ, (handle, None))
        except KeyError:
            pass
        else:
            return
    loop.add_reader(fd, callback)


class StreamListener:
    """Listening sockets served from reader callbacks: each accepted socket becomes a `SocketStream` of
    `factory()` at once (see the module docstring)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        socks: list[socket.socket],
        factory: ProtocolFactory,
        batch: TurnBatch | None = None,
    ) -> None:
        """`batch`: the accepted streams defer connection_lost there (see `TurnBatch`); None: a batch of
        this listener's own."""
        self._loop = loop
        self.sockets = socks
        self._factory = factory
        self._batch = batch if batch is not None else TurnBatch(loop)
        self._serving = False
        self._retry: asyncio.TimerHandle | None = None
        self._tcp = {sock.fileno(): sock.family in _TCP_FAMILIES for sock in socks}  # TCP_NODELAY or not
        # TCP_NODELAY is set on the listening sockets too: where accepted sockets inherit it (Linux, the
        # BSDs), the first accepted socket shows it and no later one needs a setsockopt call of its own.
        self._nodelay_inherited: bool | None = None  # None: not known yet
        for sock in socks:
            if self._tcp[sock.fileno()]:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    self._nodelay_inherited = False
        self._kinds = {sock.fileno(): (int(sock.family), int(sock.type), sock.proto) for sock in socks}

    def start(self) -> None:
        """Begin accepting."""
        self._serving = True
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept_ready, sock)

    def close(self) -> None:
        """Stop accepting and close the listening sockets (accepted ones are their protocols' business)."""
        if not self._serving and not self.sockets:
            return
        self._serving = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets = []

    def _accept_ready(self, listener: socket.socket) -> None:
        tcp = self._tcp.get(listener.fileno(), False)
        # socket.accept() wraps the new fd with the listener's family and type as enums (two Python enum
        # conversions, plus timeout checks, per socket); the plain ints make the same socket.
        family, kind, proto = self._kinds[listener.fileno()]
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = listener._accept()  # type: ignore[attr-defined]
                sock = socket.socket(family, kind, proto, fd)
            except _TRY_AGAIN:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:  # let some sockets close, then try again
                    log.error(
                        "proxy: cannot accept (%s); pausing for %.0f s", exc.strerror, ACCEPT_RETRY_DELAY
                    )
                    self._pause_accepting()
                    return
                raise
            self._serve(sock, peer, tcp)

    def _serve(self, sock: socket.socket, peer: Any, tcp: bool) -> None:
        try:
            sock.setblocking(False)
            if tcp and not self._nodelay_inherited:
                if self._nodelay_inherited is None:  # the first accepted socket: did it inherit it?
                    self._nodelay_inherited = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                if not self._nodelay_inherited:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            log.debug("proxy: accepted socket from %s failed at once: %s", peer, exc)
            sock.close()
            return
        try:
            protocol = self._factory()
        except Exception:
            log.exception("proxy: protocol factory failed")
            sock.close()
            return
        SocketStream(self._loop, sock, protocol, peer, self._batch).start()

    def _pause_accepting(self) -> None:
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
        self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._retry = None
        if self._serving:
            for sock in self.sockets:
                self._loop.add_reader(sock.fileno(), self._accept_ready, sock)


def listen(host: str | None, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address of `host` (None: all), as
    `loop.create_server` makes them (SO_REUSEADDR, IPv6 sockets IPv6-only). OSError as asyncio words it."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: set[tuple[Any, ...]] = set()
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            key = (family, address)
            if key in seen:
                continue
            seen.add(key)
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                why = (exc.strerror or str(exc)).lower()
                raise OSError(
                    exc.errno, f"error while attempting to bind on address {address!r}: {why}"
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks
