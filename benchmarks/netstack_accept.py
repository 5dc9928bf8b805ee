"""Accept cost with many live flows: the sans-IO stack alone, no TUN, no root.

``python -m benchmarks.netstack_accept [--live 50,500,5000] [--cycles 2000] [--repeats 5]``

Opens N idle established flows, then times short connections beside them: the app's SYN, the accept, its
ACK, its FIN, our FIN (a graceful release) and its last ACK, all as raw IPv4 packets built here. Reports
microseconds per connection (median of the repeats) for each N and the ratio to the smallest N, measured
in the same run: lwIP finds a segment's pcb by walking its list of active pcbs, so a cost that grows with
N is a walk somewhere on the connection's path.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import time

from netstack import Stack, StackConfig, TcpConnectRequest

APP = bytes([198, 18, 0, 2])
DEST = bytes([198, 19, 0, 2])
SYN, ACK, FIN_ACK = 0x02, 0x10, 0x11
IDLE_PORTS = 10000  # idle flows' source ports start here; the timed connections' above them
CYCLE_PORTS = (30000, 65000)


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def packet(sport: int, seq: int, ack: int, flags: int) -> bytes:
    """An IPv4 TCP segment from the app to DEST:80 without payload (SYN with an MSS option)."""
    opts = struct.pack("!BBH", 2, 4, 1460) if flags & SYN else b""
    thl = 20 + len(opts)
    tcp = struct.pack("!HHIIBBHHH", sport, 80, seq, ack, (thl // 4) << 4, flags, 65535, 0, 0) + opts
    pseudo = APP + DEST + struct.pack("!BBH", 0, 6, thl)
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + thl, 0, 0, 64, 6, 0, APP, DEST)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    return ip + tcp


def _their_seq(stack: Stack) -> int:
    """The sequence number of the stack's (one) answer: its SYN-ACK."""
    (raw,) = stack.packets_to_send()
    return struct.unpack("!I", raw[24:28])[0]


def handshake(stack: Stack, sport: int, seq: int = 1000):
    """A new connection from `sport`, accepted and established; returns (flow, our next seq, theirs)."""
    stack.receive_packet(packet(sport, seq, 0, SYN))
    (event,) = stack.events()
    assert isinstance(event, TcpConnectRequest)
    flow = event.flow
    flow.accept()
    their = (_their_seq(stack) + 1) & 0xFFFFFFFF
    stack.receive_packet(packet(sport, seq + 1, their, ACK))
    return flow, seq + 1, their


def one_connection(stack: Stack, sport: int) -> None:
    """Open, half-close from the app, release gracefully, and the app's last ACK: the pcb is freed."""
    flow, seq, their = handshake(stack, sport)
    stack.receive_packet(packet(sport, seq, their, FIN_ACK))
    stack.events()  # its end of stream
    flow.close()
    stack.packets_to_send()  # our FIN (with the ACK of theirs)
    stack.receive_packet(packet(sport, seq + 1, (their + 1) & 0xFFFFFFFF, ACK))
    stack.events()


def measure(live: int, cycles: int, repeats: int) -> tuple[list[float], float]:
    """Microseconds per short connection beside `live` idle flows, one figure per repeat; and the share of
    accepts whose SYN skipped lwIP's walk of the active pcbs (the stack's ``syn_fast_path``)."""
    stack = Stack(StackConfig(mtu=1500, max_flows=live + 1000), clock="manual")
    try:
        for i in range(live):
            handshake(stack, IDLE_PORTS + i)
        stack.packets_to_send()
        stack.events()
        assert stack.stats()["pcbs_active"] == live
        port, lo, hi = CYCLE_PORTS[0], *CYCLE_PORTS
        fast0 = stack.stats().get("syn_fast_path", 0)
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(cycles):
                one_connection(stack, port)
                port = port + 1 if port < hi else lo
            out.append((time.perf_counter() - t0) / cycles * 1e6)
        stats = stack.stats()
        assert stats["pcbs_active"] == live and stats["flows_live"] == live, stats
        return out, (stats.get("syn_fast_path", 0) - fast0) / (cycles * repeats)
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--live", default="50,500,5000", help="numbers of idle flows, comma-separated")
    ap.add_argument("--cycles", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.live.split(",")]
    base = None
    print(f"{'live flows':>10} {'us/conn (median)':>17} {'min':>7} {'max':>7} {'ratio':>6} {'fast SYNs':>9}")
    for n in counts:
        runs, fast = measure(n, args.cycles, args.repeats)
        med = statistics.median(runs)
        base = base or med
        line = f"{n:>10} {med:>17.2f} {min(runs):>7.2f} {max(runs):>7.2f} {med / base:>6.2f}"
        print(f"{line} {fast:>9.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
