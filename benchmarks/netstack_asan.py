"""Run tests against the native core built with AddressSanitizer: use-after-free and double frees in the glue
or lwIP show up at the first bad access, with both stacks (where it was freed, where it was used again).

``python -m benchmarks.netstack_asan [--rev REV] [--keep DIR] -- PYTEST_ARGS...`` copies the checkout (its
working tree, or commit REV) to a scratch directory, builds ``netstack._native`` there in place with
``-fsanitize=address``, and runs ``python -m pytest PYTEST_ARGS`` in that copy with libasan preloaded
(leak checking off: CPython's own allocations at exit are not ours). For integration tests (under the
integration lock) use ``--x2ssh-only``: the preload then goes only into the ``python -m x2ssh`` processes
the tests start (they import the copy; a ``sitecustomize`` there re-executes them with libasan), not into
ip, curl or sshd, which do not all run under it.

Examples::

    python -m benchmarks.netstack_asan -- -q tests/unit/test_netstack_lifecycle_fuzz.py
    flock /tmp/x2ssh-integration.lock python -m benchmarks.netstack_asan --x2ssh-only -- -q \
        tests/integration/test_vpn_faults.py -k thousand
    NETSTACK_FUZZ_EXAMPLES=400 python -m benchmarks.netstack_asan --rev HEAD~1 -- -q -x \
        tests/unit/test_netstack_lifecycle_fuzz.py

Needs gcc (or cc with libasan) and the lwIP source (``LWIP_SRC``, as ``pip install -e`` does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
ASAN_CFLAGS = "-fsanitize=address -fno-omit-frame-pointer -g -O1"
ASAN_OPTIONS = "detect_leaks=0:halt_on_error=1:replace_str=0:replace_intrin=0:quarantine_size_mb=16"


def copy_tree(rev: str | None, dest: Path) -> None:
    """The checkout's tracked and untracked (not ignored) files, or commit ``rev``, into ``dest``."""
    if rev:
        archive = subprocess.run(["git", "archive", rev], cwd=TOP, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=TOP,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        src = TOP / os.fsdecode(name)
        if src.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def libasan() -> str:
    path = subprocess.run(
        ["gcc", "-print-file-name=libasan.so"], check=True, capture_output=True, text=True
    ).stdout.strip()
    if not os.path.isabs(path):
        raise SystemExit("libasan not found (gcc -print-file-name=libasan.so)")
    return path


# Written into the copy: a `python -m x2ssh` started without the preload runs again with it (the runtime
# must be loaded before anything else; an import cannot add it later).
REEXEC = """\
import os, sys
_lib = os.environ.get("NETSTACK_ASAN_LIB")
if _lib and "x2ssh" in sys.orig_argv[1:3] and _lib not in os.environ.get("LD_PRELOAD", ""):
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "LD_PRELOAD": _lib})
"""


def build(copy: Path) -> None:
    env = {**os.environ, "CFLAGS": ASAN_CFLAGS, "LDFLAGS": "-fsanitize=address"}
    subprocess.run(
        [sys.executable, "native/build_netstack.py"], cwd=copy, env=env, check=True, capture_output=True
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", help="test this commit instead of the working tree")
    parser.add_argument("--keep", type=Path, help="build in this directory and keep it")
    parser.add_argument(
        "--x2ssh-only", action="store_true", help="preload only into x2ssh processes (integration tests)"
    )
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    pytest_args = [a for a in args.pytest_args if a != "--"] or [
        "-q",
        "tests/unit/test_netstack_lifecycle_fuzz.py",
    ]
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="netstack-asan-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        copy_tree(args.rev, scratch)
        build(scratch)
        lib = libasan()
        preload = {"NETSTACK_ASAN_LIB": lib} if args.x2ssh_only else {"LD_PRELOAD": lib}
        if args.x2ssh_only:
            (scratch / "sitecustomize.py").write_text(REEXEC)
        env = {
            **os.environ,
            **preload,
            # Without --x2ssh-only every child inherits the preload (ip, curl...): their own string-function
            # quirks (iproute2 copies overlapping strings) are not what we test, so those checks are off;
            # heap errors are still caught, and every access of the instrumented core is checked. A small
            # quarantine keeps RSS lower (ASan's allocator still holds more than libc's: RSS bounds in tests
            # do not hold under it).
            "ASAN_OPTIONS": ASAN_OPTIONS,
            "PYTHONPATH": str(scratch),
        }
        print(f"netstack built with AddressSanitizer in {scratch}", flush=True)
        return subprocess.run([sys.executable, "-m", "pytest", *pytest_args], cwd=scratch, env=env).returncode
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
