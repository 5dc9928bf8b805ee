"""Measurement clients the harness runs inside a namespace (stdlib only; one JSON object on stdout).

    python3 clients.py http-rate --host H --port P --path /1k.bin --concurrency 50 --duration 5
    python3 clients.py rr --host H --port P --count 2000 --size 64
    python3 clients.py dns --server S --name lab.test --count 1000
    python3 clients.py idle-flows --host H --port P --count 1000 --hold 3
    python3 clients.py nagle --host H --port P --path /1k.bin --rounds 50
    python3 clients.py port-scan --host H --first-port 20000 --ports 3000 --parallel 500 --duration 5

Latencies are reported as percentiles computed here (the raw per-request samples would be huge).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import struct
import sys
import time


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- HTTP connection rate ----------------------------------------------------------------------------------


async def _socks5_connect(
    proxy: tuple[str, int], host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to `host` (an IPv4 or IPv6 address) through the SOCKS5 proxy at `proxy` (RFC 1928,
    no authentication): greeting, then CONNECT, each answer awaited as a plain SOCKS client does."""
    reader, writer = await asyncio.open_connection(*proxy)
    try:
        writer.write(b"\x05\x01\x00")
        if await reader.readexactly(2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 proxy refused the no-authentication method")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        kind = b"\x04" if family == socket.AF_INET6 else b"\x01"
        writer.write(b"\x05\x01\x00" + kind + socket.inet_pton(family, host) + port.to_bytes(2, "big"))
        reply = await reader.readexactly(4)
        if reply[1] != 0:
            raise ConnectionError(f"SOCKS5 reply code {reply[1]}")
        await reader.readexactly({1: 4, 4: 16}.get(reply[3], 0) + 2)  # the bound address
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _one_request(host: str, port: int, request: bytes, socks: tuple[str, int] | None = None) -> float:
    """One short request on a new connection (through `socks` if given); returns time to first response
    byte (s)."""
    start = time.perf_counter()
    if socks is None:
        reader, writer = await asyncio.open_connection(host, port)
    else:
        reader, writer = await _socks5_connect(socks, host, port)
    try:
        writer.write(request)
        await writer.drain()
        first = await reader.read(1)
        if not first:
            raise ConnectionError("closed before any response byte")
        ttfb = time.perf_counter() - start
        head = first + await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode("latin-1"))
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        return ttfb
    finally:
        writer.close()


async def http_rate(
    host: str, port: int, path: str, concurrency: int, duration: float, socks: tuple[str, int] | None = None
) -> dict:
    netloc = f"[{host}]" if ":" in host else host
    request = f"GET {path} HTTP/1.1\r\nHost: {netloc}\r\nConnection: close\r\n\r\n".encode()
    ttfbs: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < deadline:
            try:
                ttfbs.append(await asyncio.wait_for(_one_request(host, port, request, socks), 10))
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                errors.append(type(exc).__name__ + ": " + str(exc))
                await asyncio.sleep(0.01)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "requests": len(ttfbs),
        "errors": len(errors),
        "first_errors": sorted(set(errors))[:5],
        "elapsed_s": elapsed,
        "rate_per_s": len(ttfbs) / elapsed if elapsed else 0.0,
        "ttfb_p50_ms": _ms(percentile(ttfbs, 50)),
        "ttfb_p99_ms": _ms(percentile(ttfbs, 99)),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# -- request/response over one connection ------------------------------------------------------------------


def request_response(host: str, port: int, count: int, size: int) -> dict:
    payload = os.urandom(size)
    samples: list[float] = []
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(payload)
            got = b""
            while len(got) < size:
                chunk = sock.recv(size - len(got))
                if not chunk:
                    raise ConnectionError("echo server closed the connection")
                got += chunk
            samples.append(time.perf_counter() - start)
            if got != payload:
                raise ValueError("echo returned different bytes")
    return {
        "count": len(samples),
        "p50_us": percentile(samples, 50) * 1e6,
        "p99_us": percentile(samples, 99) * 1e6,
    }


# -- DNS lookups -------------------------------------------------------------------------------------------


def _dns_query(ident: int, name: str, qtype: int) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.strip(".").split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def dns_lookups(server: str, name: str, count: int, timeout: float) -> dict:
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    samples: list[float] = []
    failures = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((server, 53))
        for i in range(count):
            ident = (i * 7919 + 1) & 0xFFFF
            start = time.perf_counter()
            sock.send(_dns_query(ident, name, 1))
            try:
                while True:
                    reply = sock.recv(4096)
                    if len(reply) >= 12 and struct.unpack("!H", reply[:2])[0] == ident:
                        break
            except OSError:
                failures += 1
                continue
            rcode = reply[3] & 0x0F
            answers = struct.unpack("!H", reply[6:8])[0]
            if rcode != 0 or answers == 0:
                failures += 1
                continue
            samples.append(time.perf_counter() - start)
    return {
        "count": count,
        "answered": len(samples),
        "failures": failures,
        "p50_ms": _ms(percentile(samples, 50)),
        "p99_ms": _ms(percentile(samples, 99)),
    }


# -- idle flows --------------------------------------------------------------------------------------------


