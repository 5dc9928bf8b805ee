"""Checks the privileged helper makes before it changes anything; each failure is a typed error and leaves
the machine as is."""

from __future__ import annotations

import os
import socket

from x2ssh.errors import NotPrivileged, TunNameTaken, TunUnavailable
from x2ssh.host.linux.tun import TUN_DEVICE_PATH


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
