"""`WindowsHost`: the `HostControl` of a VPN run on Windows, composed of the plans, the executor, the
journal, WFP, the Wintun packet port and the console control handler.

Theory of operation. The session asks for its host changes one step at a time, in this order: `start`
(Administrator check, the admin-only state directory (`statedir`), run lock, undo what crashed runs left, a
new journal, the console handler), `open_tun`, `routes(bypass)`, `dns(servers)`, `kill_switch()`, and at the
end `down()`. Each step adds its part to the run's `plan.Wishes` and hands the whole plan for the wishes so
far to a `StagedPlan`, which carries out only the calls it has not made yet (`plan` guarantees that an earlier
step's calls reappear unchanged in every later plan) and keeps one undo list, newest first. Before a route is
pinned through an uplink, the journal gets a record of it: that route is the one change that outlives the
process (see `records`). `down()` ends the Wintun session, runs the undo list (closing the WFP engine removes
every filter, closing the adapter removes its addresses, routes and DNS setting), then lets the journal undo
its records (deleting a route already gone is fine) and delete itself, and releases the lock.

Blocking Win32 calls run in a worker thread (`asyncio.to_thread`), as the Linux helper's requests do.
`down()` may also be called from the console handler's thread (console closed, logoff, shutdown) while the
loop still runs: a lock makes it run once.

NOT RUN on Windows (there is no Windows machine where this was written). The orchestration runs on Linux
in the unit tests with a recording fake executor, a fake ring and a real journal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from x2ssh.errors import StateError
from x2ssh.host.api import NetworkWatcher
from x2ssh.host.cleanup import cleanup as cleanup_journals
from x2ssh.host.journal import StateJournal, Undo, journal_path
from x2ssh.host.lock import RunLock
from x2ssh.host.windows import console, records, statedir
from x2ssh.host.windows import plan as P
from x2ssh.host.windows.netwatch import AddressWatch, Register
from x2ssh.host.windows.wintun import Ring, WintunPort

log = logging.getLogger(__name__)

ROUTING_MODE = "split"  # pinned host routes plus half-space routes (no policy routing on Windows)


class StagedPlan:
    """Carries out a run's plan step by step: each call once, with one undo list for all of them."""

    def __init__(self, executor: P.Executor, before_pin: Callable[[P.CreateIpForwardEntry2], None]) -> None:
        self.executor = executor
        self.before_pin = before_pin
        self.done: set[P.Call] = set()
        self.undo: list[P.Call] = []  # newest first

    def apply(self, plan: P.ApplyPlan) -> list[P.Call]:
        """Make the calls of `plan` not made yet; on a failure undo this step's calls and re-raise."""
        new = P.ApplyPlan([(call, undo) for call, undo in plan.steps if call not in self.done])
        for call in new.apply:
            pinned = P.pinned_route(call)
            if pinned is not None:
                self.before_pin(pinned)  # journalled before it exists, so a crash cannot lose it
        undo = P.execute(new, self.executor)
        self.done.update(new.apply)
        self.undo[:0] = undo
        return new.apply

    def undo_all(self) -> tuple[list[str], list[str]]:
        """Run the undo list; returns (what was undone, what failed). Nothing is undone twice."""
        undo, self.undo = self.undo, []
        done: list[str] = []
        failures: list[str] = []
        for call in undo:  # as plan.undo_all: go on past failures (something may already be gone)
            try:
                self.executor.call(call)
            except Exception as exc:
                failures.append(f"{call}: {exc}")
            else:
                done.append(str(call))
        return done, failures


@dataclasses.dataclass
class WintunDevice:
    """The Wintun adapter as the data plane sees it (`x2ssh.host.api.TunDevice`)."""

    name: str
    mtu: int
    v4: ipaddress.IPv4Interface
    v6: ipaddress.IPv6Interface | None
    port: WintunPort
    closed: bool = False
    ifindex: int = 0  # the adapter's interface index, from its LUID (0: not known)

    def packet_port(self) -> WintunPort:
        """The `netstack.port.PacketPort` over the adapter's session."""
        return self.port

    def close(self) -> None:
        """End the Wintun session (the adapter itself is closed by the host control's undo). Idempotent."""
        if not self.closed:
            self.closed = True
            self.port.close()


