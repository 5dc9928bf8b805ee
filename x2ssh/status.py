"""What people see while the VPN runs: a live `rich` panel on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

log = logging.getLogger("x2ssh")


@dataclass
class Snapshot:
    """Everything the status view shows, taken once per refresh by the session."""

    state: str = "connecting"
    server: str = ""
    tcp_active: int = 0
    tcp_opened: int = 0
    tcp_refused: int = 0
    tcp_failed: int = 0
    udp_flows: int = 0
    udp_mode: str = "off"
    bytes_up: int = 0
    bytes_down: int = 0
    drops: int = 0
    ssh_connections: int = 1
    ssh_channels: tuple[int, ...] = ()
    pool_refusals: int = 0
    errors: list[str] = field(default_factory=list)


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Console) -> None:
        super().__init__()
        self._console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._console.print(self.format(record), markup=False, highlight=False)
        except Exception:
            self.handleError(record)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s * 8 / 1e6:.1f} Mbit/s"


class RateMeter:
    """Bits per second up and down from growing byte counters, over at least `interval` seconds.

    Call `sample()` as often as you like (each status tick); the rates change only once `interval` has
    passed since the last mark, so a burst of calls does not turn noise into a rate."""

    def __init__(self, interval: float = 1.0, now: float | None = None) -> None:
        self.interval = interval
        self._mark = (time.monotonic() if now is None else now, 0, 0)
        self.up_bps = 0.0
        self.down_bps = 0.0

    def sample(self, bytes_up: int, bytes_down: int, now: float | None = None) -> tuple[float, float]:
        """Take the counters now; returns (up_bps, down_bps) as last measured."""
        now = time.monotonic() if now is None else now
        when, last_up, last_down = self._mark
        if now - when >= self.interval:
            bits = 8 / (now - when)
            self.up_bps = (bytes_up - last_up) * bits
            self.down_bps = (bytes_down - last_down) * bits
            self._mark = (now, bytes_up, bytes_down)
        return self.up_bps, self.down_bps


class StatusView:
    """Renders snapshots: `update(snapshot)` as often as you like; rates are computed between updates."""

    LOG_INTERVAL = 60.0

    def __init__(self, live: bool | None = None) -> None:
        self._live_enabled = sys.stderr.isatty() if live is None else live
        self._live: Live | None = None
        self._last: tuple[float, int, int] | None = None
        self._rates = (0.0, 0.0)
        self._last_log = 0.0

    def start(self) -> None:
        if self._live_enabled:
            self._live = Live(self._render(Snapshot()), console=Console(stderr=True), refresh_per_second=2)
            self._live.start()
            self._route_logs_through(self._live.console)

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
            root = logging.getLogger()
            for handler in self._moved:
                root.addHandler(handler)
            if self._via_live is not None:
                root.removeHandler(self._via_live)

    _moved: tuple[logging.Handler, ...] = ()
    _via_live: logging.Handler | None = None

    def _route_logs_through(self, console: Console) -> None:
        """Log lines printed beside a live display tear it apart: print them above it instead."""
        root = logging.getLogger()
        moved = [h for h in root.handlers if isinstance(h, logging.StreamHandler) and h.stream is sys.stderr]
        if not moved:
            return
        via_live = _ConsoleHandler(console)
        via_live.setFormatter(moved[0].formatter)
        via_live.setLevel(moved[0].level)
        for handler in moved:
            root.removeHandler(handler)
        root.addHandler(via_live)
        self._moved, self._via_live = tuple(moved), via_live

    def update(self, snap: Snapshot) -> None:
        now = time.monotonic()
        if self._last is not None and now > self._last[0]:
            dt = now - self._last[0]
            self._rates = ((snap.bytes_up - self._last[1]) / dt, (snap.bytes_down - self._last[2]) / dt)
        self._last = (now, snap.bytes_up, snap.bytes_down)
        if self._live is not None:
            self._live.update(self._render(snap))
        elif now - self._last_log >= self.LOG_INTERVAL:
            self._last_log = now
            log.info("status: %s", self.line(snap))

    def line(self, snap: Snapshot) -> str:
        up, down = self._rates
        return (
            f"{snap.state}, ssh {snap.ssh_connections} conn, tcp {snap.tcp_active} open "
            f"({snap.tcp_opened} total, {snap.tcp_refused} refused), "
            f"udp {snap.udp_flows} flows ({snap.udp_mode}), up {human_bytes(snap.bytes_up)} "
            f"({human_rate(up)}), down {human_bytes(snap.bytes_down)} ({human_rate(down)})"
        )

    def _render(self, snap: Snapshot) -> Table:
        up, down = self._rates
        table = Table(title=f"x2ssh — {snap.server}", show_header=False, expand=False)
        table.add_column(style="bold")
        table.add_column()
        colour = "green" if snap.state == "up" else "yellow"
        table.add_row("connection", f"[{colour}]{snap.state}[/{colour}]")
        channels = " + ".join(map(str, snap.ssh_channels)) or "0"
        table.add_row(
            "SSH pool",
            f"{snap.ssh_connections} connection(s), channels {channels}, {snap.pool_refusals} full refusals",
        )
        table.add_row(
            "TCP flows", f"{snap.tcp_active} open, {snap.tcp_opened} opened, {snap.tcp_refused} refused"
        )
        table.add_row("UDP", f"{snap.udp_flows} flows ({snap.udp_mode})")
        table.add_row("upload", f"{human_bytes(snap.bytes_up)}  {human_rate(up)}")
        table.add_row("download", f"{human_bytes(snap.bytes_down)}  {human_rate(down)}")
        errors = snap.tcp_failed + snap.drops
        table.add_row("errors", f"{errors} ({snap.tcp_failed} channel failures, {snap.drops} drops)")
        for message in snap.errors[-3:]:
            table.add_row("", f"[red]{message}[/red]")
        return table
