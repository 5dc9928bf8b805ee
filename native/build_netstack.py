"""cffi builder for ``netstack._native``: our glue plus the lwIP 2.1.3 core, compiled as one extension.

setuptools runs it through ``cffi_modules`` (see setup.py); ``python native/build_netstack.py`` builds in
place.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fetch_lwip import lwip_source  # noqa: E402

# Keep in step with ns_glue.h (cffi cannot read the header's preprocessor lines).
CDEF = """
#define NS_ABI_VERSION 1
enum ns_event_type { NS_EV_TCP_CONNECT = 1, NS_EV_TCP_READABLE = 2, NS_EV_TCP_EOF = 3,
                     NS_EV_TCP_WRITABLE = 4, NS_EV_TCP_CLOSED = 5, NS_EV_UDP = 6 };
enum ns_close_reason { NS_CLOSED_NORMAL = 0, NS_CLOSED_RESET = 1, NS_CLOSED_TIMEOUT = 2,
                       NS_CLOSED_ERROR = 3 };
enum ns_result { NS_OK = 0, NS_ENOFLOW = -1, NS_ESTATE = -2, NS_ECLOSED = -3, NS_EMEM = -4,
                 NS_ETOOBIG = -5, NS_EINVAL = -6 };
typedef struct {
    uint32_t type; uint32_t flow; int32_t err; uint32_t off; uint32_t len;
    uint16_t sport; uint16_t dport; uint8_t family; uint8_t pad[3];
    uint8_t src[16]; uint8_t dst[16];
} ns_event;
typedef struct {
    uint64_t packets_in, bytes_in, packets_out, bytes_out;
    uint64_t dropped_malformed, dropped_checksum, dropped_fragment, dropped_icmp, dropped_other;
    uint64_t dropped_output, udp_in, udp_out, tcp_refused, tcp_over_limit;
    uint64_t flows_live, flows_pending, pcbs_active, pcbs_time_wait, listeners, mem_in_use;
} ns_stats;
int ns_version(void);
int ns_open(int mtu, int max_flows);
void ns_close(void);
void ns_set_output_fd(int fd);
void ns_set_clock(int manual, uint64_t now_ms);
int ns_input(const uint8_t *packet, size_t len);
int ns_pump(int fd, int max_packets);
void ns_timers(void);
uint32_t ns_next_timer_ms(void);
size_t ns_events(const ns_event **events, const uint8_t **arena);
void ns_events_clear(void);
size_t ns_out_take(const uint8_t **buf);
void ns_out_clear(void);
int ns_tcp_accept(uint32_t flow);
int ns_tcp_refuse(uint32_t flow);
int ns_tcp_write(uint32_t flow, const uint8_t *data, size_t len);
int ns_tcp_read(uint32_t flow, uint8_t *buf, size_t maxlen);
int ns_tcp_ack(uint32_t flow, size_t len);
int ns_tcp_shutdown(uint32_t flow);
int ns_tcp_close(uint32_t flow, int abort);
size_t ns_tcp_sndbuf(uint32_t flow);
int ns_udp_send(int family, const uint8_t *src, uint16_t sport, const uint8_t *dst, uint16_t dport,
                const uint8_t *payload, size_t len);
void ns_get_stats(ns_stats *stats);
"""

LWIP_CORE = [
    "core/init.c",
    "core/def.c",
    "core/inet_chksum.c",
    "core/ip.c",
    "core/mem.c",
    "core/memp.c",
    "core/netif.c",
    "core/pbuf.c",
    "core/stats.c",
    "core/sys.c",
    "core/tcp.c",
    "core/tcp_in.c",
    "core/tcp_out.c",
    "core/timeouts.c",
    "core/ipv4/ip4.c",
    "core/ipv4/ip4_addr.c",
    "core/ipv4/ip4_frag.c",
    "core/ipv6/ip6.c",
    "core/ipv6/ip6_addr.c",
    "core/ipv6/ip6_frag.c",
    "core/ipv6/icmp6.c",
    "core/ipv6/nd6.c",
    "core/ipv6/mld6.c",
    "core/ipv6/inet6.c",
    "core/ipv6/ethip6.c",
]


def make_ffi(absolute: bool = False) -> FFI:
    """Describe the extension; setuptools insists on paths relative to the checkout's top."""
    src = lwip_source() / "src"
    top = HERE.parent

    def rel(path: Path) -> str:
        return str(path) if absolute else os.path.relpath(path, top)

    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "netstack._native",
        '#include "ns_glue.h"',
        sources=[rel(HERE / "ns_glue.c")] + [rel(src / f) for f in LWIP_CORE],
        include_dirs=[rel(HERE), rel(src / "include")],
        extra_compile_args=["-O2", "-std=gnu11", "-fvisibility=hidden", "-Wno-unused-parameter"],
    )
    return ffi


if __name__ == "__main__":
    # In-place build for development: the extension lands in netstack/.
    built = make_ffi(absolute=True).compile(tmpdir=str(HERE / "_build"))
    target = HERE.parent / "netstack" / Path(built).name
    os.replace(built, target)
    print(target)
else:
    ffibuilder = make_ffi()
