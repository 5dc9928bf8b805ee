"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netstack import Stack, StackConfig


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A netstack on a manual clock; a test module sets `STACK_MTU` for another MTU than 16,000."""
    s = Stack(StackConfig(mtu=getattr(request.module, "STACK_MTU", 16000)), clock="manual")
    yield s
    s.close()
