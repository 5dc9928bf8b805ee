"""`python -m benchmarks.profile_socks --frontend`: the proxy without SSH really serves its client's
connections on both accept paths and charges it CPU (correctness of the tool only, never a time)."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.profile_socks import _frontend_round


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "asyncio"])
def test_frontend_round_serves_connections_and_counts_cpu(lean: bool) -> None:
    count, cpu, user = asyncio.run(_frontend_round(lean, 0.3, 2))
    assert count > 1  # each a complete SOCKS5 CONNECT, request and response (the client checks the reply)
    assert cpu > 0 and 0 <= user <= cpu
