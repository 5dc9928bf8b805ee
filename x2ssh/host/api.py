"""What the session needs from the host, and nothing more: the seam between the VPN and the platform.

The session talks only to a `HostControl`. On Linux it is `helper_client.HelperClient`, whose privileged
helper drives `host.linux`; a Windows backend plugs in behind the same interface. Nothing here imports the
session, asyncssh or netstack.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path
from typing import Any, Protocol

# The tunnel's own addresses, the same on every platform.
TUN_V4 = ipaddress.ip_interface("100.100.83.1/24")  # inside 100.64.0.0/10 (shared address space)
TUN_V6 = ipaddress.ip_interface("fd78:7832:7373::1/64")  # ULA: "x2ss" in hex
DNS_V4 = ipaddress.ip_address("100.100.83.53")  # answered by the session, never by a real host
DNS_V6 = ipaddress.ip_address("fd78:7832:7373::53")


@dataclass
class TunHandle:
    """An open TUN device owned by the data plane: `fd` is non-blocking and carries raw IP packets."""

    fd: int
    name: str
    mtu: int
    v4: IPv4Interface
    v6: IPv6Interface | None
    closed: bool = field(default=False)

    def fileno(self) -> int:
        return self.fd

    def packet_port(self) -> int:
        """What `netstack.aio.TunStack` drives: the fd itself (wrapped there in `netstack.port.FdPort`)."""
        return self.fd

    def close(self) -> None:
        """Close the device (the kernel removes it and its routes). Idempotent."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)


class TunDevice(Protocol):
    """The tunnel device as the data plane sees it, on any platform (`TunHandle` on Linux, a Wintun adapter
    on Windows)."""

    name: str
    mtu: int
    v4: IPv4Interface
    v6: IPv6Interface | None

    def packet_port(self) -> Any:
        """What `netstack.aio.TunStack` reads and writes: a non-blocking fd, or a `netstack.port.PacketPort`
        (typed loosely: nothing here imports netstack)."""
        ...

    def close(self) -> None:
        """Close the device. Idempotent."""
        ...


class NetworkWatcher(Protocol):
    """Calls its `on_change(reason)` when the machine's network changes or it resumes from suspend."""

    def start(self) -> None: ...

    def close(self) -> None: ...


class HostControl(Protocol):
    """Host changes a VPN run asks for, in this order; each is undone by `down()` (and after a crash)."""

    def start(self, tun: str, mtu: int, excludes: Sequence[Any], kill_switch: bool) -> dict[str, Any]:
        """Lock the run, undo what crashed runs left, check that the changes asked for can be made."""
        ...

    async def open_tun(self) -> TunDevice: ...

    async def marked_socket(self, family: int, kind: int) -> socket.socket:
        """An unconnected socket whose traffic keeps the machine's own path (never enters the tunnel)."""
        ...

    async def routes(self, bypass: Sequence[Any]) -> str: ...

    async def dns(self, servers: Sequence[Any]) -> str: ...

    async def kill_switch(self) -> None: ...

    async def run_dir(self) -> Path:
        """A directory only this user (and root) can reach, removed when the run ends."""
        ...

    def down(self) -> list[str]: ...

    def network_watch(
        self, on_change: Callable[[str], None], ignore: Callable[[], set[int]]
    ) -> NetworkWatcher:
        """A watcher of network changes (no privileges needed); `ignore` gives interfaces not to report."""
        ...


class Host(HostControl, Protocol):
    """A `HostControl` as the command line holds it (`x2ssh.host.platform.open_host`): it also undoes what
    crashed runs left (`--vpn-cleanup`)."""

    def cleanup(self) -> list[str]:
        """Undo what crashed runs left behind; returns what was undone."""
        ...
