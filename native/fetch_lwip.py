"""Obtain the pinned lwIP 2.1.3 source tree, never committed to the repository.

Order of preference: the ``lwip/`` tree bundled in an sdist (see `bundle`; checked when the sdist was
made, so an sdist always builds what it carries); a tree named by ``LWIP_SRC``; a cached copy under
``.lwip/`` at the repository top; Debian's source package ``lwip`` (2.1.3+dfsg1-2) fetched with
``apt-get source --download-only`` through a private deb-src list derived from the machine's own apt
sources, so the system's apt configuration is not changed. The orig tarball's SHA-256 is checked before
anything is unpacked.

Run as a script to prefetch: ``python native/fetch_lwip.py`` prints the tree's path;
``python native/fetch_lwip.py --bundle DIR`` writes the part of the tree the build needs into DIR.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "2.1.3+dfsg1-2"
ORIG_TARBALL = "lwip_2.1.3+dfsg1.orig.tar.xz"
ORIG_SHA256 = "0a8276d09fc4e97bbba2f953d74af2388fc2195ea156be9d7589e297a68fde24"
TOP = Path(__file__).resolve().parent.parent
CACHE = TOP / ".lwip"
BUNDLED = TOP / "lwip"  # only in an sdist: the repository never holds lwIP
# What an sdist carries: the sources and headers the build compiles, and lwIP's license.
BUNDLE_PARTS = ("src/core", "src/include", "COPYING")
PROVENANCE = "SOURCE.txt"


class LwipSourceError(RuntimeError):
    """The lwIP source could not be obtained or did not match the pinned checksum."""


def _is_tree(path: Path) -> bool:
    return (path / "src" / "core" / "tcp.c").is_file() and (path / "src" / "include" / "lwip").is_dir()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _deb_src_lines() -> list[str]:
    """Turn the machine's configured ``deb`` sources into ``deb-src`` lines (one-line format)."""
    lines: list[str] = []
    etc = Path("/etc/apt")
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            fields = dict(
                (m.group(1).lower(), m.group(2).strip())
                for m in re.finditer(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M)
            )
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    signed = fields.get("signed-by")
                    opt = f"[signed-by={signed}] " if signed and "\n" not in signed else ""
                    lines.append(f"deb-src {opt}{uri} {suite} {fields.get('components', 'main')}")
    for f in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]:
        if f.is_file():
            for line in f.read_text().splitlines():
                if line.strip().startswith("deb "):
                    lines.append("deb-src " + line.strip()[4:])
    return lines


def _apt_fetch(workdir: Path) -> Path:
    lines = _deb_src_lines()
    if not lines:
        raise LwipSourceError("no apt sources configured on this machine to derive a deb-src list from")
    sources = workdir / "sources.list"
    sources.write_text("\n".join(lines) + "\n")
    lists = workdir / "lists"
    (lists / "partial").mkdir(parents=True)
    opts = [
        f"-o=Dir::Etc::sourcelist={sources}",
        "-o=Dir::Etc::sourceparts=-",
        f"-o=Dir::State::Lists={lists}",
        "-o=APT::Get::List-Cleanup=0",
        "-o=APT::Sandbox::User=root",
        "-q",
    ]
    subprocess.run(["apt-get", "update", *opts], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "source", "--download-only", *opts, f"lwip={VERSION}"],
        check=True,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
    )
    tarball = workdir / ORIG_TARBALL
    if not tarball.is_file():
        raise LwipSourceError(f"apt-get source did not produce {ORIG_TARBALL}")
    return tarball


def _unpack(tarball: Path, dest: Path) -> Path:
    actual = _sha256(tarball)
    if actual != ORIG_SHA256:
        raise LwipSourceError(
            f"{tarball.name}: SHA-256 {actual} does not match the pinned {ORIG_SHA256}; refusing to build"
        )
    staging = Path(tempfile.mkdtemp(prefix="lwip-", dir=dest.parent))
    with tarfile.open(tarball) as tar:
        tar.extractall(staging, members=_checked_members(tar, staging))
    roots = [p for p in staging.iterdir() if _is_tree(p)]
    if not roots:
        raise LwipSourceError(f"{tarball.name} does not contain an lwIP source tree")
    if dest.exists():
        shutil.rmtree(dest)
    roots[0].rename(dest)
    shutil.rmtree(staging)
    return dest


