"""Fuzz the agent codec with 100,000+ seeded inputs.

Only ProtocolError may escape, and how the stream is chunked never changes the outcome.
"""

from __future__ import annotations

import random

from agent import protocol as p

SEED = 0x58325353
INPUTS = 100_000

VALID = [
    p.encode(p.Hello(1, 1, bytes(32))),
    p.encode(p.Welcome(1, 1024, "agent")),
    p.encode(p.OpenFlow(1, ("198.18.0.2", 53))),
    p.encode(p.OpenFlow(2, ("fd58:3278:7373:1::2", 443))),
    p.encode(p.OpenFlow(3, p.SERVER_RESOLVER)),
    p.encode_datagram(1, b"query"),
    p.encode_datagram(2, b"\0" * 300, ("198.19.0.2", 53)),
    p.encode_datagram(3, b"reply", ("fd58:3278:7373:2::2", 53)),
    p.encode(p.CloseFlow(4, p.CLOSE_IDLE)),
    p.encode(p.Keepalive(7, False)),
    p.encode(p.Error(1, "oops")),
    p.encode(p.Goodbye()),
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(5)
        if choice == 0 and buffer:  # flip a bit
            i = rng.randrange(len(buffer))
            buffer[i] ^= 1 << rng.randrange(8)
        elif choice == 1 and buffer:  # set a byte, biased to the header and address kinds
            i = rng.randrange(min(len(buffer), 16))
            buffer[i] = rng.choice((0, 1, 4, 6, 0x52, 0x7F, 0xFF, rng.randrange(256)))
        elif choice == 2:  # truncate
            del buffer[rng.randrange(len(buffer) + 1) :]
        elif choice == 3:  # insert random bytes
            i = rng.randrange(len(buffer) + 1)
            buffer[i:i] = rng.randbytes(rng.randint(1, 8))
        else:  # splice another frame
            buffer += rng.choice(VALID)
    return bytes(buffer)


def feed_in_chunks(rng: random.Random, data: bytes) -> tuple[list[p.Frame], str | None]:
    decoder = p.Decoder()
    frames: list[p.Frame] = []
    offset = 0
    try:
        while offset < len(data):
            size = rng.randint(1, 64)
            frames.extend(decoder.feed(data[offset : offset + size]))
            offset += size
        decoder.eof()
    except p.ProtocolError as exc:
        assert exc.reason
        return frames, exc.reason
    return frames, None


def test_fuzz_decoder() -> None:
    rng = random.Random(SEED)
    outcomes = {"ok": 0, "error": 0}
    for n in range(INPUTS):
        kind = n % 3
        if kind == 0:
            data = rng.randbytes(rng.randint(0, 48))
        elif kind == 1:
            data = mutate(rng, rng.choice(VALID))
        else:
            data = b"".join(rng.choice(VALID) for _ in range(rng.randint(1, 4)))
        whole_frames: list[p.Frame] = []
        whole_error = None
        decoder = p.Decoder()
        try:
            whole_frames = decoder.feed(data)
            decoder.eof()
        except p.ProtocolError as exc:
            whole_error = exc.reason
        chunk_frames, chunk_error = feed_in_chunks(rng, data)
        # Same verdict however the stream is cut; frames decoded before an error are a prefix.
        assert (whole_error is None) == (chunk_error is None), data.hex()
        if whole_error is None:
            assert chunk_frames == whole_frames, data.hex()
            # Whatever decodes re-encodes and decodes to the same frames (text with invalid UTF-8 is
            # replaced on decoding, so the bytes themselves may differ there).
            assert p.Decoder().feed(b"".join(p.encode(f) for f in whole_frames)) == whole_frames, data.hex()
            outcomes["ok"] += 1
        else:
            outcomes["error"] += 1
    # The fuzzer exercised both paths substantially.
    assert outcomes["ok"] > INPUTS // 10
    assert outcomes["error"] > INPUTS // 10
