"""Import the native core, failing loudly (with the fix) when it is missing or stale."""

from __future__ import annotations

from typing import Any

EXPECTED_ABI = 6
BUILD_HINT = (
    "reinstall x2ssh (the wheel carries the core; the sdist builds it with a C compiler), or from a "
    "checkout run `pip install -e .` (or `make build`), which fetches the pinned lwIP 2.1.3 source itself"
)


class NativeCoreMissing(ImportError):
    """The compiled netstack core is absent or does not match this Python package."""


def load() -> tuple[Any, Any]:
    """Return cffi's ``(ffi, lib)`` for ``netstack._native``."""
    try:
        from netstack._native import ffi, lib  # type: ignore[import-not-found]
    except ImportError as exc:
        raise NativeCoreMissing(f"netstack's native core is not built ({exc}); {BUILD_HINT}") from exc
    abi = lib.ns_version()
    if abi != EXPECTED_ABI:
        raise NativeCoreMissing(
            f"netstack's native core is stale (ABI {abi}, need {EXPECTED_ABI}); {BUILD_HINT}"
        )
    return ffi, lib
