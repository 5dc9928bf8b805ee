"""What the session needs from the host, and nothing more: the seam between the VPN and the platform.

The session talks only to a `HostControl`. On Linux it is `helper_client.HelperClient`, whose privileged
helper drives `host.linux`; a Windows backend plugs in behind the same interface. Nothing here imports the
session, asyncssh or netstack.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Interface
from typing import Any, Protocol


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

    def close(self) -> None:
        """Close the device (the kernel removes it and its routes). Idempotent."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)


class HostControl(Protocol):
    """Host changes a VPN run asks for, in this order; each is undone by `down()` (and after a crash)."""

    def start(self, tun: str, mtu: int, excludes: Sequence[Any], kill_switch: bool) -> dict[str, Any]:
        """Lock the run, undo what crashed runs left, check that the changes asked for can be made."""
        ...

    async def open_tun(self) -> TunHandle: ...

    async def marked_socket(self, family: int, kind: int) -> socket.socket:
        """An unconnected socket whose traffic keeps the machine's own path (never enters the tunnel)."""
        ...

    async def routes(self, bypass: Sequence[Any]) -> str: ...

    async def dns(self, servers: Sequence[Any]) -> str: ...

    async def kill_switch(self) -> None: ...

    def down(self) -> list[str]: ...
