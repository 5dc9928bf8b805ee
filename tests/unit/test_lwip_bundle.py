"""native/fetch_lwip.py's sdist bundle: only what the build needs, only from a tarball that matches the pinned
SHA-256, and an sdist's bundle wins over LWIP_SRC. A small synthetic tarball stands in for Debian's."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

TOP = Path(__file__).resolve().parents[2]


@pytest.fixture
def fetch_lwip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh copy of the module whose checkout top is `tmp_path/top` (cache and bundle live there)."""
    spec = importlib.util.spec_from_file_location("fetch_lwip_under_test", TOP / "native" / "fetch_lwip.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    top = tmp_path / "top"
    top.mkdir()
    monkeypatch.setattr(module, "TOP", top)
    monkeypatch.setattr(module, "CACHE", top / ".lwip")
    monkeypatch.setattr(module, "BUNDLED", top / "lwip")
    monkeypatch.delenv("LWIP_SRC", raising=False)
    return module


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "COPYING"
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _fake_tarball(path: Path) -> str:
    """An lwIP-shaped tarball with parts the build needs and parts it does not; returns its SHA-256."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        _add(tar, "lwip-2.1.3/src/core/tcp.c", b"/* tcp */\n")
        _add(tar, "lwip-2.1.3/src/core/ipv6/nd6.c", b"/* nd6 */\n")
        _add(tar, "lwip-2.1.3/src/include/lwip/tcp.h", b"/* tcp.h */\n")
        _add(tar, "lwip-2.1.3/src/apps/http/httpd.c", b"/* not built */\n")
        _add(tar, "lwip-2.1.3/test/unit/tcp/test_tcp.c", b"/* not built */\n")
        _add(tar, "lwip-2.1.3/doc/doxygen/main_page.h", b"/* not built */\n")
        _add(tar, "lwip-2.1.3/COPYING", b"Redistribution and use in source and binary forms\n")
        _add(tar, "lwip-2.1.3/LICENSE-LINK", kind=tarfile.SYMTYPE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_bundle_keeps_only_the_build_inputs_and_the_license(
    fetch_lwip: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = _fake_tarball(fetch_lwip.CACHE / fetch_lwip.ORIG_TARBALL)
    monkeypatch.setattr(fetch_lwip, "ORIG_SHA256", digest)
    dest = fetch_lwip.bundle(tmp_path / "release" / "lwip")
    assert _files(dest) == {
        "src/core/tcp.c",
        "src/core/ipv6/nd6.c",
        "src/include/lwip/tcp.h",
        "COPYING",
        fetch_lwip.PROVENANCE,
    }
    assert (dest / "src/core/tcp.c").read_bytes() == b"/* tcp */\n"
    assert digest in (dest / fetch_lwip.PROVENANCE).read_text()


def test_bundle_refuses_a_tarball_that_does_not_match_and_writes_nothing(
    fetch_lwip: ModuleType, tmp_path: Path
) -> None:
    _fake_tarball(fetch_lwip.CACHE / fetch_lwip.ORIG_TARBALL)  # the pinned digest is Debian's, not this one
    dest = tmp_path / "release" / "lwip"
    with pytest.raises(fetch_lwip.LwipSourceError, match="does not match the pinned"):
        fetch_lwip.bundle(dest)
    assert not dest.exists()


def test_tarball_beside_lwip_src_is_used_and_checked(
    fetch_lwip: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    digest = _fake_tarball(elsewhere / fetch_lwip.ORIG_TARBALL)
    (elsewhere / "lwip-2.1.3").mkdir()
    monkeypatch.setenv("LWIP_SRC", str(elsewhere / "lwip-2.1.3"))
    assert fetch_lwip.lwip_tarball() == elsewhere / fetch_lwip.ORIG_TARBALL
    monkeypatch.setattr(fetch_lwip, "ORIG_SHA256", digest)
    assert "src/core/tcp.c" in _files(fetch_lwip.bundle(tmp_path / "out"))


def test_an_sdists_bundle_wins_over_lwip_src(
    fetch_lwip: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = _fake_tarball(tmp_path / "t" / fetch_lwip.ORIG_TARBALL)
    monkeypatch.setattr(fetch_lwip, "ORIG_SHA256", digest)
    monkeypatch.setattr(fetch_lwip, "CACHE", tmp_path / "t")
    fetch_lwip.bundle(fetch_lwip.BUNDLED)  # what an unpacked sdist holds
    other = tmp_path / "other-tree"
    (other / "src" / "core").mkdir(parents=True)
    (other / "src" / "core" / "tcp.c").write_text("")
    (other / "src" / "include" / "lwip").mkdir(parents=True)
    monkeypatch.setenv("LWIP_SRC", str(other))
    assert fetch_lwip.lwip_source() == fetch_lwip.BUNDLED
    # and an sdist made from that sdist copies the bundle on, without needing the tarball
    (tmp_path / "t" / fetch_lwip.ORIG_TARBALL).unlink()
    assert _files(fetch_lwip.bundle(tmp_path / "next-release" / "lwip")) == _files(fetch_lwip.BUNDLED)
