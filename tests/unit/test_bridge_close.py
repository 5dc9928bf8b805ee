"""How the bridge ends a channel when the app shuts down (orchestration logic, with stand-in ends).

When the server's EOF has already come, the app's FIN ends both directions: the bridge closes the channel
(one CLOSE) instead of sending EOF and waiting for sshd's CLOSE. Before that, the app's FIN is a half-close:
EOF only, so the server may still answer. The byte-exact behaviour against a real sshd is pinned by
tests/integration/test_vpn_tcp.py::test_half_close_loses_nothing_either_way.
"""

from __future__ import annotations

from typing import Any

from x2ssh.flows.tcp_bridge import TcpBridge, _AppSide, _Flow


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


class Flow:
    """The netstack flow while its SYN is held."""

    id = 1
    src = ("198.18.0.2", 40000)
    dst = ("198.19.0.2", 80)
    closed = False


class App:
    """The netstack transport the accept returns."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        self.calls.append(f"write {len(data)}")

    def write_eof(self) -> None:
        self.calls.append("eof")

    def is_closing(self) -> bool:
        return "close" in self.calls or "abort" in self.calls

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")


class Tun:
    def accept(self, flow: Any, factory: Any) -> App:
        app = App()
        app.protocol = factory()
        return app


def _flow() -> _Flow:
    """A flow whose channel open is in flight."""
    tun = Tun()
    bridge = TcpBridge(lambda: tun)  # type: ignore[arg-type, return-value]
    return _Flow(bridge, Flow(), 0)  # type: ignore[arg-type]


def _link() -> tuple[_Flow, Channel, App, _AppSide]:
    flow = _flow()
    channel = Channel()
    flow.open_done(channel, None)
    app: Any = flow.app
    return flow, channel, app, app.protocol


def test_app_fin_after_the_servers_eof_closes_the_channel() -> None:
    flow, channel, app, app_side = _link()
    flow.data_received(b"answer", None)
    assert flow.eof_received() is True
    app_side.data_received(b"last words")
    app_side.eof_received()
    assert app.calls == ["write 6", "eof"]
    assert channel.calls == ["write 10", "close"]
    app_side.connection_lost(None)  # the flow is released later: the channel is not closed twice
    assert channel.calls == ["write 10", "close"]
    assert flow.stats.bytes_down == 6 and flow.stats.bytes_up == 10


def test_the_app_going_away_after_a_half_close_closes_the_channel() -> None:
    _, channel, _, app_side = _link()
    app_side.eof_received()
    app_side.connection_lost(None)
    assert channel.calls == ["eof", "close"]


def test_the_app_resetting_aborts_the_channel_even_after_a_close() -> None:
    flow, channel, _, app_side = _link()
    flow.eof_received()
    app_side.eof_received()
    app_side.connection_lost(ConnectionResetError("reset by the app"))
    assert channel.calls == ["close", "abort"]


def test_app_fin_before_the_servers_eof_is_a_half_close() -> None:
    flow, channel, app, app_side = _link()
    app_side.data_received(b"request")
    app_side.eof_received()
    assert channel.calls == ["write 7", "eof"]
    flow.data_received(b"reply", None)
    flow.eof_received()
    assert app.calls == ["write 5", "eof"]


def test_the_channel_closing_closes_the_app_and_a_reset_aborts_it() -> None:
    flow, _, app, _ = _link()
    assert flow.stats.active == 1
    flow.connection_lost(None)
    assert app.calls == ["close"] and flow.stats.active == 0
    flow, _, app, _ = _link()
    flow.connection_lost(ConnectionResetError("reset by the server"))
    assert app.calls == ["abort"]


def test_server_eof_before_the_accept_also_counts() -> None:
    flow = _flow()
    channel = Channel()
    flow.data_received(b"hello", None)  # the server spoke (and finished) before the app's handshake
    flow.eof_received()
    flow.open_done(channel, None)
    app: Any = flow.app
    assert app.calls == ["write 5", "eof"]
    app.protocol.eof_received()
    assert channel.calls == ["close"]


def test_a_channel_closed_before_the_accept_is_passed_on_after_the_early_bytes() -> None:
    flow = _flow()
    channel = Channel()
    flow.data_received(b"bye", None)  # a server that speaks and hangs up before the open's answer is seen
    flow.eof_received()
    flow.connection_lost(None)
    flow.open_done(channel, None)
    app: Any = flow.app
    assert app.calls == ["write 3", "eof", "close"]
    assert flow.stats.opened == 1 and flow.stats.active == 0


def test_a_finished_flow_leaves_no_reference_cycle() -> None:
    """Both ends gone: refcounting frees the flow, its transport's protocol and the transport at once
    (thousands of short connections a second must not be left to the cyclic garbage collector)."""
    import gc

    gc.collect()
    gc.disable()
    try:
        for app_first in (True, False):
            flow, channel, app, app_side = _link()
            flow.data_received(b"x", None)
            if app_first:
                app_side.connection_lost(None)
                flow.connection_lost(None)
            else:
                flow.connection_lost(None)
                app_side.connection_lost(None)
            del flow, channel, app, app_side
            assert gc.collect() == 0
    finally:
        gc.enable()
