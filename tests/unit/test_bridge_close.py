"""How the bridge ends a channel when the app shuts down (orchestration logic, with stand-in ends).

When the server's EOF has already come, the app's FIN ends both directions: the bridge closes the channel
(one CLOSE) instead of sending EOF and waiting for sshd's CLOSE. Before that, the app's FIN is a half-close:
EOF only, so the server may still answer. The byte-exact behaviour against a real sshd is pinned by
tests/integration/test_vpn_tcp.py::test_half_close_loses_nothing_either_way.
"""

from __future__ import annotations

from x2ssh.flows.tcp_bridge import BridgeStats, _AppSide, _ChannelSide, _Link


class Channel:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, data: bytes) -> None:
        self.calls.append(f"write {len(data)}")

    def write_eof(self) -> None:
        self.calls.append("eof")

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")


class App:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, data: bytes) -> None:
        self.calls.append(f"write {len(data)}")

    def write_eof(self) -> None:
        self.calls.append("eof")


def _link() -> tuple[_Link, Channel, App]:
    link = _Link(BridgeStats())
    channel, app = Channel(), App()
    link.channel = channel
    link.attach(app)  # type: ignore[arg-type]
    return link, channel, app


def test_app_fin_after_the_servers_eof_closes_the_channel() -> None:
    link, channel, app = _link()
    _ChannelSide(link).data_received(b"answer", None)
    assert _ChannelSide(link).eof_received() is True
    _AppSide(link).data_received(b"last words")
    _AppSide(link).eof_received()
    assert app.calls == ["write 6", "eof"]
    assert channel.calls == ["write 10", "close"]
    link.app_closed(None)  # the flow is released later: the channel is not closed twice
    assert channel.calls == ["write 10", "close"]


def test_the_app_going_away_after_a_half_close_closes_the_channel() -> None:
    link, channel, _ = _link()
    _AppSide(link).eof_received()
    link.app_closed(None)
    assert channel.calls == ["eof", "close"]


def test_the_app_resetting_aborts_the_channel_even_after_a_close() -> None:
    link, channel, _ = _link()
    _ChannelSide(link).eof_received()
    _AppSide(link).eof_received()
    link.app_closed(ConnectionResetError("reset by the app"))
    assert channel.calls == ["close", "abort"]


def test_app_fin_before_the_servers_eof_is_a_half_close() -> None:
    link, channel, app = _link()
    _AppSide(link).data_received(b"request")
    _AppSide(link).eof_received()
    assert channel.calls == ["write 7", "eof"]
    _ChannelSide(link).data_received(b"reply", None)
    _ChannelSide(link).eof_received()
    assert app.calls == ["write 5", "eof"]


def test_server_eof_before_the_accept_also_counts() -> None:
    link = _Link(BridgeStats())
    channel, app = Channel(), App()
    link.channel = channel
    _ChannelSide(link).eof_received()  # the server spoke (and finished) before the app's handshake
    link.attach(app)  # type: ignore[arg-type]
    assert app.calls == ["eof"]
    _AppSide(link).eof_received()
    assert channel.calls == ["close"]
