"""The one place that picks the host backend for this platform; nothing else asks which OS it runs on.

`open_host(state_dir, verbose)` returns the `x2ssh.host.api.Host` of this machine: on Linux the privileged
helper (`helper_client.HelperClient`, started through sudo unless x2ssh is root), on Windows
`windows.host.WindowsHost` (x2ssh itself must run elevated). The front ends only see the `Host` interface,
and the TUN device it opens hands netstack its own packet port (`TunDevice.packet_port`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from x2ssh.host.api import Host


def open_host(state_dir: Path, verbose: int = 0, *, platform: str = sys.platform) -> Host:
    """The host control of this platform. Nothing on the machine changes until it is asked."""
    if platform == "win32":
        from x2ssh.host.windows.host import WindowsHost

        return WindowsHost(state_dir)
    from x2ssh.host.helper_client import HelperClient

    return HelperClient.spawn(state_dir, verbose)
