"""The upload's sealing alone: `send_read_buffers` for one 512 KiB client read (16 packets of 32 KiB), against
the cipher alone for the same 16 packets. No lab, no root.

    python -m benchmarks.seal_bench [--tree DIR] [--reads 2000]
    python -m benchmarks.seal_bench --callgrind [--tree DIR]

Timing mode prints the best of `--repeats` runs: µs per read sealed, and µs for the 16 `encrypt_into` calls
alone (the cipher and its call, no allocation). Callgrind mode runs itself under valgrind twice (0 and
`--reads` reads) and prints the instructions per read, the difference of the two: the same from run to
run, where this VM's timings are not. `--tree` takes x2ssh from another checkout (to compare with an
earlier tree).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

READ = 512 * 1024
PKTSIZE = 32 * 1024


class _GcmConnection:
    """What the direct send path reads and updates of an established AES-GCM connection (not coalesced:
    the sealed packets are handed to `_send`, which drops them)."""

    def __init__(self) -> None:
        from asyncssh.encryption import GCMEncryption

        self._send_encryption = GCMEncryption.new("aes128-gcm", bytes(16), bytes(12))
        self._strict_kex = self._auth_complete = self._kex_complete = True
        self._compressor = None
        self._rekey_bytes_sent, self._rekey_bytes, self._rekey_seconds, self._rekey_time = 0, 1 << 60, 0, 0
        self._send_blocksize, self._send_enchdrlen, self._send_seq = 16, 4, 0

        def send(data: Any) -> None:
            pass

        send.many = lambda parts, arena=None: None  # type: ignore[attr-defined]
        self._send = send


def _seal(reads: int) -> None:
    from x2ssh.ssh import tuning

    tuning.install()
    conn = _GcmConnection()
    for _ in range(reads):
        tuning.channel_read_buffers(conn, PKTSIZE, 1 << 30)
        tuning.send_read_buffers(conn, 5, PKTSIZE, READ)


def _cipher(reads: int) -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, iv = AESGCM(bytes(16)), bytes(12)
    plain = memoryview(bytearray(PKTSIZE + 64))[: PKTSIZE + 16]
    sealed = memoryview(bytearray(PKTSIZE + 32))
    for _ in range(reads * READ // PKTSIZE):
        aead.encrypt_into(iv, plain, b"abcd", sealed)


def _timed(run: Any, reads: int) -> float:
    start = time.perf_counter()
    run(reads)
    return (time.perf_counter() - start) / reads * 1e6


def _instructions(tree: str, what: str, reads: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        argv = [
            sys.executable,
            "-m",
            "benchmarks.seal_bench",
            "--tree",
            tree,
            "--only",
            what,
            "--reads",
            str(reads),
        ]
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
            capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)) or ".",
        )  # fmt: skip
        found = re.search(r"Collected : (\d+)", done.stderr)
        if found is None:
            raise RuntimeError(f"no count from callgrind:\n{done.stderr[-2000:]}")
        return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.seal_bench", description=__doc__)
    parser.add_argument("--tree", default=None, help="take x2ssh from this checkout")
    parser.add_argument("--reads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--callgrind", action="store_true")
    parser.add_argument("--only", choices=("seal", "cipher"), help=argparse.SUPPRESS)  # (callgrind's runs)
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, os.path.abspath(args.tree))
    if args.only:
        (_seal if args.only == "seal" else _cipher)(args.reads or 0)
        return 0
    if args.callgrind:
        tree = os.path.abspath(args.tree or os.path.dirname(os.path.dirname(__file__)))
        reads = args.reads or 200
        for what in ("seal", "cipher"):
            per = (_instructions(tree, what, reads) - _instructions(tree, what, 0)) / reads
            print(f"{what:>6}: {per / 1e6:.3f} M instructions per {READ // 1024} KiB read")
        return 0
    reads = args.reads or 2000
    seal = min(_timed(_seal, reads) for _ in range(args.repeats))
    cipher = min(_timed(_cipher, reads) for _ in range(args.repeats))
    best = f"best of {args.repeats}"
    print(f"per {READ // 1024} KiB read ({best}): sealed {seal:.1f} µs, cipher alone {cipher:.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
