"""asyncssh's own local port forwarding, as a benchmark baseline (run inside the client namespace).

    python3 asyncssh_forward.py --host H --port 22 --user root --key KEY --known-hosts KH \
        --forward 127.0.0.1:18080:198.19.0.2:80 [--forward ...]

Prints "ready" once every listener is up, then forwards until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import asyncssh


async def forward(args: argparse.Namespace) -> None:
    async with asyncssh.connect(
        args.host,
        port=args.port,
        username=args.user,
        client_keys=[args.key],
        known_hosts=args.known_hosts,
        config=[],
        encryption_algs=[args.cipher] if args.cipher else (),
    ) as conn:
        for spec in args.forward:
            listen_host, listen_port, dest_host, dest_port = spec.rsplit(":", 3)
            await conn.forward_local_port(listen_host, int(listen_port), dest_host, int(dest_port))
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await conn.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=22)
    parser.add_argument("--user", default="root")
    parser.add_argument("--key", required=True)
    parser.add_argument("--known-hosts", required=True)
    parser.add_argument("--cipher", default=None, help="the only cipher to offer (default: asyncssh's list)")
    parser.add_argument("--forward", action="append", default=[], help="LHOST:LPORT:DHOST:DPORT")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(forward(args))


if __name__ == "__main__":
    main()
