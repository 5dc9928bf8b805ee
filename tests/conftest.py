"""Shared pytest configuration: tests marked `netns` are skipped, with the reason, where they cannot run."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest


@functools.cache
def netns_unavailable_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can (root, /dev/net/tun, `ip netns`)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip netns`)"
    try:
        done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns list` failed: {exc}"
    if done.returncode != 0:
        return f"`ip netns` unavailable: {done.stderr.strip()}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    netns_items = [item for item in items if item.get_closest_marker("netns")]
    if not netns_items:
        return
    reason = netns_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"netns test skipped: {reason}")
    for item in netns_items:
        item.add_marker(skip)
