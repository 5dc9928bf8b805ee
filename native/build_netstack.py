"""cffi builder for ``netstack._native``: our glue plus the lwIP 2.1.3 core, compiled as one extension.

setuptools runs it through ``cffi_modules`` (see setup.py); ``python native/build_netstack.py`` builds in
place.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fetch_lwip import lwip_source  # noqa: E402


def cdef_from_header(header: Path) -> str:
    """ns_glue.h is the one declaration of the API: cffi gets it without comments and preprocessor lines
    (integer #defines are kept: cffi understands those)."""
    text = re.sub(r"/\*.*?\*/", "", header.read_text(), flags=re.S)
    lines = [line.split("//")[0] for line in text.splitlines()]
    kept = [
        line for line in lines if not line.lstrip().startswith("#") or re.match(r"#define \w+ \d+$", line)
    ]
    return "\n".join(line for line in kept if not re.match(r"#define X2SSH_", line))


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


COMPILE_ARGS = ["-O2", "-std=gnu11", "-fvisibility=hidden", "-Wno-unused-parameter"]


def c_sources(lwip_src: Path) -> list[Path]:
    """Every C file the extension compiles: our glue, then lwIP's core (``lwip_src`` is lwIP's ``src/``).
    The Windows cross-compile test (tests/unit/test_windows_native_build.py) compiles this same list."""
    return [HERE / "ns_glue.c"] + [lwip_src / f for f in LWIP_CORE]


def make_ffi(absolute: bool = False) -> FFI:
    """Describe the extension; setuptools insists on paths relative to the checkout's top."""
    src = lwip_source() / "src"
    top = HERE.parent

    def rel(path: Path) -> str:
        return str(path) if absolute else os.path.relpath(path, top)

    ffi = FFI()
    ffi.cdef(cdef_from_header(HERE / "ns_glue.h"))
    ffi.set_source(
        "netstack._native",
        '#include "ns_glue.h"',
        sources=[rel(path) for path in c_sources(src)],
        include_dirs=[rel(HERE), rel(src / "include")],
        extra_compile_args=COMPILE_ARGS,
    )
    return ffi


if __name__ == "__main__":
    # In-place build for development: the extension lands in netstack/.
    built = make_ffi(absolute=True).compile(tmpdir=str(HERE / "_build"))
    target = HERE.parent / "netstack" / Path(built).name
    for stale in target.parent.glob("_native*.so"):  # one extension only: Python would pick either
        stale.unlink()
    os.replace(built, target)
    print(target)
else:
    ffibuilder = make_ffi()
