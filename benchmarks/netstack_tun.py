"""A netstack on a real TUN device, and a plain TCP client to drive it (both run inside a namespace).

``python -m benchmarks.netstack_tun serve --mode echo|sink`` opens a TUN device, routes the lab's target
prefixes into it and terminates every TCP connection in netstack: ``echo`` returns the bytes, ``sink``
discards them (acknowledging as it goes), ``hold`` keeps connections open and idle. It prints ``READY`` and
runs until stdin closes, then prints a JSON line with its stats and peak RSS.

``python -m benchmarks.netstack_tun client HOST PORT --bytes N --flows K [--echo]`` is the kernel-side app:
K connections each send N bytes (and with ``--echo`` read them back and compare). It prints one JSON line.
``python -m benchmarks.netstack_tun rr HOST PORT --count N --size 64`` times N request/response rounds over
one connection to an ``echo`` server (the netstack's own latency, no SSH) and prints percentiles in µs.
The same client drives the veth baseline, against ``serve-socket`` (a kernel-socket sink).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time

from benchmarks.clients import request_response

TARGET_V4 = "198.19.99.0/24"
TARGET_V6 = "fd58:3278:7373:99::/64"
TUN_V4 = "198.18.99.1/24"
TUN_V6 = "fd58:3278:7373:98::1/64"
CHUNK = 256 * 1024


def _pattern(seed: int, size: int) -> bytes:
    """Deterministic incompressible bytes, so both ends can check content without storing it."""
    out = bytearray()
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def _raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


# -- the netstack side --


class _Echo(asyncio.Protocol):
    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> None:
        self.transport.write_eof()


class _Sink(asyncio.Protocol):
    received = 0

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        _Sink.received += len(data)

    def eof_received(self) -> None:
        self.transport.write(b"done")
        self.transport.close()


class _Hold(asyncio.Protocol):
    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def eof_received(self) -> None:
        self.transport.close()


async def _serve(mode: str, mtu: int) -> dict:
    from netstack import StackConfig
    from netstack.aio import TunStack
    from x2ssh.host.linux.tun import open_tun

    tun = await asyncio.to_thread(
        open_tun, "nsbench0", mtu, ipaddress.ip_interface(TUN_V4), ipaddress.ip_interface(TUN_V6)
    )
    for prefix in (TARGET_V4, TARGET_V6):
        subprocess.run(["ip", "route", "add", prefix, "dev", tun.name], check=True)
    factory = {"echo": _Echo, "sink": _Sink, "hold": _Hold}[mode]
    tun_stack: TunStack

    def on_tcp(flow):  # type: ignore[no-untyped-def]
        tun_stack.accept(flow, factory)

    tun_stack = TunStack(tun.fd, config=StackConfig(mtu=mtu, max_flows=100_000), on_tcp=on_tcp)
    tun_stack.start()
    loop = asyncio.get_running_loop()
    stdin_closed = loop.create_future()
    loop.add_reader(
        sys.stdin.fileno(), lambda: stdin_closed.done() or (os.read(0, 1024) or stdin_closed.set_result(None))
    )
    print("READY", flush=True)
    started = time.process_time()
    await stdin_closed
    stats = tun_stack.stack.stats()
    cpu = time.process_time() - started
    tun_stack.close()
    tun.close()
    return {"stats": stats, "peak_rss_kib": _peak_rss_kib(), "cpu_s": cpu, "sink_bytes": _Sink.received}


# -- a kernel-socket sink for the veth baseline --


async def _serve_socket(port: int) -> dict:
    received = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        while data := await reader.read(CHUNK):
            received += len(data)
        writer.write(b"done")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host=None, port=port)  # every address, v4 and v6
    loop = asyncio.get_running_loop()
    stdin_closed = loop.create_future()
    loop.add_reader(0, lambda: stdin_closed.done() or (os.read(0, 1024) or stdin_closed.set_result(None)))
    print("READY", flush=True)
    await stdin_closed
    server.close()
    return {"sink_bytes": received, "peak_rss_kib": _peak_rss_kib()}


# -- the kernel-side client --


def _one_flow(host: str, port: int, nbytes: int, echo: bool, seed: int, result: dict) -> None:
    data = _pattern(seed, min(nbytes, 8 * 1024 * 1024))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.connect((host, port))
        sent_hash, got_hash = hashlib.sha256(), hashlib.sha256()
        got = 0

        def reader() -> None:
            nonlocal got
            while True:
                chunk = s.recv(CHUNK)
                if not chunk:
                    return
                got += len(chunk)
                got_hash.update(chunk)

        thread = threading.Thread(target=reader) if echo else None
        if thread:
            thread.start()
        sent = 0
        while sent < nbytes:
            piece = data[: min(len(data), nbytes - sent)]
            s.sendall(piece)
            if echo:
                sent_hash.update(piece)
            sent += len(piece)
        s.shutdown(socket.SHUT_WR)
        if thread:
            thread.join()
        else:
            while s.recv(CHUNK):
                pass
    result.update(
        sent=sent, received=got, sent_sha256=sent_hash.hexdigest(), received_sha256=got_hash.hexdigest()
    )


def _client(host: str, port: int, nbytes: int, flows: int, echo: bool) -> dict:
    results = [dict() for _ in range(flows)]
    threads = [
        threading.Thread(target=_one_flow, args=(host, port, nbytes, echo, i, results[i]))
        for i in range(flows)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    total = sum(r.get("sent", 0) for r in results)
    return {"elapsed_s": elapsed, "bytes": total, "gbit_s": total * 8 / elapsed / 1e9, "flows": results}


def _hold(host: str, port: int, flows: int) -> dict:
    """Open `flows` idle connections, report, then close them."""
    _raise_fd_limit(flows + 1024)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    for _ in range(flows):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.connect((host, port))
        socks.append(s)
    print(json.dumps({"open": len(socks)}), flush=True)
    sys.stdin.readline()  # wait until the caller has measured
    for s in socks:
        s.close()
    return {"closed": len(socks)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.netstack_tun")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--mode", choices=("echo", "sink", "hold"), default="echo")
    serve.add_argument("--mtu", type=int, default=65535)
    sock = sub.add_parser("serve-socket")
    sock.add_argument("--port", type=int, default=5001)
    client = sub.add_parser("client")
    client.add_argument("host")
    client.add_argument("port", type=int)
    client.add_argument("--bytes", type=int, default=10_000_000)
    client.add_argument("--flows", type=int, default=1)
    client.add_argument("--echo", action="store_true")
    rr = sub.add_parser("rr")
    rr.add_argument("host")
    rr.add_argument("port", type=int)
    rr.add_argument("--count", type=int, default=5000)
    rr.add_argument("--size", type=int, default=64)
    hold = sub.add_parser("hold")
    hold.add_argument("host")
    hold.add_argument("port", type=int)
    hold.add_argument("--flows", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        _raise_fd_limit(65536)
        out = asyncio.run(_serve(args.mode, args.mtu))
    elif args.cmd == "serve-socket":
        out = asyncio.run(_serve_socket(args.port))
    elif args.cmd == "client":
        out = _client(args.host, args.port, args.bytes, args.flows, args.echo)
    elif args.cmd == "rr":
        out = request_response(args.host, args.port, args.count, args.size)  # the harness's rr client
    else:
        out = _hold(args.host, args.port, args.flows)
    print(json.dumps(out), flush=True)
    failed = [f["error"] for f in out.get("flows", []) if "error" in f]
    if failed:
        sys.exit(f"{len(failed)} flow(s) failed: {failed[0]}")


if __name__ == "__main__":
    main()
