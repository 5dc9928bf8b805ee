"""The native netstack core compiles for Windows: every C file the extension builds (the list in
native/build_netstack.py: ns_glue.c and lwIP's core) is cross-compiled for x86_64 Windows with MinGW-w64,
with the extension's own flags plus -Wall -Werror, and the objects are linked into a DLL with no undefined
symbol left.

What this does not show: the cffi module itself (it needs Windows' Python headers and, on Windows, MSVC, the
compiler CPython's extensions are built with) was not built, nothing was linked against python3.dll, and
nothing ran on Windows.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

TOP = Path(__file__).resolve().parents[2]
NATIVE = TOP / "native"
CC = "x86_64-w64-mingw32-gcc"
COFF_AMD64 = 0x8664  # IMAGE_FILE_MACHINE_AMD64: the first two bytes of an x64 COFF object

# lwIP's own warnings under -Wall, each with why it is lwIP's and not ours. The Linux gcc reports the same.
LWIP_WARNINGS_ALLOWED = {
    # nd6_tmr_rs_reduction is used only with LWIP_IPV6_SEND_ROUTER_SOLICIT, which lwipopts.h turns off.
    "core/ipv6/nd6.c": ["-Wno-unused-variable"],
}


def _lwip_tree() -> Path | None:
    """An lwIP tree already on disk (sdist bundle, LWIP_SRC, or the build's cache), never a fetch."""
    spec = importlib.util.spec_from_file_location("fetch_lwip_for_cross_build", NATIVE / "fetch_lwip.py")
    assert spec and spec.loader
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    candidates = [fetch.BUNDLED, fetch.CACHE / "lwip-2.1.3"]
    if os.environ.get("LWIP_SRC"):
        candidates.insert(1, Path(os.environ["LWIP_SRC"]))
    for tree in candidates:
        if (tree / "src" / "core" / "tcp.c").is_file():
            return Path(tree)
    return None


@pytest.fixture(scope="module")
def compiler() -> str:
    path = shutil.which(CC)
    if path is None:
        pytest.skip(f"{CC} is missing (Debian's gcc-mingw-w64-x86-64; scripts/bootstrap.sh installs it)")
    return path


@pytest.fixture(scope="module")
def lwip_src() -> Path:
    tree = _lwip_tree()
    if tree is None:
        pytest.skip("no lwIP source tree on disk: build the extension once (pip install -e) or set LWIP_SRC")
    return tree / "src"


@pytest.fixture(scope="module")
def build(lwip_src: Path) -> ModuleType:
    """native/build_netstack.py, loaded with LWIP_SRC set to the tree found, so loading fetches nothing."""
    saved = os.environ.get("LWIP_SRC")
    os.environ["LWIP_SRC"] = str(lwip_src.parent)
    try:
        path = NATIVE / "build_netstack.py"
        spec = importlib.util.spec_from_file_location("build_netstack_for_cross_build", path)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            del os.environ["LWIP_SRC"]
        else:
            os.environ["LWIP_SRC"] = saved
    return module


def _compile(compiler: str, source: Path, obj: Path, include: list[Path], flags: list[str]) -> None:
    cmd = [compiler, "-c", *flags, *(f"-I{d}" for d in include), str(source), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    command = " ".join(cmd)
    assert done.returncode == 0, f"{source.name} does not compile for Windows:\n{command}\n{done.stderr}"
    assert done.stderr == "", f"{source.name}: the compiler said something:\n{done.stderr}"


def test_the_cross_compiler_targets_windows(compiler: str, tmp_path: Path) -> None:
    """A control: the compiler defines _WIN32 and refuses a Linux-only header, so a pass below means
    something."""
    probe = tmp_path / "probe.c"
    probe.write_text("#ifndef _WIN32\n#error not a Windows target\n#endif\nint x;\n")
    _compile(compiler, probe, tmp_path / "probe.o", [], ["-Wall", "-Werror"])
    linux_only = tmp_path / "linux_only.c"
    linux_only.write_text("#include <sys/syscall.h>\nint x;\n")
    done = subprocess.run([compiler, "-c", str(linux_only), "-o", str(tmp_path / "l.o")], capture_output=True)
    assert done.returncode != 0


def test_every_extension_source_compiles_and_links_for_windows(
    compiler: str, lwip_src: Path, build: ModuleType, tmp_path: Path
) -> None:
    sources = build.c_sources(lwip_src)
    assert sources[0] == NATIVE / "ns_glue.c" and len(sources) == 1 + len(build.LWIP_CORE)
    include = [NATIVE, lwip_src / "include"]
    objects = []
    for index, source in enumerate(sources):
        relative = source.relative_to(lwip_src).as_posix() if source.is_relative_to(lwip_src) else source.name
        extra = LWIP_WARNINGS_ALLOWED.get(relative, [])
        obj = tmp_path / f"{index:02d}_{source.stem}.o"
        _compile(compiler, source, obj, include, [*build.COMPILE_ARGS, "-Wall", "-Werror", *extra])
        machine = struct.unpack("<H", obj.read_bytes()[:2])[0]
        assert machine == COFF_AMD64, f"{obj.name} is not an x64 COFF object (machine {machine:#x})"
        objects.append(obj)
    # Linking a DLL with --no-undefined shows that every symbol (rand_s, QueryPerformanceCounter, read and
    # write, lwIP's own) resolves against the C runtime and kernel32, as it must when Python loads it.
    dll = tmp_path / "netstack_core.dll"
    cmd = [compiler, "-shared", "-Wl,--no-undefined", "-o", str(dll), *map(str, objects)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"the objects do not link for Windows:\n{done.stderr}"
    assert dll.read_bytes()[:2] == b"MZ"


def test_the_glue_uses_no_linux_only_call_on_windows(compiler: str, lwip_src: Path, tmp_path: Path) -> None:
    """A mutation: the glue with its Windows branches removed must fail to compile, which shows the test above
    compiles the branches it claims to."""
    text = (NATIVE / "ns_glue.c").read_text()
    assert "#ifdef _WIN32" in text
    mutated = tmp_path / "ns_glue.c"
    mutated.write_text(text.replace("#ifdef _WIN32", "#ifdef X2SSH_NOT_DEFINED"))
    cmd = [compiler, "-c", "-std=gnu11", f"-I{NATIVE}", f"-I{lwip_src / 'include'}", str(mutated)]
    done = subprocess.run([*cmd, "-o", str(tmp_path / "m.o")], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "sys/syscall.h" in done.stderr