def _dns_api_available() -> bool:
    """SetInterfaceDnsSettings exists (Windows 10 2004 and later); older systems get the netsh plan."""
    from x2ssh.host.windows.prototypes import function

    try:
        function("SetInterfaceDnsSettings")
    except AttributeError:
        return False
    return True


class WindowsHost:
    """Implements `x2ssh.host.api.Host` on Windows. One instance per run."""

    def __init__(
        self,
        state_dir: Path,
        *,
        executor: P.Executor | None = None,
        open_ring: Callable[[], Ring] | None = None,
        is_admin: Callable[[], bool] = console.is_admin,
        dns_api: Callable[[], bool] = _dns_api_available,
        app_path: str = sys.executable,
        install_ctrl_handler: bool = True,
        watch_register: Register | None = None,
        acl: statedir.AclCalls | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self._acl = acl or statedir.AclExecutor()
        if executor is None or open_ring is None:
            from x2ssh.host.windows.executor import WindowsExecutor
            from x2ssh.host.windows.wintun import WintunRing

            real = WindowsExecutor()
            executor = executor or real
            if open_ring is None:

                def open_ring() -> Ring:
                    assert isinstance(executor, WindowsExecutor) and executor.adapter is not None
                    return WintunRing(executor.adapter)

        self.executor = executor
        self._open_ring = open_ring
        self._is_admin = is_admin
        self._dns_api = dns_api
        self._app_path = app_path
        self._install_ctrl_handler = install_ctrl_handler
        self._watch_register = watch_register
        self.lock = RunLock(self.state_dir)
        self.journal: StateJournal | None = None
        self.staged = StagedPlan(executor, self._journal_route)
        self.wishes: P.Wishes | None = None
        self.best: dict[P.IPAddress, P.BestRoute] = {}
        self.device: WintunDevice | None = None
        self._run_dir: Path | None = None
        self._ctrl_routine: Any = None
        self._down_lock = threading.Lock()
        self._down = False

    # -- the steps of a run, in order

    def start(self, tun: str, mtu: int, excludes: Sequence[Any], kill_switch: bool) -> dict[str, Any]:
        """Check elevation, take the run lock, undo crashed runs, start the journal; refuse bad wishes."""
        console.require_admin(self._is_admin)
        wishes = P.Wishes(
            tun=tun,
            mtu=mtu,
            ssh_endpoints=(),
            excludes=tuple(ipaddress.ip_network(str(n), strict=False) for n in excludes),
            app_path=self._app_path,
            dns_api=self._dns_api(),
        )
        P.adapter_plan(wishes)  # a bad name or MTU is refused before anything changes
        if kill_switch and not wishes.app_path:
            raise P.PlanError("the kill switch needs the x2ssh process's path for its app id")
        statedir.secure_state_dir(self.state_dir, self._acl)  # admin-only before the lock or a journal
        self.lock.acquire()
        try:
            undone = cleanup_journals(self.state_dir, undoers=self.undoers(), resolv_conf=None)
            self.journal = StateJournal(journal_path(self.state_dir, tun))
        except BaseException:
            self.lock.release()
            raise
        self.wishes = wishes
        if self._install_ctrl_handler:
            self._ctrl_routine = console.install(console.CtrlDispatcher(None, self._down_quietly))
        return {"undone": undone}

    async def open_tun(self) -> WintunDevice:
        """Create the Wintun adapter with its MTU, metric and addresses, and open a session on it."""
        wishes = self._wishes()
        await asyncio.to_thread(self.staged.apply, P.adapter_plan(wishes))
        index = await asyncio.to_thread(P.interface_index, P.TUN, self.executor)
        port = WintunPort(await asyncio.to_thread(self._open_ring))
        self.device = WintunDevice(wishes.tun, wishes.mtu, wishes.v4, wishes.v6, port, ifindex=index)
        return self.device

    async def marked_socket(self, family: int, kind: int) -> socket.socket:
        """A plain socket: the SSH connection keeps its path through the pinned host routes (no fwmark)."""
        return socket.socket(family, kind)

    async def routes(self, bypass: Sequence[Any]) -> str:
        """Pin the SSH endpoints and excludes to their current path, send the rest into the adapter."""
        wishes = dataclasses.replace(
            self._wishes(),
            ssh_endpoints=tuple(P.Endpoint(ipaddress.ip_address(str(a))) for a in bypass),
        )
        best = await asyncio.to_thread(P.lookup, wishes, self.executor)
        await asyncio.to_thread(self.staged.apply, P.apply_plan(wishes, best))
        self.wishes, self.best = wishes, best
        return ROUTING_MODE

    async def dns(self, servers: Sequence[Any]) -> str:
        """The adapter's name servers, and WFP filters that keep every DNS query in the tunnel."""
        wishes = dataclasses.replace(
            self._wishes(), dns_servers=tuple(ipaddress.ip_address(str(s)) for s in servers)
        )
        await asyncio.to_thread(self.staged.apply, P.apply_plan(wishes, self._routes_known()))
        self.wishes = wishes
        return "SetInterfaceDnsSettings" if wishes.dns_api else "netsh"

    async def kill_switch(self) -> None:
        """WFP filters that let nothing but the tunnel, the SSH connection and the excludes leave."""
        wishes = dataclasses.replace(self._wishes(), kill_switch=True)
        await asyncio.to_thread(self.staged.apply, P.apply_plan(wishes, self._routes_known()))
        self.wishes = wishes

    async def run_dir(self) -> Path:
        """A directory in the user's own %TEMP% (its ACL admits only them), removed at `down()`."""
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="x2ssh-run-"))
        return self._run_dir

    def network_watch(
        self, on_change: Callable[[str], None], ignore: Callable[[], set[int]]
    ) -> NetworkWatcher:
        """Address changes on any interface but the tunnel's (NotifyUnicastIpAddressChange).

        The tunnel is known by the adapter's index, found from its LUID at `open_tun`: the session's
        `ignore` asks if_nametoindex for the adapter's name, which on Windows wants the internal interface
        name, not the alias, and so finds nothing there."""

        def tunnel() -> set[int]:
            own = {self.device.ifindex} if self.device is not None and self.device.ifindex else set()
            return own | ignore()

        return AddressWatch(on_change, tunnel, self._watch_register)

    def down(self) -> list[str]:
        """Undo everything this run changed (newest first), end the journal, release the lock. Runs once;
        raises StateError (journal kept for `--vpn-cleanup`) if something could not be undone."""
        with self._down_lock:
            if self._down:
                return []
            self._down = True
            if self.device is not None:
                self.device.close()  # the session ends before its adapter does
            done, failures = self.staged.undo_all()
            try:
                if self.journal is not None:
                    done += self.journal.undo_all(self.undoers())
            except StateError as exc:
                failures.append(str(exc))
            finally:
                if self._run_dir is not None:
                    shutil.rmtree(self._run_dir, ignore_errors=True)
                if self._ctrl_routine is not None:
                    console.uninstall(self._ctrl_routine)
                self.lock.release()
            if failures:
                raise StateError(
                    "could not undo everything (run x2ssh --vpn-cleanup): " + "; ".join(failures)
                )
            return done

    def cleanup(self) -> list[str]:
        """`--vpn-cleanup`: undo what crashed runs left (their journals), under the run lock."""
        console.require_admin(self._is_admin)
        statedir.secure_state_dir(self.state_dir, self._acl)  # journals are trusted only in an admin-only dir
        with self.lock:  # this process's own journal, kept by a failed down(), is ours to finish too
            return cleanup_journals(
                self.state_dir, own_pid=os.getpid(), undoers=self.undoers(), resolv_conf=None
            )

    def undoers(self) -> dict[str, Undo]:
        """The journal's undo functions, carried out by this host control's executor."""
        executor = self.executor
        return {records.ROUTE_RECORD: lambda data: records.undo_route_record(data, executor)}

    # -- helpers

    def _wishes(self) -> P.Wishes:
        if self.wishes is None:
            raise P.PlanError("start() first: the run has no wishes yet")
        return self.wishes

    def _routes_known(self) -> dict[P.IPAddress, P.BestRoute]:
        if not self._wishes().ssh_endpoints:
            raise P.PlanError("routes() first: the SSH endpoints must keep their path before DNS or filters")
        return self.best

    def _journal_route(self, call: P.CreateIpForwardEntry2) -> None:
        if self.journal is None:
            raise P.PlanError("start() first: a pinned route needs the journal")
        self.journal.record(records.ROUTE_RECORD, **records.route_record(call))

    def _down_quietly(self) -> None:
        """The console handler's cleanup: it may not raise into Windows' thread."""
        try:
            self.down()
        except Exception as exc:
            log.error("%s", exc)
