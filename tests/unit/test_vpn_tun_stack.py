"""The VPN's netstack over the TUN: built from the TUN's MTU and the buffer budget, trusting the local
kernel's checksums (see `netstack.StackConfig.verify_checksums`), and every SSH connection sending what
apps write during a netstack batch at the end of that batch (`TunStack.defer`). No TUN here: the stack's
constructor is replaced by one that records its config and stops the bring-up."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from netstack import StackConfig
from tests.unit.test_vpn_proxy import FakeHost
from x2ssh import session as session_module
from x2ssh.frontends import vpn
from x2ssh.settings import parse_args


class FakeTun:
    mtu = 1500

    def packet_port(self) -> int:
        return -1

    def close(self) -> None:
        pass


class HostWithTun(FakeHost):
    async def open_tun(self) -> Any:
        self.calls.append("open_tun")
        return FakeTun()


def test_the_tun_stack_trusts_the_kernels_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[StackConfig] = []

    def tun_stack(port: Any, *, config: StackConfig, **_: Any) -> Any:
        seen.append(config)
        raise RuntimeError("stop the bring-up here")

    monkeypatch.setattr(vpn, "TunStack", tun_stack)

    async def go() -> None:
        settings = parse_args(["--vpn", "host"])
        v = vpn.VpnSession(settings, HostWithTun())  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="stop the bring-up here"):
            await v._bring_up(object())
        await v._tear_down()
        (config,) = seen
        assert config.verify_checksums is False
        assert config.mtu == FakeTun.mtu
        assert config.buffer_budget == settings.vpn_buffer_budget << 20

    asyncio.run(asyncio.wait_for(go(), 30))


class Connection:
    """An SSH connection as far as `tuning.flush_sends_with` sees it (`coalesce_sends` installs the hook)."""

    def __init__(self) -> None:
        self.defer: Any = None

    def _x2ssh_set_defer(self, defer: Any) -> None:
        self.defer = defer


class StoppingStack:
    def __init__(self, port: Any, **_: Any) -> None:
        self.deferred: list[Any] = []

    def defer(self, callback: Any) -> None:
        self.deferred.append(callback)

    def start(self) -> None:
        raise RuntimeError("stop the bring-up here")

    def close(self) -> None:
        pass


def test_every_ssh_connection_sends_at_the_end_of_the_netstacks_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection the TUN came up with, and each one the session makes later (a reconnect, the pool's
    extra connections), gets the stack's `defer`, once per connection rather than once per flow."""
    made: list[Connection] = []

    async def connect_ssh(*_: Any) -> Connection:
        made.append(Connection())
        return made[-1]

    monkeypatch.setattr(vpn, "TunStack", StoppingStack)
    monkeypatch.setattr(session_module, "connect_ssh", connect_ssh)

    async def go() -> None:
        v = vpn.VpnSession(parse_args(["--vpn", "host"]), HostWithTun())  # type: ignore[arg-type]
        first = Connection()
        with pytest.raises(RuntimeError, match="stop the bring-up here"):
            await v._bring_up(first)
        stack = v.tun_stack
        assert isinstance(stack, StoppingStack)
        assert first.defer == stack.defer
        v.ssh.proxy = object()  # type: ignore[assignment]  # (no ssh_config lookup here)
        await v.ssh.connect(("198.18.0.1", 22))  # a reconnect
        await v.ssh.pool._connect()  # how the pool grows
        assert [conn.defer for conn in made] == [stack.defer, stack.defer]
        await v._tear_down()

    asyncio.run(asyncio.wait_for(go(), 30))
