"""`x2ssh -D`'s proxy against OpenSSH's `ssh -D`, same machine, same run, on loopback (needs root for sshd).

    flock /tmp/x2ssh-integration.lock .venv/bin/python -m benchmarks.socks_bench [--size-mib N] [--repeats N]

One real sshd on 127.0.0.1 and a small HTTP target (its own process) serving GET /bytes/N and draining
PUT bodies. Each proxy runs in its own process: `ssh -N -D`, and x2ssh's `SocksServer` over one asyncssh
connection (tuned as the session tunes it). curl measures single-flow throughput down and up; a small client
process measures the new-connection rate (SOCKS5 CONNECT + a 100-byte GET, each on a new connection, 16 at
a time). Prints each figure and the
ratio x2ssh / ssh -D; medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.sshd import SshServer

READY_TIMEOUT = 20.0
CHUNK = 1 << 20


# -- the target: GET /bytes/N streams N bytes, PUT drains the body -------------------------------------------


async def _target_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    block = bytes(CHUNK)
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target = lines[0].split(" ")[:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        if method == "PUT":
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            left = int(headers.get("content-length", "0"))
            while left > 0:
                data = await reader.read(min(left, 4 * CHUNK))
                if not data:
                    break
                left -= len(data)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        else:
            size = int(target.split("?")[0].rsplit("/", 1)[1]) if target.startswith("/bytes/") else 0
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size)
            while size > 0:
                part = block if size >= CHUNK else block[:size]
                writer.write(part)
                size -= len(part)
                await writer.drain()
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError, ValueError):
        pass
    finally:
        writer.close()


async def serve_target() -> None:
    server = await asyncio.start_server(_target_client, "127.0.0.1", 0, backlog=1024)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


# -- x2ssh's proxy over one asyncssh connection -----------------------------------------------------------


async def serve_proxy(workdir: Path, sshd_port: int) -> None:
    import asyncssh

    from x2ssh.frontends.socks import NameNotFound, SocksServer, SshChannelBackend
    from x2ssh.ssh import tuning
    from x2ssh.ssh.connect import PREFERRED_CIPHERS

    tuning.install()
    key = workdir / "client_ed25519"
    conn = await asyncssh.connect(
        "127.0.0.1",
        port=sshd_port,
        username="root",
        client_keys=[str(key)],
        known_hosts=str(workdir / "known_hosts"),
        encryption_algs=list(PREFERRED_CIPHERS),  # as the session connects
    )
    tuning.coalesce_sends(conn)

    async def connection() -> asyncssh.SSHClientConnection:
        return conn

    async def resolve(name: str) -> list[str]:
        raise NameNotFound(name)

    server = SocksServer(SshChannelBackend(connection, resolve), "127.0.0.1", 0)
    await server.start()
    print(f"ready {server.addresses[0][1]}", flush=True)
    await conn.wait_closed()


# -- the measurements -------------------------------------------------------------------------------------


def _started(argv: list[str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if line[:1] != ["ready"]:
        proc.kill()
        raise RuntimeError(f"{argv[:4]} did not start")
    return proc, int(line[1])


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def _curl(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "300", *args], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"curl {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def download(proxy: int, target: int, size: int) -> float:
    out = _curl("--socks5", f"127.0.0.1:{proxy}", "-o", "/dev/null", "-w", "%{size_download} %{time_total}",
                f"http://127.0.0.1:{target}/bytes/{size}")  # fmt: skip
    got, seconds = out.split()
    assert int(got) == size, (got, size)
    return size / float(seconds) / 1e6


def upload(proxy: int, target: int, path: Path) -> float:
    out = _curl("--socks5", f"127.0.0.1:{proxy}", "-T", str(path), "-o", "/dev/null", "-w",
                "%{size_upload} %{time_total}", f"http://127.0.0.1:{target}/sink")  # fmt: skip
    sent, seconds = out.split()
    assert int(sent) == path.stat().st_size
    return int(sent) / float(seconds) / 1e6


async def _rate_client(proxy: int, target: int, count: int, concurrency: int) -> float:
    """New connections per second: each one a SOCKS5 CONNECT, a small GET, and the reply read to its end."""
    request = b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + target.to_bytes(2, "big")
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
            writer.write(b"\x05\x01\x00")
            assert await reader.readexactly(2) == b"\x05\x00"
            writer.write(request)
            assert (await reader.readexactly(10))[1] == 0
            writer.write(b"GET /bytes/100 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await reader.read()).endswith(bytes(100))
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - start)


def connection_rate(proxy: int, target: int, count: int) -> float:
    """Measured by a client process of its own (curl's --parallel is slow through any SOCKS proxy)."""
    argv = [
        sys.executable,
        "-m",
        "benchmarks.socks_bench",
        "--rate-client",
        str(proxy),
        str(target),
        str(count),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"rate client failed: {done.stderr.strip()[-500:]}")
    return float(done.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.socks_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--size-mib", type=int, default=256, help="bytes per throughput run [256 MiB]")
    parser.add_argument("--connections", type=int, default=500, help="connections per rate run [500]")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--ssh-cipher",
        default=None,
        help="ssh -D's cipher (-c); default: OpenSSH's own choice (chacha20-poly1305)",
    )
    parser.add_argument("--serve-target", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--rate-client", nargs=3, type=int, metavar=("PROXY", "TARGET", "N"), help=argparse.SUPPRESS
    )
    parser.add_argument("--serve-proxy", nargs=2, metavar=("WORKDIR", "SSHD_PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rate_client:
        print(asyncio.run(_rate_client(*args.rate_client, concurrency=16)))
        return 0
    if args.serve_target:
        asyncio.run(serve_target())
        return 0
    if args.serve_proxy:
        asyncio.run(serve_proxy(Path(args.serve_proxy[0]), int(args.serve_proxy[1])))
        return 0

    size = args.size_mib * 1024 * 1024
    procs: list[subprocess.Popen[str]] = []
    with (
        tempfile.TemporaryDirectory(prefix="x2ssh-socks-bench-") as tmp,
        SshServer(Path(tmp) / "sshd") as sshd,
    ):
        workdir = Path(tmp)
        try:
            me = [sys.executable, "-m", "benchmarks.socks_bench"]
            target_proc, target = _started([*me, "--serve-target"])
            procs.append(target_proc)
            cipher = ["-c", args.ssh_cipher] if args.ssh_cipher else []
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                ssh_port = probe.getsockname()[1]
            procs.append(subprocess.Popen(sshd.ssh_command(*cipher, "-N", "-D", f"127.0.0.1:{ssh_port}"),
                                          start_new_session=True))  # fmt: skip
            _wait_port(ssh_port)
            x2_proc, x2_port = _started([*me, "--serve-proxy", str(sshd.workdir), str(sshd.port)])
            procs.append(x2_proc)
            payload = workdir / "upload.bin"
            with open(payload, "wb") as f:
                f.truncate(size)
            proxies = {"ssh -D": ssh_port, "x2ssh": x2_port}
            results: dict[str, dict[str, list[float]]] = {
                name: {"down": [], "up": [], "conn": []} for name in proxies
            }
            for _ in range(args.repeats):
                for name, port in proxies.items():  # interleaved, so drift on a shared machine hits both
                    results[name]["down"].append(download(port, target, size))
                    results[name]["up"].append(upload(port, target, payload))
                    results[name]["conn"].append(connection_rate(port, target, args.connections))
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    units = {"down": "MB/s", "up": "MB/s", "conn": "conn/s"}
    labels = {"down": "download (1 flow)", "up": "upload (1 flow)", "conn": "new conns (16 par.)"}
    cipher_name = args.ssh_cipher or "default"
    run = f"median of {args.repeats}, {args.size_mib} MiB, {args.connections} conns, ssh -c {cipher_name}"
    print(f"\n{'metric':<20}{'ssh -D':>14}{'x2ssh':>14}{'ratio':>9}   ({run})")
    for metric in ("down", "up", "conn"):
        base = statistics.median(results["ssh -D"][metric])
        ours = statistics.median(results["x2ssh"][metric])
        unit = units[metric]
        print(f"{labels[metric]:<20}{base:>9.1f} {unit:<5}{ours:>8.1f} {unit:<5}{ours / base:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
