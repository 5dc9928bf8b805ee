"""A userspace stand-in for `tc netem` on kernels built without sch_netem (stdlib only; run as a script).

    python3 impair.py --tun imp0 --dev veth-srv --peer-mac 02:..:ff --delay-ms 50 --loss 1

Theory of operation: the lab routes packets for the link's peer (by a policy rule) into a TUN device this
process owns; it drops each packet with probability `loss`%, holds the rest for `delay` (a FIFO, since the
delay is constant, so order is kept) and then writes them onto the real device with an AF_PACKET socket
addressed to the peer's MAC. That is the same egress impairment netem applies on that device, for traffic
to the peer. Packets written this way bypass routing, so they never loop back into the TUN.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import os
import random
import select
import socket
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def pump(tun: int, dev: str, peer_mac: bytes, delay: float, loss: float, seed: int | None) -> None:
    rng = random.Random(seed)
    out = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM)
    out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024 * 1024)
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, packet = queue.popleft()
            proto = ETH_P_IPV6 if packet[0] >> 4 == 6 else ETH_P_IP
            with contextlib.suppress(OSError):  # device busy/down: a lost packet, as on a real link
                out.sendto(packet, (dev, proto, 0, 0, peer_mac))
        timeout = max(0.0, queue[0][0] - now) if queue else 1.0
        readable, _, _ = select.select([tun], [], [], timeout)
        if not readable:
            continue
        arrived = time.monotonic()
        for _ in range(256):  # drain a batch per wakeup
            try:
                packet = os.read(tun, 65536)
            except BlockingIOError:
                break
            if rng.random() * 100 >= loss:
                queue.append((arrived + delay, packet))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tun", required=True)
    parser.add_argument("--dev", required=True)
    parser.add_argument("--peer-mac", required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0, help="percent")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    tun = open_tun(args.tun)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    mac = bytes.fromhex(args.peer_mac.replace(":", ""))
    with contextlib.suppress(KeyboardInterrupt):
        pump(tun, args.dev, mac, args.delay_ms / 1000, args.loss, args.seed)


if __name__ == "__main__":
    main()
