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


def test_syscalls_for_http_rate_are_per_connection(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.profile_socks import _print_per_connection

    values = {"http-rate": (1000.0, {"requests": 200})}
    _print_per_connection(0, "x2ssh-D", values, {"accept4": 200, "recvfrom": 800, "close": 0})
    out = capsys.readouterr().out
    assert "5.0 system calls per connection" in out
    assert "accept4 1.00" in out and "recvfrom 4.00" in out and "close" not in out
