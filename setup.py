"""setuptools entry point: only here because cffi_modules and the sdist's lwIP bundle need it (metadata
lives in pyproject.toml)."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.sdist import sdist

TOP = Path(__file__).resolve().parent
sys.path.insert(0, str(TOP / "native"))
from fetch_lwip import bundle  # noqa: E402


def _ours(name: str) -> bool:
    """Whether a manifest entry is one of the project's own files.

    setuptools adds the extension's sources to the manifest, lwIP's among them: they may lie outside the
    checkout (``LWIP_SRC``, paths starting with ``..``, which sdist would write outside its tree) or in the
    ``.lwip/`` cache. The sdist gets its lwIP from `bundle` instead.
    """
    parts = Path(name).parts
    return bool(parts) and parts[0] not in ("..", ".lwip", "lwip") and not Path(name).is_absolute()


class SdistWithLwip(sdist):
    """An sdist that carries the pinned lwIP source (checked against its SHA-256) in ``lwip/``, so that
    building from it needs no network and no apt."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, [f for f in files if _ours(f)])
        bundle(Path(base_dir) / "lwip")


# lwIP's license travels with its code: in the sdist's lwip/ and in the wheel's metadata. A checkout has no
# lwip/ (the pattern would match nothing), so the file is named only where it exists.
LICENSE_FILES = ["LICENSE"] + (["lwip/COPYING"] if (TOP / "lwip" / "COPYING").is_file() else [])

setup(
    license_files=LICENSE_FILES,
    cffi_modules=["native/build_netstack.py:ffibuilder"],
    cmdclass={"sdist": SdistWithLwip},
    # The extension uses only the stable ABI (cffi builds it with Py_LIMITED_API): one wheel for 3.11+.
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
