"""The journal records of a Windows run, and how `--vpn-cleanup` undoes them after a crash.

Only one change of a Windows run outlives the process: a route pinned through an uplink (the SSH server's
host route and each `--vpn-exclude`). The Wintun adapter goes with its handle, and its addresses, routes
and DNS setting go with the adapter; the WFP filters live in a dynamic session that ends with the process.
So a pinned route is written down (`ROUTE_RECORD`) before it is created, and undone by deleting it again,
which tolerates a route that is already gone.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from x2ssh.host.windows import plan as P

ROUTE_RECORD = "windows_route"


def route_record(call: P.CreateIpForwardEntry2) -> dict[str, Any]:
    """The journal data of a pinned route (JSON: the interface LUID as a number, addresses as text)."""
    return {
        "interface": int(call.interface),
        "destination": str(call.destination),
        "next_hop": str(call.next_hop),
    }


def route_undo_call(data: dict[str, Any]) -> P.DeleteIpForwardEntry2:
    """The call that removes the route a record describes; ValueError for a record that makes no sense."""
    interface = data.get("interface")
    if not isinstance(interface, int) or isinstance(interface, bool) or interface <= 0:
        raise ValueError(f"route record without a valid interface: {data!r}")
    return P.DeleteIpForwardEntry2(
        interface,
        ipaddress.ip_network(str(data.get("destination")), strict=True),
        ipaddress.ip_address(str(data.get("next_hop"))),
    )


def undo_route_record(data: dict[str, Any], executor: P.Executor | None = None) -> str:
    """Delete a pinned route left by a run (the journal's undo function; the real executor by default)."""
    call = route_undo_call(data)
    if executor is None:
        from x2ssh.host.windows.executor import WindowsExecutor

        executor = WindowsExecutor()
    executor.call(call)
    return f"route {call.destination} via {call.next_hop} (interface {call.interface:#x}) removed"