def _checked_members(tar: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    """Only plain files and directories that land inside `dest`, without special permission bits.

    Python 3.11.2 (Debian 12) predates `extractall(filter=...)`, so the same checks are made here.
    """
    root = dest.resolve()
    members = []
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        if member.name.startswith("/") or not target.is_relative_to(root):
            raise LwipSourceError(f"refusing tar member outside the tree: {member.name!r}")
        if not (member.isfile() or member.isdir()):
            continue  # links and devices: an lwIP tree needs none
        member.mode &= 0o755
        members.append(member)
    return members


def lwip_source() -> Path:
    """Return the path of a verified lwIP 2.1.3 source tree, fetching it if needed."""
    if _is_tree(BUNDLED):
        return BUNDLED
    env = os.environ.get("LWIP_SRC")
    if env:
        path = Path(env)
        if not _is_tree(path):
            raise LwipSourceError(f"LWIP_SRC={env} is not an lwIP source tree (no src/core/tcp.c)")
        return path
    tree = CACHE / "lwip-2.1.3"
    if _is_tree(tree):
        return tree
    tarball = lwip_tarball()
    CACHE.mkdir(exist_ok=True)
    return _unpack(tarball, tree)


def lwip_tarball() -> Path:
    """Return the pinned orig tarball: cached in ``.lwip/``, found beside ``LWIP_SRC``, or fetched with apt.

    The caller's `_unpack` checks its SHA-256 before anything is extracted.
    """
    cached = CACHE / ORIG_TARBALL
    if cached.is_file():
        return cached
    env = os.environ.get("LWIP_SRC")
    if env and (Path(env).parent / ORIG_TARBALL).is_file():
        return Path(env).parent / ORIG_TARBALL
    if shutil.which("apt-get") is None:
        raise LwipSourceError(
            f"lwIP source not found: put {ORIG_TARBALL} in {CACHE}, or run on Debian so apt-get can fetch it"
        )
    CACHE.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lwip-apt-") as tmp:
        try:
            shutil.copy(_apt_fetch(Path(tmp)), cached)
        except subprocess.CalledProcessError as exc:
            raise LwipSourceError(
                f"fetching Debian's lwip source package failed ({' '.join(exc.cmd[:2])} exited "
                f"{exc.returncode}; no network?): build from an sdist (it carries lwIP), or set LWIP_SRC"
            ) from exc
    return cached


def bundle(dest: Path) -> Path:
    """Write the part of the pinned lwIP tree that the build needs (`BUNDLE_PARTS`) into `dest`.

    From the SHA-256-checked tarball, never from ``LWIP_SRC`` (which is not checked); in an sdist that
    already carries a bundle (checked when that sdist was made), from that bundle. Nothing is written when
    the tarball does not match.
    """
    with tempfile.TemporaryDirectory(prefix="lwip-bundle-") as tmp:
        if _is_tree(BUNDLED) and BUNDLED.resolve() != dest.resolve():
            tree = BUNDLED
        else:
            tree = _unpack(lwip_tarball(), Path(tmp) / "lwip-2.1.3")
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for part in BUNDLE_PARTS:
            source = tree / part
            if source.is_dir():
                shutil.copytree(source, dest / part)
            else:
                (dest / part).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest / part)
    (dest / PROVENANCE).write_text(
        f"lwIP 2.1.3, from Debian's source package lwip {VERSION}: {ORIG_TARBALL}\n"
        f"SHA-256 {ORIG_SHA256}, checked when this sdist was built.\n"
        f"Only {', '.join(BUNDLE_PARTS)} are kept: what x2ssh's native core compiles, and lwIP's license.\n"
    )
    return dest


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["--bundle"] and len(sys.argv) == 3:
            print(bundle(Path(sys.argv[2])))
        elif len(sys.argv) == 1:
            print(lwip_source())
        else:
            sys.exit("usage: fetch_lwip.py [--bundle DIR]")
    except (LwipSourceError, subprocess.CalledProcessError) as exc:
        sys.exit(f"fetch_lwip: {exc}")
