"""Hot-path adjustments to asyncssh that change no behaviour.

Each one is checked by tests/unit/test_asyncssh_tuning*.py against a real asyncssh server in the same
process; asyncssh is pinned below 2.25 because these reach into its internals.

Logging. asyncssh formats a description of every packet it sends or receives (type name, byte count,
and for some packets a copy of the payload) before its logger checks whether packet debugging (level 3)
is on. On a bulk transfer that is about 8 % of x2ssh's CPU (profiled with py-spy). Here the check comes
first; with packet debugging on (`asyncssh.set_debug_level(3)`, x2ssh -vvv) the original runs unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import struct
import time
from collections.abc import Callable
from typing import Any

import asyncssh.connection as _asyncssh_connection
from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_FAILURE,
    MSG_CHANNEL_OPEN_CONFIRMATION,
    MSG_CHANNEL_OPEN_FAILURE,
    MSG_CHANNEL_WINDOW_ADJUST,
    MSG_IGNORE,
)
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import ChachaEncryption, GCMEncryption
from asyncssh.logging import SSHLogger
from asyncssh.misc import DisconnectError, ProtocolError
from asyncssh.packet import PacketDecodeError, SSHPacket, SSHPacketLogger, String, UInt32
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PACKET_DEBUG_LEVEL = 3
_original_log_packet = SSHPacketLogger._log_packet


def _log_packet_when_debugging(self: SSHPacketLogger, *args: Any, **kwargs: Any) -> None:
    if SSHLogger._debug_level >= PACKET_DEBUG_LEVEL:
        _original_log_packet(self, *args, **kwargs)


_original_log = SSHLogger.log


def _log_when_enabled(self: SSHLogger, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
    # SSHLogger.log turns every argument into text before the logger checks the level: several calls
    # per channel (open, close), about 4 % of the CPU of a short connection. Check the level first.
    if self.isEnabledFor(level):
        _original_log(self, level, msg, *args, **kwargs)


_original_debug1 = SSHLogger.debug1
_original_info = SSHLogger.info


def _debug1_when_enabled(self: SSHLogger, msg: str, *args: Any, **kwargs: Any) -> None:
    # Every channel logs its write buffer limits at debug level 1 as it is created, and its closing at
    # level INFO (three lines): with those levels off, one check instead of a chain of calls that ends in
    # the same check.
    if self.logger.isEnabledFor(logging.DEBUG):
        _original_debug1(self, msg, *args, **kwargs)


def _info_when_enabled(self: SSHLogger, msg: object, *args: Any, **kwargs: Any) -> None:
    if self.logger.isEnabledFor(logging.INFO):
        _original_info(self, msg, *args, **kwargs)


# -- The empty SSH_MSG_IGNORE asyncssh puts before every packet --
#
# asyncssh sends an empty IGNORE ahead of each packet after the key exchange: a cover for the first
# packets against the Terrapin prefix truncation when the peer lacks strict key exchange, and the old
# countermeasure for CBC's predictable IVs. With strict kex negotiated and an AEAD cipher (AES-GCM,
# chacha20-poly1305) neither applies, yet it costs an encryption, a random padding and a sequence number
# per packet: a short connection's 4-6 packets become 8-12. Only then is it left out; with CBC, CTR or
# no strict kex every IGNORE is sent as before.

_AEAD_ENCRYPTIONS = (GCMEncryption, ChachaEncryption)
_EMPTY_STRING = String(b"")
_original_send_packet = SSHConnection.send_packet


def _send_packet_without_cover(self: SSHConnection, pkttype: int, *args: bytes, **kwargs: Any) -> None:
    if (
        pkttype == MSG_IGNORE
        and self._strict_kex
        and isinstance(self._send_encryption, _AEAD_ENCRYPTIONS)
        and args == (_EMPTY_STRING,)
    ):
        return
    _original_send_packet(self, pkttype, *args, **kwargs)


# -- AES-GCM: one AESGCM object per key, not one per packet --
#
# asyncssh's GCMCipher builds an AESGCM (a key schedule and an OpenSSL context) for every packet it
# encrypts or decrypts; the key never changes for the cipher's life (a rekey makes a new GCMCipher).
# Same IV sequence, same bytes out. `_aead` keeps one per GCMCipher; every AES-GCM packet in x2ssh goes
# through it, either on the direct paths below or through the patched GCMEncryption further down (which
# replaces the whole GCMCipher call, so GCMCipher itself needs no patch).


def _next_iv(iv: bytes) -> bytes:
    """GCMCipher._update_iv's next IV: the 64-bit invocation counter after the 4-byte fixed field, plus one.

    Written out inline where one packet is sealed or opened at a time (`_seal_and_send`, `_open_packets`,
    `_recv_packet_fast`): a method call less per packet, about seven per short connection. This is the
    reference the tests hold those lines to."""
    return iv[:4] + ((int.from_bytes(iv[4:], "big") + 1) & _IV_MASK).to_bytes(8, "big")


def _aead(cipher: GCMCipher) -> AESGCM:
    aead = cipher.__dict__.get("_x2ssh_aead")
    if aead is None:
        aead = cipher.__dict__["_x2ssh_aead"] = AESGCM(cipher._key)
    return aead


# -- One SSH packet out without the detours, for AES-GCM after the key exchange --
#
# asyncssh's send_packet checks, per packet, for a due rekey, for packets to defer during a key exchange,
# inserts (here: skips) the empty IGNORE through a second call, compresses, builds the packet from several
# small byte strings, encrypts through two shims, and formats a log record. A short connection sends four
# packets; every one is a channel message on an established connection. For exactly that case (auth and
# kex complete, no rekey due, strict kex, AES-GCM, no compression, a connection-protocol message) the same
# bytes are built and sealed in one go (same padding rule, same random source, same IV sequence); every
# other packet takes asyncssh's own path, which also sends the KEXINIT when a rekey falls due.

_BYTE = tuple(bytes((i,)) for i in range(256))
_FIRST_CONNECTION_MSG = 80  # SSH_MSG_GLOBAL_REQUEST: the connection protocol (RFC 4254) starts here


def _fast_send_ok(self: SSHConnection, enc: Any) -> bool:
    """The direct send path applies: AES-GCM, strict kex, logged in, no compression, no rekey due."""
    return (
        enc.__class__ is GCMEncryption
        and self._strict_kex
        and self._auth_complete
        and self._kex_complete
        and self._compressor is None
        and self._rekey_bytes_sent < self._rekey_bytes
        and not (self._rekey_seconds and time.monotonic() >= self._rekey_time)
    )


def _seal_and_send(self: SSHConnection, enc: Any, head: bytes, body: Any, padlen: int) -> None:
    """Seal `head` + `body` + `padlen` random bytes as the next packet (`head` starts with the pad length)."""
    packet = b"".join((head, body, _asyncssh_connection.os.urandom(padlen)))
    pktlen = len(packet)
    header = pktlen.to_bytes(4, "big")
    cipher = enc._cipher
    iv = cipher._iv
    sealed = _aead(cipher).encrypt(iv, packet, header)  # ciphertext + tag, as header + mac
    cipher._iv = iv[:4] + ((int.from_bytes(iv[4:], "big") + 1) & _IV_MASK).to_bytes(8, "big")  # _next_iv
    self._send(header)  # gathered with the rest of the loop turn's packets (coalesce_sends), not joined here
    self._send(sealed)
    self._send_seq = (self._send_seq + 1) & 0xFFFFFFFF
    self._rekey_bytes_sent += pktlen


def _send_packet_fast(self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None) -> None:
    enc = self._send_encryption
    if pkttype < _FIRST_CONNECTION_MSG or not _fast_send_ok(self, enc):
        _send_packet_without_cover(self, pkttype, *args, handler=handler)
        return
    payload = _BYTE[pkttype] + b"".join(args)
    padlen = -(self._send_enchdrlen + len(payload)) % self._send_blocksize
    if padlen < 4:
        padlen += self._send_blocksize
    seq = self._send_seq
    _seal_and_send(self, enc, _BYTE[padlen], payload, padlen)
    if SSHLogger._debug_level >= PACKET_DEBUG_LEVEL:
        (handler or self).log_sent_packet(pkttype, seq, payload)


_DATA_HEAD = struct.Struct(">BBII").pack  # pad length, MSG_CHANNEL_DATA, recipient channel, data length


def _direct_send(conn: Any, enc: Any) -> bool:
    return _installed and _fast_send_ok(conn, enc) and SSHLogger._debug_level < PACKET_DEBUG_LEVEL


def _data_padlen(conn: Any, n: int) -> int:
    """The padding of a CHANNEL_DATA packet carrying `n` bytes (asyncssh's rule)."""
    blocksize = conn._send_blocksize
    padlen = -(conn._send_enchdrlen + 9 + n) % blocksize
    return padlen + blocksize if padlen < 4 else padlen


def _seal_data(conn: Any, enc: Any, send_chan: int, data: Any) -> None:
    n = len(data)
    padlen = _data_padlen(conn, n)
    _seal_and_send(conn, enc, _DATA_HEAD(padlen, MSG_CHANNEL_DATA, send_chan, n), data, padlen)


def send_channel_data(conn: Any, send_chan: int, data: Any) -> None:
    """Send CHANNEL_DATA carrying `data` (bytes-like) to the server's channel `send_chan`.

    On the direct path the bytes are copied once, into the packet that is sealed; otherwise it is asyncssh's
    `send_packet` (which also defers the packet during a key exchange). The caller keeps to the channel's
    window and packet size.
    """
    enc = conn._send_encryption
    if _direct_send(conn, enc):
        _seal_data(conn, enc, send_chan, data)
    else:
        conn.send_packet(MSG_CHANNEL_DATA, UInt32(send_chan), String(bytes(data)))


_IV_MASK = 0xFFFFFFFFFFFFFFFF  # GCMCipher._update_iv: the 64-bit invocation counter after the fixed field


def send_channel_chunks(conn: Any, send_chan: int, data: Any, pktsize: int) -> None:
    """Send `data` (bytes-like) as CHANNEL_DATA packets of at most `pktsize` bytes, in order.

    The same packets as `send_channel_data` per chunk (same padding rule and random source, same IV
    sequence), with the direct path's checks done once per write (a socket read of 256 KiB is eight
    packets) and only the rekey threshold checked per packet: once a rekey falls due, the rest goes through
    `send_channel_data`, so asyncssh starts the key exchange at the same packet as ever. The caller keeps to
    the channel's window.

    Why one loop and not `send_channel_data` per chunk: a bulk upload is ~30,000 packets per GB, and the
    calls, attribute lookups and IV arithmetic asyncssh's objects cost per packet were a good part of
    x2ssh -D's CPU beyond the cipher (profiled with cProfile); here the state lives in locals and is written
    back once, and the sealed parts go to the connection's send in one call when it takes a list."""
    view = memoryview(data)
    total = len(view)
    enc = conn._send_encryption
    done = _seal_chunks(conn, enc, send_chan, view, pktsize) if _direct_send(conn, enc) else 0
    for start in range(done, total, pktsize):  # a rekey is due, or another cipher: asyncssh's path
        send_channel_data(conn, send_chan, view[start : start + pktsize])


def _seal_chunks(conn: Any, enc: Any, send_chan: int, view: memoryview, pktsize: int) -> int:
    """Seal and send the chunks of `view` until a rekey falls due; returns where it stopped."""
    total = len(view)
    cipher = enc._cipher
    encrypt = _aead(cipher).encrypt
    iv = cipher._iv
    fixed, counter = iv[:4], int.from_bytes(iv[4:], "big")
    urandom = _asyncssh_connection.os.urandom
    room = conn._rekey_bytes - conn._rekey_bytes_sent  # bytes sealed before a rekey falls due
    parts: list[bytes] = []
    append = parts.append
    size = padlen = 0
    head = header = b""
    start = sealed_bytes = count = 0
    while start < total and sealed_bytes < room:
        chunk = view[start : start + pktsize]
        n = len(chunk)
        if n != size:  # the head, padding length and length field are the same for every full chunk
            size = n
            padlen = _data_padlen(conn, n)
            head = _DATA_HEAD(padlen, MSG_CHANNEL_DATA, send_chan, n)
            header = (10 + n + padlen).to_bytes(4, "big")
        append(header)
        append(encrypt(iv, b"".join((head, chunk, urandom(padlen))), header))
        counter = (counter + 1) & _IV_MASK
        iv = fixed + counter.to_bytes(8, "big")
        sealed_bytes += 10 + n + padlen
        count += 1
        start += n
    _sealed(conn, cipher, iv, count, sealed_bytes, parts)
    return start


def _sealed(
    conn: Any, cipher: Any, iv: bytes, count: int, sealed_bytes: int, parts: list[Any], arena: Any = None
) -> None:
    """Book `count` packets sealed in a row (the cipher's next IV, sequence number, rekey byte count) and
    hand their parts to the connection's send, in one call when `coalesce_sends` wraps it. Parts that are
    views of `arena`'s slots are lent to that send (till its flush) or, without one, copied at once."""
    cipher._iv = iv
    conn._send_seq = (conn._send_seq + count) & 0xFFFFFFFF
    conn._rekey_bytes_sent += sealed_bytes
    send = conn._send
    many = getattr(send, "many", None)
    if many is not None:
        many(parts, arena)
    else:
        for part in parts:
            send(bytes(part) if arena is not None else part)


# -- A socket read straight into the next packets, each sealed into its place in the send --
#
# On upload each 32 KiB chunk of a client read was joined with its 10-byte head and its padding into a new
# packet before sealing: a copy of every byte (memmove: ~5 % of x2ssh -D's CPU on the upload, perf). Here
# the read itself goes into the data fields of packet slots (recvmsg_into with one buffer per packet),
# each slot with room for the head before and the padding after. Where the cipher can seal into a given
# buffer (`AESGCM.encrypt_into`), each packet is sealed into an output slot that also holds its length
# field, so the send gets one buffer per packet: `encrypt` allocates and zero-fills a new 32 KiB object per
# packet first, and each packet was two buffers. With the full packets sealed by `map` (no Python statement
# per packet), sealing a 512 KiB read went from 1.99 to 1.41 M instructions, the cipher alone being 1.28 M
# (`python -m benchmarks.seal_bench --callgrind [--tree EARLIER_CHECKOUT]`).
#
# The output slots are the connection's own and are lent to its coalesced send (`coalesce_sends`) until
# its flush has written them or copied what the socket did not take; a second read on the same connection
# before that flush (another channel in the same loop turn) flushes first. Where the send is not coalesced,
# the sealed packets are copied out at once.

_SLOT_HEAD = 10  # pad length, type, channel, data length
_SLOT_TAIL = 32  # room for the padding (at most a cipher block + 3 bytes)
_GCM_TAG = 16
READ_INTO_MAX = 512 * 1024  # bytes per read into the arena (as frontends.stream.MAX_READ; see there)
_DATA_HEAD_INTO = struct.Struct(">BBII").pack_into
_SEAL_INTO = hasattr(AESGCM, "encrypt_into")  # cryptography >= 45


class _Arena:
    """One connection's slots for reads of `pktsize`-byte packets: plaintext slots (head, data, padding;
    `full` are their data fields) and sealed slots (length, ciphertext, tag), lent to the send while
    `busy`. For full packets, whose padding length is the connection's constant, the views each packet
    needs are cut once (`layout`), and the heads of the last channel written stay in place."""

    __slots__ = (
        "busy", "chan", "full", "out", "out_slot", "padlen", "pads", "parts", "plains", "sealed", "short",
        "slot", "view",
    )  # fmt: skip

    def __init__(self, pktsize: int) -> None:
        self.slot = slot = _SLOT_HEAD + pktsize + _SLOT_TAIL
        count = max(1, READ_INTO_MAX // pktsize)
        self.view = memoryview(bytearray(slot * count))
        self.full = [self.view[i * slot + _SLOT_HEAD : (i + 1) * slot - _SLOT_TAIL] for i in range(count)]
        self.out_slot = 4 + slot + _GCM_TAG
        self.out = memoryview(bytearray(self.out_slot * count))
        self.busy = False
        self.padlen = self.chan = -1  # no layout yet
        self.short: set[int] = set()  # slots that last carried a short packet (other length and head)
        self.plains: list[memoryview] = []  # full packet i: head, data and padding (what is sealed)
        self.pads: list[memoryview] = []  # its padding
        self.sealed: list[memoryview] = []  # where its ciphertext and tag go
        self.parts: list[memoryview] = []  # what is sent: length, ciphertext, tag

    def layout(self, pktsize: int, padlen: int, chan: int) -> None:
        """Have the views of full packets with `padlen` bytes of padding, lengths and heads in place."""
        view, slot, out, out_slot = self.view, self.slot, self.out, self.out_slot
        plain_end = _SLOT_HEAD + pktsize + padlen
        if padlen != self.padlen:
            self.padlen, self.chan = padlen, -1
            self.plains, self.pads, self.sealed, self.parts = [], [], [], []
            self.short = set(range(len(self.full)))  # every length to write
            for i in range(len(self.full)):
                base, at = i * slot, i * out_slot
                self.plains.append(view[base : base + plain_end])
                self.pads.append(view[base + plain_end - padlen : base + plain_end])
                self.sealed.append(out[at + 4 : at + 4 + plain_end + _GCM_TAG])
                self.parts.append(out[at : at + 4 + plain_end + _GCM_TAG])
        if self.short:
            length = plain_end.to_bytes(4, "big")
            for i in self.short:
                out[i * out_slot : i * out_slot + 4] = length
                if chan == self.chan:
                    _DATA_HEAD_INTO(self.plains[i], 0, padlen, MSG_CHANNEL_DATA, chan, pktsize)
            self.short.clear()
        if chan != self.chan:
            self.chan = chan
            for plain in self.plains:
                _DATA_HEAD_INTO(plain, 0, padlen, MSG_CHANNEL_DATA, chan, pktsize)


def _seal_by_copy(aead: AESGCM) -> Callable[[bytes, Any, bytes, memoryview], None]:
    """`encrypt_into` for a cryptography without it: seal to a new object, copy it into place."""

    def seal(iv: bytes, data: Any, header: bytes, dest: memoryview) -> None:
        dest[:] = aead.encrypt(iv, data, header)

    return seal


def channel_read_buffers(conn: Any, pktsize: int, window: int) -> list[memoryview] | None:
    """Buffers for one socket read (`recvmsg_into`) that go straight into the next CHANNEL_DATA packets of
    at most `pktsize` bytes, `window` bytes at most; None when the direct send path does not apply (then
    read into bytes and use `send_channel_chunks`). `send_read_buffers` must follow before anything else
    reads into them."""
    if window <= 0 or not 0 < pktsize <= READ_INTO_MAX or not _direct_send(conn, conn._send_encryption):
        return None
    arenas = conn.__dict__.get("_x2ssh_arenas")
    if arenas is None:
        arenas = conn.__dict__["_x2ssh_arenas"] = {}
    arena = arenas.get(pktsize)
    if arena is None:
        arena = arenas[pktsize] = _Arena(pktsize)
    elif arena.busy:  # an earlier read's packets still wait for this turn's send: out with them first
        conn._x2ssh_flush_now()
    full = arena.full
    if window >= len(full) * pktsize:
        return full
    count, last = divmod(window, pktsize)
    return [*full[:count], full[count][:last]] if last else full[:count]


def send_read_buffers(conn: Any, send_chan: int, pktsize: int, n: int) -> None:
    """Send the first `n` bytes read into `channel_read_buffers(conn, pktsize, ...)` as CHANNEL_DATA to
    `send_chan`: the packets `send_channel_chunks` would send for the same bytes, sealed from their slots
    until a rekey falls due (the rest through asyncssh, copied out of the slots).

    Full packets are sealed by `map` over views cut once (`_Arena.layout`), with their IVs and padding
    made in one go: no Python statement per packet, which was most of the proxy's interpreter time on a
    bulk upload."""
    arena = conn._x2ssh_arenas[pktsize]
    enc = conn._send_encryption
    count = 0  # packets sealed here
    if _direct_send(conn, enc):
        cipher = enc._cipher
        aead = _aead(cipher)
        seal = aead.encrypt_into if _SEAL_INTO else _seal_by_copy(aead)
        urandom = _asyncssh_connection.os.urandom
        padlen = _data_padlen(conn, pktsize)
        plen = _SLOT_HEAD + pktsize + padlen
        room = conn._rekey_bytes - conn._rekey_bytes_sent  # bytes sealed before a rekey falls due
        fulls, last = divmod(n, pktsize)
        count = min(fulls, -(-room // plen)) if room > 0 else 0
        iv = cipher._iv
        fixed, counter = iv[:4], int.from_bytes(iv[4:], "big")
        parts: list[Any] = []
        sealed_bytes = count * plen
        if count:
            arena.layout(pktsize, padlen, send_chan)
            pads = urandom(padlen * count)
            ivs = [fixed + (c & _IV_MASK).to_bytes(8, "big") for c in range(counter, counter + count)]
            header = plen.to_bytes(4, "big")
            _consume(map(memoryview.__setitem__, arena.pads[:count], _ALL, _chunks(pads, padlen)))
            _consume(map(seal, ivs, arena.plains[:count], _repeat(header), arena.sealed[:count]))
            parts = arena.parts[:count]
            counter += count
        if last and count == fulls and sealed_bytes < room:  # a short packet at the end
            padlen = _data_padlen(conn, last)
            plen = _SLOT_HEAD + last + padlen
            header = plen.to_bytes(4, "big")
            base, at = count * arena.slot, count * arena.out_slot
            view, out = arena.view, arena.out
            _DATA_HEAD_INTO(view, base, padlen, MSG_CHANNEL_DATA, send_chan, last)
            view[base + plen - padlen : base + plen] = urandom(padlen)
            out[at : at + 4] = header
            iv = fixed + (counter & _IV_MASK).to_bytes(8, "big")
            seal(iv, view[base : base + plen], header, out[at + 4 : at + 4 + plen + _GCM_TAG])
            parts.append(out[at : at + 4 + plen + _GCM_TAG])
            arena.short.add(count)  # its full packet's length and head are put back by the next layout
            counter += 1
            count += 1
            sealed_bytes += plen
        if count:
            _sealed(conn, cipher, fixed + (counter & _IV_MASK).to_bytes(8, "big"), count, sealed_bytes, parts,
                    arena)  # fmt: skip
    for index in range(count, -(-n // pktsize)):  # a rekey fell due: asyncssh's path, the bytes copied out
        chunk = arena.full[index]
        send_channel_data(conn, send_chan, bytes(chunk[: min(pktsize, n - index * pktsize)]))


_ALL = itertools.repeat(slice(None))  # (map stops at its shortest argument)
_repeat = itertools.repeat
_consume = collections.deque(maxlen=0).extend  # runs an iterator to its end, keeping nothing


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class DirectDataHandler:
    """A channel the receive fast path hands its DATA payloads, window adjusts, open confirmation, EOF and
    CLOSE straight to.

    Each is called only for a well-formed packet (the exact length, a packet size above zero); the channel
    checks its own state, as in `process_packet`, and raises `ProtocolError` on a packet out of turn."""

    __slots__ = ()

    def receive_data(self, data: bytes) -> None:
        """A CHANNEL_DATA payload: bytes, or for a long one a read-only memoryview of the opened packet."""
        raise NotImplementedError

    def receive_open_confirmation(self, send_chan: int, send_window: int, send_pktsize: int) -> None:
        """A CHANNEL_OPEN_CONFIRMATION with nothing after its four numbers."""
        raise NotImplementedError

    def receive_eof(self) -> None:
        """A CHANNEL_EOF."""
        raise NotImplementedError

    def receive_window_adjust(self, adjust: int) -> None:
        """A CHANNEL_WINDOW_ADJUST of `adjust` bytes (0 to 2**32 - 1)."""
        raise NotImplementedError

    def receive_close(self) -> None:
        """A CHANNEL_CLOSE."""
        raise NotImplementedError


# -- One SSH packet in without the detours: channel messages on an established AES-GCM connection --
#
# For each received packet asyncssh calls three shims to decrypt, slices the header and the body apart and
# together again, routes by packet type through a chain of checks, formats a log record and asks
# `inspect.isawaitable` about the handler's result. Here, on an established AES-GCM connection without
# compression, the packet is opened with the same AESGCM call (same IV sequence); a channel message
# (window adjust, data, EOF, close, request, success, failure) for a known channel goes straight to that
# channel's handler, an open confirmation or failure to the connection's (where asyncssh routes them); a
# `DirectDataHandler` takes a well-formed DATA, WINDOW_ADJUST, EOF, CLOSE and confirmation without any of
# that; and the bookkeeping after it (sequence number, next header) is asyncssh's own. Any other packet, an
# unknown channel, a bad tag or a short packet is handed to asyncssh's `_recv_packet` as it is,
# with the bytes already opened (a stand-in receive cipher returns them), so its checks and errors apply.

_OPEN_REPLIES = (MSG_CHANNEL_OPEN_CONFIRMATION, MSG_CHANNEL_OPEN_FAILURE)
_CHANNEL_MSGS = frozenset((*_OPEN_REPLIES, *range(MSG_CHANNEL_WINDOW_ADJUST, MSG_CHANNEL_FAILURE + 1)))
_original_recv_packet = SSHConnection._recv_packet


class _Opened:
    """Stands in for the receive cipher while asyncssh handles a packet the direct path already opened."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | None) -> None:
        self.data = data

    def decrypt_packet(
        self, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes
    ) -> bytes | None:
        return self.data


def _recv_packet_fast(self: SSHConnection) -> bool:
    enc = self._recv_encryption
    if enc.__class__ is not GCMEncryption or self._decompressor is not None or not self._auth_complete:
        return _original_recv_packet(self)
    rem = 4 + self._pktlen + self._recv_macsize - self._recv_blocksize
    inpbuf = self._inpbuf
    if len(inpbuf) < rem:
        return False
    first = self._packet
    cipher = enc._cipher
    iv = cipher._iv
    try:
        data: bytes | None = _aead(cipher).decrypt(iv, first[4:] + inpbuf[:rem], first[:4])
    except InvalidTag:
        data = None
    cipher._iv = iv[:4] + ((int.from_bytes(iv[4:], "big") + 1) & _IV_MASK).to_bytes(8, "big")  # _next_iv
    return _dispatch_opened(self, enc, data, rem)


def _dispatch_opened(self: SSHConnection, enc: Any, data: bytes | None, rem: int) -> bool:
    """Handle the packet opened as `data` (None: bad tag) whose last `rem` bytes start `self._inpbuf`."""
    if not data or not data[0]:
        return _recv_opened(self, enc, data)
    end = len(data) - data[0]
    if end < 6 or data[1] not in _CHANNEL_MSGS:
        return _recv_opened(self, enc, data)
    inpbuf = self._inpbuf
    # The channel a DATA, EOF, CLOSE or OPEN_CONFIRMATION goes straight to (inline: a call less per packet),
    # or None: asyncssh handles the packet, with its checks and errors. A confirmation is taken here only as
    # asyncssh would take it: a packet size above zero, and no compression (asyncssh lowers the packet size
    # by one for dropbear with compression).
    chan: Any = None
    pkttype = data[1]
    if SSHLogger._debug_level < PACKET_DEBUG_LEVEL and (
        end >= 10 and int.from_bytes(data[6:10], "big") == end - 10
        if pkttype == MSG_CHANNEL_DATA
        else end == _DIRECT_LENGTH[pkttype]
        and not (
            pkttype == MSG_CHANNEL_OPEN_CONFIRMATION and (self._compressor or data[14:18] == _NO_PKTSIZE)
        )
    ):
        chan = self._channels.get(int.from_bytes(data[2:6], "big"))
        if not isinstance(chan, DirectDataHandler):
            chan = None
    if chan is None:
        packet = SSHPacket(data[1:end])
        pkttype = packet.get_byte()
        if pkttype in _OPEN_REPLIES:
            handler: Any = self  # the connection matches the reply to its channel, as asyncssh routes it
        else:
            handler = self._channels.get(packet.get_uint32())
            if handler is None:
                return _recv_opened(self, enc, data)
    seq = self._recv_seq
    self._inpbuf = inpbuf[rem:]
    self._packet = b""
    if chan is None:
        if SSHLogger._debug_level >= PACKET_DEBUG_LEVEL:
            handler.log_received_packet(pkttype, seq, packet)
        try:
            result = handler.process_packet(pkttype, seq, packet)
        except PacketDecodeError as exc:
            raise ProtocolError(str(exc)) from None
        if result is not True:  # asyncssh's handlers of these types always answer True
            raise RuntimeError(f"asyncssh channel handler returned {result!r}; x2ssh.ssh.tuning needs review")
    elif pkttype == MSG_CHANNEL_DATA:
        chan.receive_data(data[10:end])
    elif pkttype == MSG_CHANNEL_WINDOW_ADJUST:
        chan.receive_window_adjust(int.from_bytes(data[6:10], "big"))
    elif pkttype == MSG_CHANNEL_CLOSE:
        chan.receive_close()
    elif pkttype == MSG_CHANNEL_EOF:
        chan.receive_eof()
    else:  # the confirmation: the server's channel, window and packet size
        chan.receive_open_confirmation(
            int.from_bytes(data[6:10], "big"),
            int.from_bytes(data[10:14], "big"),
            int.from_bytes(data[14:18], "big"),
        )
    # asyncssh's _finish_recv_packet, inline (see the note before _direct_data_channel)
    self._auth_final = True
    if self._transport:
        self._recv_seq = (seq + 1) & 0xFFFFFFFF
    self._recv_handler = self._recv_pkthdr
    return True


# asyncssh's `_finish_recv_packet` after a connection-protocol packet: authentication is final, the
# sequence number moves on while the transport is open (the rollover check applies only before the first
# key exchange, the reset only to NEWKEYS) and the parser awaits a header. For the channel messages
# handled here (an established connection, so the receive cipher is set) it is those three assignments,
# done inline: a call less per received packet, about four per flow.


def _direct_data_channel(self: SSHConnection, data: bytes, end: int) -> DirectDataHandler | None:
    """The channel an opened DATA packet (`data`, payload up to `end`) goes straight to, or None."""
    if data[1] != MSG_CHANNEL_DATA or end < 10:
        return None
    chan = self._channels.get(int.from_bytes(data[2:6], "big"))
    if isinstance(chan, DirectDataHandler) and int.from_bytes(data[6:10], "big") == end - 10:
        return chan
    return None


_VIEW_MIN = 2048  # payloads from this size on reach `DirectDataHandler.receive_data` as a memoryview

# By message type, the payload length of each other message a `DirectDataHandler` takes straight (type and
# channel, the adjust's byte count, the confirmation's three numbers), 0 for the rest: another length goes
# through asyncssh's parsing and errors. A tuple, so the lookup is an index, not a call.
_ADJUST_LENGTH = 10
_DIRECT_LENGTH = tuple(
    {
        MSG_CHANNEL_EOF: 6,
        MSG_CHANNEL_CLOSE: 6,
        MSG_CHANNEL_WINDOW_ADJUST: _ADJUST_LENGTH,
        MSG_CHANNEL_OPEN_CONFIRMATION: 18,
    }.get(t, 0)
    for t in range(256)
)
_NO_PKTSIZE = bytes(4)


def _recv_opened(self: SSHConnection, enc: Any, data: bytes | None) -> bool:
    """asyncssh's own `_recv_packet` for a packet whose bytes were already opened (`data`; None: bad tag)."""
    stand_in = _Opened(data)
    self._recv_encryption = stand_in  # type: ignore[assignment]
    try:
        return _original_recv_packet(self)
    finally:
        if self._recv_encryption is stand_in:  # a NEWKEYS handled meanwhile installed a new cipher: keep it
            self._recv_encryption = enc


# One level up, GCMEncryption splits the sealed packet into body and tag, and asyncssh joins them again
# (`packet + mac`) before the socket write; on receipt it joins the body's two parts and then the tag.
# Each join copies the whole packet. Here the sealed packet is returned whole with an empty tag (asyncssh
# adds b"", which costs nothing), and a received packet is joined once: the same bytes on the wire.


def _gcm_encrypt_packet(self: GCMEncryption, seq: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
    cipher = self._cipher
    sealed = _aead(cipher).encrypt(cipher._iv, packet, header)
    cipher._update_iv()
    return header + sealed, b""


def _gcm_decrypt_packet(
    self: GCMEncryption, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes
) -> bytes | None:
    cipher = self._cipher
    try:
        opened: bytes | None = _aead(cipher).decrypt(
            cipher._iv, b"".join((first[header_len:], rest, mac)), first[:header_len]
        )
    except InvalidTag:
        opened = None
    cipher._update_iv()
    return opened


_original_gcm_encrypt_packet = GCMEncryption.encrypt_packet
_original_gcm_decrypt_packet = GCMEncryption.decrypt_packet


# -- Starting to read a new channel without a task --
#
# Once a channel is open, asyncssh starts its reading with `conn.create_task(chan._start_reading())`: a
# coroutine, a Task, a done-callback and a set entry per channel, for a coroutine that never waits. Here
# that one coroutine is run to its end from a plain callback at the same point of the loop (the next turn,
# where the task's first step would run); an error it raises goes to the connection's task reaper, exactly
# as the task's would. Every other task is created as before.

_original_create_task = SSHConnection.create_task
_START_READING = SSHChannel._start_reading.__code__


def _create_task(self: SSHConnection, coro: Any, task_logger: Any = None) -> Any:
    if getattr(coro, "cr_code", None) is _START_READING:
        self._loop.call_soon(_run_to_end, self, coro, task_logger)
        return None  # asyncssh drops this task handle at every call site
    return _original_create_task(self, coro, task_logger)


def _run_to_end(conn: SSHConnection, coro: Any, task_logger: Any) -> None:
    try:
        coro.send(None)
    except StopIteration:
        return
    except BaseException as exc:  # reported exactly as asyncssh reports a failed task
        failed = conn._loop.create_future()
        failed.set_exception(exc)
        conn._reap_task(task_logger, failed)  # type: ignore[arg-type]
        return
    coro.close()  # it waited on something: not the asyncssh this was written for
    raise RuntimeError("asyncssh's SSHChannel._start_reading suspended; x2ssh.ssh.tuning needs review")


# -- The keepalive timer: moved lazily instead of replaced on every read --
#
# With keepalives on, asyncssh cancels its keepalive timer and schedules a new one each time bytes
# arrive from the server: a TimerHandle per socket read, and cancelled handles piling up in the loop's
# heap. Here a read only pushes a deadline forward; when the timer fires before that deadline it is
# armed again for the deadline, so the keepalive still goes out one interval after the last bytes
# received, as before.

_original_reset_keepalive = SSHConnection._reset_keepalive_timer
_original_keepalive_callback = SSHConnection._keepalive_timer_callback


def _reset_keepalive_timer(self: SSHConnection) -> None:
    timer = self._keepalive_timer
    if self._auth_complete and self._keepalive_interval and timer is not None:
        due = self._loop.time() + self._keepalive_interval
        if due >= timer.when():  # not when a shorter interval was just set: that one is rescheduled
            self.__dict__["_x2ssh_keepalive_due"] = due
            return
    self.__dict__.pop("_x2ssh_keepalive_due", None)
    _original_reset_keepalive(self)


def _keepalive_timer_callback(self: SSHConnection) -> None:
    due = self.__dict__.pop("_x2ssh_keepalive_due", None)
    if due is not None and due > self._loop.time():
        self._keepalive_timer = self._loop.call_at(due, self._keepalive_timer_callback)
        return
    _original_keepalive_callback(self)


# -- Random padding from a pool instead of a getrandom() per packet --
#
# Every SSH packet carries 4-19 bytes of random padding, which asyncssh takes with os.urandom: one
# system call per packet. Here asyncssh.connection sees an `os` whose urandom hands out slices of a
# 4 KiB block drawn from os.urandom (so the same kernel CSPRNG, a call per ~400 packets); everything
# else it uses from `os` is the real module. A request larger than the pool goes to os.urandom.

RANDOM_POOL = 4096


class _OsWithPooledRandom:
    """The `os` module as asyncssh.connection uses it, with urandom served from a pool."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._pool = b""
        self._at = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def urandom(self, n: int) -> bytes:
        at = self._at
        if at + n > len(self._pool):
            if n > RANDOM_POOL:
                return self._real.urandom(n)
            self._pool, at = self._real.urandom(RANDOM_POOL), 0
        self._at = at + n
        return self._pool[at : at + n]


# -- The receive buffer: fed in slices, so parsing it is not quadratic --
#
# asyncssh appends each socket read (up to 256 KiB from asyncio) to a bytes buffer and, for every SSH
# packet it parses, slices the packet off the front: two copies of everything still behind it. A read of
# eight 32 KiB packets thus copies about a megabyte (about 9 % of a bulk download's CPU, profiled with
# py-spy). Here a large read is handed over in slices of INPUT_SLICE bytes, each parsed before the next is
# appended: the same bytes in the same order through the same parser, with a short buffer behind each
# packet. Once the connection is closing, the rest of the read is not fed, as asyncssh's parser stops at
# the first error.

INPUT_SLICE = 64 * 1024
_original_data_received = SSHConnection.data_received


def _data_received_in_slices(self: SSHConnection, data: bytes, datatype: Any = None) -> None:
    if len(data) <= INPUT_SLICE:
        _original_data_received(self, data, datatype)
        return
    view = memoryview(data)
    for start in range(0, len(data), INPUT_SLICE):
        if self._transport is None:
            return
        self._inpbuf += view[start : start + INPUT_SLICE]
        self._recv_data()


# -- The receive buffer: parsed in place on an established AES-GCM connection --
#
# Even in slices, each received byte is copied about five times before a channel sees it: appended to the
# buffer, the rest of the buffer sliced off behind the packet's first block and again behind the packet,
# and the first block joined to the rest to be opened (about 15 % of a bulk download's CPU in memmove,
# profiled with perf). Here each complete packet of a socket read is opened straight from the read (a view:
# AES-GCM takes its length as associated data and the rest as ciphertext and tag), in order, with the same
# IV sequence; only a packet split across two reads is joined once, and what follows the last complete
# packet is kept for the next read as asyncssh keeps it (its parser takes over at any point). A DATA or
# WINDOW_ADJUST packet for a `DirectDataHandler` goes straight to it; every other packet goes through
# `_dispatch_opened`, as on the per-packet direct path. Anything unusual (too long, a bad tag, a new key, a
# handler that waits, the connection closing, another cipher, packet debugging) stops this parser: the rest
# of the read goes to asyncssh's own parser, which then reports the same errors as always.


def _data_received_in_place(self: SSHConnection, data: bytes, datatype: Any = None) -> None:
    # (Once per socket read, so the checks are inline, the usual outcome first: every read of an
    # interactive flow's answer comes through here.)
    enc = self._recv_encryption
    if (
        enc.__class__ is not GCMEncryption
        or self._decompressor is not None
        or not self._auth_complete
        or self._transport is None
        or SSHLogger._debug_level >= PACKET_DEBUG_LEVEL
    ):
        _data_received_in_slices(self, data, datatype)
        return
    handler = self._recv_handler
    if handler != self._recv_pkthdr:
        if handler != self._recv_packet:  # a packet's handler is still at work: asyncssh buffers
            _data_received_in_slices(self, data, datatype)
            return
        # asyncssh's parser took the first block of a packet it awaits: GCM leaves that block as it is
        # (the length is plain), so it goes back in front of the buffer
        self._inpbuf = self._packet + self._inpbuf
        self._packet = b""
        self._recv_handler = self._recv_pkthdr
    self._reset_keepalive_timer()
    try:
        rest = _parse_in_place(self, enc, data)
    except DisconnectError as exc:  # as asyncssh's _recv_data
        self._send_disconnect(exc.code, exc.reason, exc.lang)
        self._force_close(exc)
        return
    except Exception:
        self.internal_error()
        return
    if rest:  # left to asyncssh's parser
        _data_received_in_slices(self, rest, datatype)


def _parse_in_place(self: SSHConnection, enc: Any, data: bytes) -> bytes:
    """Open and handle the complete packets of `self._inpbuf` + `data`; keep an incomplete one in
    `self._inpbuf`. Returns what asyncssh's parser must take from here (b"" when nothing)."""
    start = 0
    held = self._inpbuf
    if held:  # complete the packet the last read began
        if len(held) < 4:
            start = 4 - len(held)
            held += data[:start]
            if len(held) < 4:
                self._inpbuf = held
                return b""
        pktlen = int.from_bytes(held[:4], "big")
        if pktlen > self._max_recv_pktlen or pktlen < self._recv_blocksize:
            self._inpbuf = b""
            return held + data[start:]  # asyncssh's parser refuses it
        need = 4 + pktlen + self._recv_macsize - len(held)
        if need > len(data) - start:
            self._inpbuf = held + data[start:]
            return b""
        first = held + memoryview(data)[start : start + need]
        self._inpbuf = b""
        stop, refused = _open_packets(self, enc, first)
        if refused:
            return first[stop:] + data[start + need :]
        start += need
    stop, refused = _open_packets(self, enc, data, start)
    if refused or self._recv_encryption is not enc:
        return data[stop:]
    if self._transport is not None:
        self._inpbuf += data[stop:]  # an incomplete packet, or the rest while a handler is at work
    return b""


def _open_packets(self: SSHConnection, enc: Any, buf: bytes, pos: int = 0) -> tuple[int, bool]:
    """Open and handle the complete packets in `buf` from `pos` while this path applies. Returns where it
    stopped and whether it stopped at a packet it leaves to asyncssh (too long or short, a bad tag)."""
    view = memoryview(buf)
    n = len(buf)
    macsize = self._recv_macsize
    blocksize = self._recv_blocksize
    max_pktlen = self._max_recv_pktlen
    cipher = enc._cipher
    aead = _aead(cipher)
    pkthdr = self._recv_pkthdr
    while (
        n - pos >= blocksize
        and self._recv_handler == pkthdr
        and self._recv_encryption is enc
        and self._transport is not None
    ):
        pktlen = int.from_bytes(buf[pos : pos + 4], "big")
        if pktlen > max_pktlen or pktlen < blocksize:
            return pos, True
        end = pos + 4 + pktlen + macsize
        if end > n:
            break
        iv = cipher._iv
        try:
            data = aead.decrypt(iv, view[pos + 4 : end], view[pos : pos + 4])
        except InvalidTag:
            return pos, True  # asyncssh's parser opens it again and reports the bad MAC
        cipher._iv = iv[:4] + ((int.from_bytes(iv[4:], "big") + 1) & _IV_MASK).to_bytes(8, "big")  # _next_iv
        # A DATA packet and a WINDOW_ADJUST (on upload, one per ~7 packets sent: sshd tops up the window
        # every 96 KiB) go straight to their channel here: the type first, so another control packet
        # (confirmation, EOF, CLOSE) costs no lookup before `_dispatch_opened`.
        chan = None
        pkttype = data[1]
        if pkttype == MSG_CHANNEL_DATA and data[0]:
            payload_end = len(data) - data[0]
            chan = _direct_data_channel(self, data, payload_end)
        elif pkttype == MSG_CHANNEL_WINDOW_ADJUST and data[0] and len(data) - data[0] == _ADJUST_LENGTH:
            chan = self._channels.get(int.from_bytes(data[2:6], "big"))
            if not isinstance(chan, DirectDataHandler):
                chan = None
        if chan is not None:
            seq = self._recv_seq
            if pkttype == MSG_CHANNEL_DATA:
                # A bulk payload is handed over as a view of the opened packet, not sliced into a copy
                # (32 KiB per packet on a download); a short one as bytes (a view costs more than it saves).
                if payload_end >= _VIEW_MIN:
                    chan.receive_data(memoryview(data)[10:payload_end])
                else:
                    chan.receive_data(data[10:payload_end])
            else:
                chan.receive_window_adjust(int.from_bytes(data[6:10], "big"))
            # asyncssh's _finish_recv_packet, inline (see the note before _direct_data_channel)
            self._auth_final = True
            if self._transport:
                self._recv_seq = (seq + 1) & 0xFFFFFFFF
            self._recv_handler = pkthdr
        else:  # as the per-packet direct path, with asyncssh's state set up for this one packet
            self._packet = buf[pos : pos + blocksize]
            self._pktlen = pktlen
            self._inpbuf = buf[pos + blocksize : end]
            _dispatch_opened(self, enc, data, end - pos - blocksize)
            self._inpbuf = b""
        pos = end
    return pos, False


# (class, attribute, replacement, asyncssh's own): what `install` swaps in and `uninstall` puts back.
_PATCHES: tuple[tuple[Any, str, Any, Any], ...] = (
    (SSHPacketLogger, "_log_packet", _log_packet_when_debugging, _original_log_packet),
    (SSHLogger, "log", _log_when_enabled, _original_log),
    (SSHLogger, "debug1", _debug1_when_enabled, _original_debug1),
    (SSHLogger, "info", _info_when_enabled, _original_info),
    (SSHConnection, "send_packet", _send_packet_fast, _original_send_packet),
    (SSHConnection, "_recv_packet", _recv_packet_fast, _original_recv_packet),
    (GCMEncryption, "encrypt_packet", _gcm_encrypt_packet, _original_gcm_encrypt_packet),
    (GCMEncryption, "decrypt_packet", _gcm_decrypt_packet, _original_gcm_decrypt_packet),
    (SSHConnection, "create_task", _create_task, _original_create_task),
    (SSHConnection, "_reset_keepalive_timer", _reset_keepalive_timer, _original_reset_keepalive),
    (SSHConnection, "_keepalive_timer_callback", _keepalive_timer_callback, _original_keepalive_callback),
    (SSHConnection, "data_received", _data_received_in_place, _original_data_received),
)


_installed = False  # send_channel_data's direct path is one of the adjustments


def install() -> None:
    """Apply the adjustments (idempotent)."""
    global _installed
    _installed = True
    for owner, name, replacement, _ in _PATCHES:
        setattr(owner, name, replacement)
    if not isinstance(_asyncssh_connection.os, _OsWithPooledRandom):
        _asyncssh_connection.os = _OsWithPooledRandom(os)  # type: ignore[attr-defined,assignment]


def uninstall() -> None:
    """Undo `install` (for tests that compare with asyncssh's own behaviour)."""
    global _installed
    _installed = False
    for owner, name, _, original in _PATCHES:
        setattr(owner, name, original)
    _asyncssh_connection.os = os  # type: ignore[attr-defined]


_writev = getattr(os, "writev", None)  # not on Windows: there the joined bytes go through asyncio
IOV_MAX = 1024  # Linux's limit on buffers per writev
_SOCKET_TRANSPORTS = "asyncio.selector_events"  # where asyncio's own socket transport lives


def coalesce_sends(conn: Any) -> None:
    """Send everything one event-loop turn produced for `conn` with one socket write.

    asyncssh writes each SSH packet (at most 32 KiB of channel data: sshd's limit) to the socket on its
    own; a netstack batch yields many of them. Gathering them saves a system call per packet; the order is
    unchanged and nothing waits longer than the current loop turn. When asyncio holds nothing unsent for
    the socket, the packets go out with one `writev` straight from where they are (no joined copy), and
    only what the socket did not take is handed to asyncio's transport.
    """
    send = getattr(conn, "_send", None)
    if send is None:
        return
    pending: list[Any] = []
    lent: list[Any] = []  # arenas whose slots `pending` holds views of (see send_read_buffers)
    loop = asyncio.get_running_loop()
    defer = loop.call_soon  # when the gathered packets leave (see `flush_sends_with`)
    own_transport = getattr(conn, "_transport", None)

    def flush() -> None:
        if not pending:  # flushed early (`_x2ssh_flush_now`) since this call was scheduled
            return
        parts = pending.copy()
        pending.clear()
        try:
            _write_out(parts)
        finally:
            for arena in lent:
                arena.busy = False
            lent.clear()

    def _write_out(parts: list[Any]) -> None:
        transport = getattr(conn, "_transport", None)
        if transport is None and own_transport is not None:
            # asyncssh's `_force_close` (right after it sent a DISCONNECT, say) forgets the transport and
            # aborts it on the loop's next turn: what it sent before that still leaves, as it did when each
            # packet was written at once. (After the abort nothing does: asyncssh's own `_send` drops it.)
            if not own_transport.is_closing():
                with contextlib.suppress(ConnectionError):
                    own_transport.write(b"".join(parts))
            return
        if len(parts) > 1 and transport is not None:
            rest = write_gathered(transport, parts)
            if rest is not None:
                for part in rest:  # (a view of a lent slot is copied: the transport may keep what it gets)
                    send(bytes(part) if type(part) is memoryview and type(part.obj) is not bytes else part)
                return
        send(b"".join(parts))

    def coalescing_send(data: bytes) -> None:
        if not pending:
            defer(flush)
        pending.append(data)

    def coalescing_send_many(parts: list[Any], arena: Any = None) -> None:  # several packets' parts at once
        if not pending:
            defer(flush)
        pending.extend(parts)
        if arena is not None:
            arena.busy = True
            lent.append(arena)

    def set_defer(schedule: Callable[[Callable[[], None]], None]) -> None:
        nonlocal defer
        defer = schedule

    coalescing_send.many = coalescing_send_many  # type: ignore[attr-defined]  # see _sealed
    conn._send = coalescing_send
    conn._x2ssh_set_defer = set_defer
    conn._x2ssh_flush_now = flush


def flush_sends_with(conn: Any, defer: Callable[[Callable[[], None]], None]) -> None:
    """Have the packets `coalesce_sends` gathers for `conn` leave through `defer(flush)` instead of on the
    loop's next turn: `netstack.aio.TunStack.defer` sends them at the end of the netstack batch that wrote
    them (a request from the app leaves a loop turn earlier, still with one write per batch). `defer` must
    run the flush no later than the loop's next turn. A no-op for a connection `coalesce_sends` did not
    wrap."""
    set_defer = getattr(conn, "_x2ssh_set_defer", None)
    if set_defer is not None:
        set_defer(defer)


def write_gathered(transport: Any, parts: list[bytes]) -> list[Any] | None:
    """`writev` `parts` to the transport's socket if asyncio has nothing queued for it: the buffers it did
    not take, in order (empty if none; the first may be a view of a part's tail), or None when this does
    not apply (asyncio's own write then takes everything).

    The caller hands what is returned to the transport's `write`, each in turn, so the order on the socket is
    kept; asyncio copies them into its buffer once (they are not joined first: a large batch that meets a
    full socket, e.g. a 1 MiB client read on upload, would otherwise be copied twice)."""
    if type(transport).__module__ != _SOCKET_TRANSPORTS:
        # A ProxyCommand's pipe, or the channel of a jump host, whose "socket" is the outer connection's.
        return None
    if _writev is None or transport.is_closing() or transport.get_write_buffer_size():
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    whole = len(parts) <= IOV_MAX
    try:
        sent = _writev(sock.fileno(), parts if whole else parts[:IOV_MAX])
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        return None  # asyncio's write meets the same error and closes the transport its own way
    if whole and sent == sum(map(len, parts)):  # the usual case, without a Python step per part
        return []
    for i, part in enumerate(parts):
        if sent < len(part):
            return [memoryview(part)[sent:] if sent else part, *parts[i + 1 :]]
        sent -= len(part)
    return []


async def ping(conn: Any) -> None:
    """One round trip on `conn` (a keepalive@openssh.com global request, as OpenSSH's ServerAlive sends).

    Any answer, even "request failed", proves the connection carries traffic both ways. asyncssh has no
    public call for it; its keepalive timer uses the same private method.
    """
    await conn._make_global_request(b"keepalive@openssh.com")
