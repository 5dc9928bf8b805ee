"""Small servers the lab runs inside its namespaces (stdlib only; run as a script, one server per process).

    python3 lab_servers.py http --dir DIR --port 80      files from DIR over HTTP/1.1 (keep-alive)
    python3 lab_servers.py tcp-echo --port 7             echoes every byte back; half-close answered by FIN
    python3 lab_servers.py udp-echo --port 7             echoes every datagram back to its sender

Each listens dual-stack (IPv4 and IPv6) on every address of its namespace and prints "ready" on stdout once
bound, so the caller can wait without polling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import socket
import sys
from pathlib import Path

CHUNK = 256 * 1024


def _raise_fd_limit() -> None:
    # Scale scenarios hold 10,000+ connections open on one process.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _dual_stack_socket(kind: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(4096)
    sock.setblocking(False)
    return sock


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    # asyncio sets TCP_NODELAY only on sockets created with proto=IPPROTO_TCP, which accepted sockets of a
    # listener made by socket.socket() are not; a server answering in pieces must not wait on Nagle.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- TCP echo ----------------------------------------------------------------------------------------------


async def _echo_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    _no_delay(writer)
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def tcp_echo(port: int) -> None:
    server = await asyncio.start_server(_echo_client, sock=_dual_stack_socket(socket.SOCK_STREAM, port))
    _ready()
    async with server:
        await server.serve_forever()


# -- UDP echo ----------------------------------------------------------------------------------------------


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def udp_echo(port: int) -> None:
    loop = asyncio.get_running_loop()
    sock = _dual_stack_socket(socket.SOCK_DGRAM, port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    await loop.create_datagram_endpoint(_UdpEcho, sock=sock)
    _ready()
    await asyncio.Event().wait()


# -- HTTP files --------------------------------------------------------------------------------------------


async def _http_client(root: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Minimal HTTP/1.1 file server: GET/HEAD, keep-alive unless `Connection: close` or HTTP/1.0."""
    _no_delay(writer)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = [*lines[0].split(" "), "", "", ""][:3]
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
            keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            name = target.split("?", 1)[0].lstrip("/")
            path = root / name
            if method not in ("GET", "HEAD") or "/" in name or not name or not path.is_file():
                body = b"not found\n"
                writer.write(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n%s"
                    % (len(body), b"keep-alive" if keep_alive else b"close", body)
                )
            else:
                size = path.stat().st_size
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n"
                    b"Connection: %s\r\n\r\n" % (size, b"keep-alive" if keep_alive else b"close")
                )
                if method != "GET":
                    writer.write(head)
                else:
                    with open(path, "rb") as f:
                        # Headers and the first chunk in one write, as a web server does: a small answer
                        # leaves as one segment instead of meeting Nagle plus the peer's delayed ACK.
                        writer.write(head + f.read(CHUNK))
                        while chunk := f.read(CHUNK):
                            await writer.drain()
                            writer.write(chunk)
            await writer.drain()
            if not keep_alive:
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def http_files(root: Path, port: int) -> None:
    sock = _dual_stack_socket(socket.SOCK_STREAM, port)
    server = await asyncio.start_server(lambda r, w: _http_client(root, r, w), sock=sock)
    _ready()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["http", "tcp-echo", "udp-echo"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, default=Path(os.getcwd()))
    args = parser.parse_args(argv)
    _raise_fd_limit()
    if args.kind == "http":
        coro = http_files(args.dir.resolve(), args.port)
    elif args.kind == "tcp-echo":
        coro = tcp_echo(args.port)
    else:
        coro = udp_echo(args.port)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)


if __name__ == "__main__":
    main()
