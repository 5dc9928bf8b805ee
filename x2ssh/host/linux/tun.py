"""The TUN device: created with an ioctl on /dev/net/tun, configured (MTU, addresses, up) with pyroute2.

The device is not persistent: the kernel removes it when its file descriptor is closed, also when x2ssh is
killed. Call from a worker thread in asyncio code (see x2ssh.host.linux.routes about pyroute2's event loop).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from ipaddress import IPv4Interface, IPv6Interface
from typing import TYPE_CHECKING, Any

from pyroute2.netlink.exceptions import NetlinkError

from x2ssh.errors import NotPrivileged, TunNameTaken, TunUnavailable
from x2ssh.host.api import TUN_V4, TUN_V6
from x2ssh.host.linux.routes import iproute

if TYPE_CHECKING:
    from x2ssh.host.journal import StateJournal

log = logging.getLogger(__name__)

TUN_RECORD = "tun"
TUN_DEVICE_PATH = "/dev/net/tun"

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_TUN_EXCL = 0x8000  # fail instead of attaching to an existing device of that name
_IFA_F_NODAD = 0x02
# Packets the kernel holds for us while x2ssh is not reading (the device's txqueuelen; the kernel default
# is 500). At 1 Gbit/s of 1,400-byte UDP datagrams 500 packets last under 6 ms, and on a busy machine the
# event loop is often away longer: the kernel then drops the app's datagrams at the device (measured: 15-23 %
# of an offered 1 Gbit/s upload in the lab, none with 4,096). Bounded memory all the same: every queued packet
# is charged to its sender's socket buffer, and TCP keeps its own queue short.
TUN_TX_QUEUE = 4096


class TunDevice:
    """An open TUN device: `fd` is non-blocking and carries raw IP packets (no packet info header)."""

    def __init__(self, fd: int, name: str, mtu: int, v4: IPv4Interface, v6: IPv6Interface | None) -> None:
        self.fd = fd
        self.name = name
        self.mtu = mtu
        self.v4 = v4
        self.v6 = v6  # None if IPv6 is disabled on this machine

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Close the device; the kernel removes it (and its routes) at once. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            log.debug("closed TUN %s", self.name)

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tun(
    name: str,
    mtu: int,
    v4: IPv4Interface = TUN_V4,
    v6: IPv6Interface | None = TUN_V6,
    journal: StateJournal | None = None,
) -> TunDevice:
    """Create TUN `name` (IFF_TUN | IFF_NO_PI), set its MTU, queue length and addresses and bring it up.

    The creation is recorded in `journal` first. Raises TunNameTaken, NotPrivileged or TunUnavailable;
    on failure nothing is left behind.
    """
    if journal is not None:
        journal.record(TUN_RECORD, name=name)
    fd = _create(name)
    try:
        v6 = _configure(name, mtu, v4, v6)
    except BaseException:
        os.close(fd)
        raise
    log.info("TUN %s up: %s, %s, mtu %d", name, v4, v6 or "no IPv6", mtu)
    return TunDevice(fd, name, mtu, v4, v6)


def undo_tun_record(data: dict[str, Any]) -> str:
    """Undo a journal TUN record: delete the TUN device if it still exists (normally it died with us)."""
    name = data["name"]
    with iproute() as ipr:
        indexes = ipr.link_lookup(ifname=name)
        if not indexes:
            return f"already gone: TUN {name}"
        link = ipr.get_links(indexes[0])[0]
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        if kind != "tun":
            return f"left alone: {name} is no longer a TUN device (kind {kind})"
        try:
            ipr.link("del", index=indexes[0])
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return f"already gone: TUN {name}"
            raise
    return f"removed TUN {name}"


def _create(name: str) -> int:
    try:
        fd = os.open(TUN_DEVICE_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunUnavailable(f"{TUN_DEVICE_PATH} does not exist (is the tun kernel module loaded?)") from None
    except PermissionError:
        raise NotPrivileged(
            f"cannot open {TUN_DEVICE_PATH}: run x2ssh as root or with CAP_NET_ADMIN"
        ) from None
    except OSError as e:
        raise TunUnavailable(f"cannot open {TUN_DEVICE_PATH}: {e.strerror}") from e
    ifreq = struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI | _IFF_TUN_EXCL)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, ifreq)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EBUSY, errno.EEXIST, errno.EINVAL):
            raise TunNameTaken(f"a network interface named {name} already exists (choose --vpn-tun)") from e
        if e.errno == errno.EPERM:
            raise NotPrivileged(f"cannot create TUN {name}: run x2ssh as root or with CAP_NET_ADMIN") from e
        raise TunUnavailable(f"cannot create TUN {name}: {e.strerror}") from e
    return fd


def _configure(name: str, mtu: int, v4: IPv4Interface, v6: IPv6Interface | None) -> IPv6Interface | None:
    try:
        with iproute() as ipr:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=index, mtu=mtu, txqlen=TUN_TX_QUEUE)
            ipr.addr("add", index=index, address=str(v4.ip), prefixlen=v4.network.prefixlen)
            if v6 is not None:
                try:
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(v6.ip),
                        prefixlen=v6.network.prefixlen,
                        flags=_IFA_F_NODAD,
                    )
                except NetlinkError as e:
                    if e.code not in (errno.EACCES, errno.EOPNOTSUPP, errno.EAFNOSUPPORT, errno.EPERM):
                        raise
                    log.warning("IPv6 seems disabled here (%s): the tunnel carries IPv4 only", e)
                    v6 = None
            ipr.link("set", index=index, state="up")
    except NetlinkError as e:
        raise TunUnavailable(f"cannot configure TUN {name}: {e}") from e
    return v6
