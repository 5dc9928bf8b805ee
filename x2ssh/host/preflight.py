"""Checks made before x2ssh changes anything; each failure is a typed error and leaves the machine as is."""

from __future__ import annotations

import os
import socket

from x2ssh.errors import NotPrivileged, TunNameTaken, TunUnavailable
from x2ssh.host.linux.tun import TUN_DEVICE_PATH

CAP_NET_ADMIN = 12


def has_net_admin(status_path: str = "/proc/self/status") -> bool:
    """True if this process is root or has CAP_NET_ADMIN in its effective set."""
    if os.geteuid() == 0:
        return True
    try:
        with open(status_path) as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def check_privileges() -> None:
    """Raise NotPrivileged unless root or CAP_NET_ADMIN."""
    if not has_net_admin():
        raise NotPrivileged(
            "x2ssh --vpn changes routes and creates a TUN device: run it as root or with CAP_NET_ADMIN"
        )


def check_tun_device(path: str = TUN_DEVICE_PATH) -> None:
    """Raise TunUnavailable unless `path` opens read-write (opening alone creates no device)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunUnavailable(f"{path} does not exist (load the tun kernel module: modprobe tun)") from None
    except PermissionError:
        raise NotPrivileged(f"cannot open {path}: run x2ssh as root or with CAP_NET_ADMIN") from None
    except OSError as e:
        raise TunUnavailable(f"{path} is not usable: {e.strerror}") from e
    os.close(fd)


def check_tun_name_free(name: str) -> None:
    """Raise TunNameTaken if a network interface called `name` exists in this namespace."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return
    raise TunNameTaken(f"a network interface named {name} already exists: choose another with --vpn-tun")


def preflight(tun_name: str) -> None:
    """All checks, cheapest first: privileges, /dev/net/tun, TUN name."""
    check_privileges()
    check_tun_device()
    check_tun_name_free(tun_name)
