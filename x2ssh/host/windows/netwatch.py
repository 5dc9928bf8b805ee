"""Network changes on Windows: an address added to or removed from any interface but ours.

`NotifyUnicastIpAddressChange` calls back on a thread of the system's; the callback only hands the
interface index to the event loop (`call_soon_threadsafe`). There `AddressWatch` drops changes on the
interfaces `ignore()` names (the tunnel's own) and calls `on_change(reason)`, which the session answers with
a liveness check. A roam (new Wi-Fi, cable plugged in, resume with a new lease) always changes an address.

`AddressWatch` is the logic, run on Linux with the registration faked; `register` is the Win32 part (NOT
RUN here: no Windows machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
from collections.abc import Callable
from typing import Any

from x2ssh.host.windows import structs as S
from x2ssh.host.windows.iphlpapi import check
from x2ssh.host.windows.prototypes import function as fn

log = logging.getLogger(__name__)

MIB_NOTIFICATION_TYPES = {0: "address changed", 1: "address added", 2: "address removed"}

Register = Callable[[Callable[[int, int], None]], Callable[[], None]]
"""Start notifications that call `notify(interface_index, kind)` on any thread; returns the cancel."""


class AddressWatch:
    """Implements `x2ssh.host.api.NetworkWatcher` on Windows."""

    def __init__(
        self,
        on_change: Callable[[str], None],
        ignore: Callable[[], set[int]],
        register: Register | None = None,
    ) -> None:
        self.on_change = on_change
        self.ignore = ignore
        self._register = register or register_address_changes
        self._cancel: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Watch from now on (call on the event loop)."""
        if self._cancel is None:
            self._loop = asyncio.get_running_loop()
            self._cancel = self._register(self._notified)

    def close(self) -> None:
        """Stop watching; no callback runs after this returns (CancelMibChangeNotify2 waits for them)."""
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()

    def _notified(self, index: int, kind: int) -> None:  # any thread
        loop = self._loop
        if loop is not None and self._cancel is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the run is over
                loop.call_soon_threadsafe(self._changed, index, kind)

    def _changed(self, index: int, kind: int) -> None:
        if self._cancel is None or index in self.ignore():
            return
        self.on_change(f"{MIB_NOTIFICATION_TYPES.get(kind, 'address change')} on interface {index}")


def register_address_changes(notify: Callable[[int, int], None]) -> Callable[[], None]:
    """NotifyUnicastIpAddressChange for both families (Windows only). The callback object is kept alive by
    the returned cancel function."""

    def callback(context: Any, row: Any, kind: int) -> None:
        try:
            index = row.contents.InterfaceIndex if row else 0
            notify(int(index), int(kind))
        except Exception:  # an exception must never cross back into the system's thread
            log.exception("network change notification failed")

    prototype = ctypes.WINFUNCTYPE(
        None, ctypes.c_void_p, ctypes.POINTER(S.MIB_UNICASTIPADDRESS_ROW), ctypes.c_uint32
    )
    routine = prototype(callback)
    handle = S.HANDLE()
    status = fn("NotifyUnicastIpAddressChange")(
        S.AF_UNSPEC, ctypes.cast(routine, ctypes.c_void_p), None, False, ctypes.byref(handle)
    )
    check(status, "NotifyUnicastIpAddressChange")

    def cancel() -> None:
        check(fn("CancelMibChangeNotify2")(handle), "CancelMibChangeNotify2")
        del routine_ref[:]

    routine_ref = [routine]
    return cancel
