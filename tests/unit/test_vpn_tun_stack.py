"""The VPN's netstack over the TUN: built from the TUN's MTU and the buffer budget, and trusting the local
kernel's checksums (see `netstack.StackConfig.verify_checksums`). No TUN here: the stack's constructor is
replaced by one that records its config and stops the bring-up."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from netstack import StackConfig
from tests.unit.test_vpn_proxy import FakeHost
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