async def idle_flows(host: str, port: int, count: int, hold: float, parallel: int) -> dict:
    """Open `count` echo connections (each proven alive with a 1-byte echo), hold them, close them."""
    gate = asyncio.Semaphore(parallel)
    streams: list[asyncio.StreamWriter] = []
    errors: list[str] = []

    async def open_one() -> None:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 20)
                writer.write(b"x")
                await writer.drain()
                if await asyncio.wait_for(reader.readexactly(1), 20) != b"x":
                    raise ValueError("wrong echo")
                streams.append(writer)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                errors.append(type(exc).__name__ + ": " + str(exc))

    start = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(count)))
    opened_in = time.perf_counter() - start
    sys.stderr.write(f"holding {len(streams)} flows\n")
    await asyncio.sleep(hold)
    for writer in streams:
        writer.close()
    return {
        "requested": count,
        "opened": len(streams),
        "failed": len(errors),
        "first_errors": sorted(set(errors))[:5],
        "open_s": opened_in,
    }


# -- write, write, read with Nagle on -----------------------------------------------------------------------


def _read_http_response(sock: socket.socket, pending: bytearray) -> None:
    """Consume one HTTP response (headers, Content-Length body) from `sock`; leftovers stay in `pending`."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection mid-response")
        pending += chunk
    head, _, _ = bytes(pending).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode("latin-1"))
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    total = len(head) + 4 + length
    while len(pending) < total:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection mid-body")
        pending += chunk
    del pending[:total]


def nagle(host: str, port: int, path: str, rounds: int) -> dict:
    """Keep-alive HTTP requests, each sent as two writes (headers, then the blank line) with Nagle on.

    The second write is small and the first is unacknowledged, so the client's kernel holds it until the
    first is ACKed; the server answers only after the blank line. A peer that delays its ACK stalls
    every round by its delayed-ACK timer.
    """
    netloc = f"[{host}]" if ":" in host else host
    head = f"GET {path} HTTP/1.1\r\nHost: {netloc}\r\n".encode()
    samples: list[float] = []
    pending = bytearray()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # Nagle on (the default), on purpose
        for _ in range(rounds):
            start = time.perf_counter()
            sock.sendall(head)
            sock.sendall(b"\r\n")
            _read_http_response(sock, pending)
            samples.append(time.perf_counter() - start)
    return {
        "rounds": len(samples),
        "p50_ms": _ms(percentile(samples, 50)),
        "p99_ms": _ms(percentile(samples, 99)),
    }


# -- a port scan ---------------------------------------------------------------------------------------------


async def port_scan(host: str, first_port: int, ports: int, parallel: int, duration: float) -> dict:
    """Connect to `ports` consecutive ports from `first_port`, `parallel` at a time, over and over until
    `duration` has passed; count how each attempt ended (a closed port should be refused at once)."""
    outcomes: dict[str, int] = {"refused": 0, "connected": 0, "timeout": 0, "other": 0}
    deadline = time.perf_counter() + duration
    next_port = 0

    async def scanner() -> None:
        nonlocal next_port
        while time.perf_counter() < deadline:
            port = first_port + next_port % ports
            next_port += 1
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
                writer.close()
                outcomes["connected"] += 1
            except ConnectionRefusedError:
                outcomes["refused"] += 1
            except TimeoutError:
                outcomes["timeout"] += 1
            except OSError:
                outcomes["other"] += 1
                await asyncio.sleep(0.01)

    start = time.perf_counter()
    await asyncio.gather(*(scanner() for _ in range(parallel)))
    elapsed = time.perf_counter() - start
    attempts = sum(outcomes.values())
    return {**outcomes, "attempts": attempts, "elapsed_s": elapsed, "rate_per_s": attempts / elapsed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("http-rate")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/1k.bin")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--socks", default=None, metavar="HOST:PORT", help="through this SOCKS5 proxy")
    p = sub.add_parser("rr")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--size", type=int, default=64)
    p = sub.add_parser("dns")
    p.add_argument("--server", required=True)
    p.add_argument("--name", default="lab.test")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--timeout", type=float, default=1.0)
    p = sub.add_parser("idle-flows")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--hold", type=float, default=3.0)
    p.add_argument("--parallel", type=int, default=200)
    p = sub.add_parser("nagle")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/1k.bin")
    p.add_argument("--rounds", type=int, default=50)
    p = sub.add_parser("port-scan")
    p.add_argument("--host", required=True)
    p.add_argument("--first-port", type=int, default=20000)
    p.add_argument("--ports", type=int, default=3000)
    p.add_argument("--parallel", type=int, default=500)
    p.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    _raise_fd_limit()
    if args.kind == "http-rate":
        socks = None
        if args.socks:
            proxy_host, _, proxy_port = args.socks.rpartition(":")
            socks = (proxy_host.strip("[]"), int(proxy_port))
        rate = http_rate(args.host, args.port, args.path, args.concurrency, args.duration, socks)
        result = asyncio.run(rate)
    elif args.kind == "rr":
        result = request_response(args.host, args.port, args.count, args.size)
    elif args.kind == "dns":
        result = dns_lookups(args.server, args.name, args.count, args.timeout)
    elif args.kind == "nagle":
        result = nagle(args.host, args.port, args.path, args.rounds)
    elif args.kind == "port-scan":
        result = asyncio.run(port_scan(args.host, args.first_port, args.ports, args.parallel, args.duration))
    else:
        result = asyncio.run(idle_flows(args.host, args.port, args.count, args.hold, args.parallel))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
