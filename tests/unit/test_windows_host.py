"""The Windows HostControl's whole run with the Win32 calls faked: a recording executor, a fake Wintun ring,
and the real journal and run lock in a temporary state directory. Up, each step, down; a failing step; a
crash (a child process killed mid-run) cleaned up from its journal; the Administrator refusal."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from x2ssh.errors import NotPrivileged, StateError
from x2ssh.host.api import TUN_V4, TUN_V6
from x2ssh.host.helper_client import HelperClient
from x2ssh.host.lock import RunLock
from x2ssh.host.platform import open_host
from x2ssh.host.windows import plan as P
from x2ssh.host.windows import records
from x2ssh.host.windows.host import WindowsHost, WintunDevice
from x2ssh.host.windows.netwatch import AddressWatch

ROOT = Path(__file__).resolve().parents[2]
TUN_INDEX = 23  # the Wintun adapter's interface index, as ConvertInterfaceLuidToIndex answers it
UPLINK = 0x0006000000000000
LAN = 0x0047000000000001
GATEWAY = ip_address("198.18.0.1")
SERVER = ip_address("198.18.0.10")
EXCLUDE = ip_network("198.19.0.0/16")
DNS = ip_address("100.100.83.53")


class Recorder:
    """A fake executor: records every call, answers GetBestRoute2 and ConvertInterfaceLuidToIndex, fails on
    the calls in `fail_on`."""

    def __init__(self, fail_on: tuple[P.Call, ...] = ()) -> None:
        self.calls: list[P.Call | str] = []
        self.fail_on = fail_on

    def call(self, record: P.Call) -> object:
        self.calls.append(record)
        if record in self.fail_on:
            raise OSError(5, "access denied")
        if isinstance(record, P.GetBestRoute2):
            if record.destination in EXCLUDE:
                return P.BestRoute(LAN, ip_address("0.0.0.0"))
            return P.BestRoute(UPLINK, GATEWAY)
        if record == P.ConvertInterfaceLuidToIndex(P.TUN):
            return TUN_INDEX
        return None


class Ring:
    """A Wintun session that only records its end (the reader thread waits until cancelled)."""

    def __init__(self, log: list[P.Call | str]) -> None:
        self.log = log
        self.cancelled = threading.Event()

    def receive(self) -> bytes | None:
        return None

    def wait(self) -> bool:
        self.cancelled.wait(10)
        return False

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, packet: bytes) -> bool:
        return True

    def close(self) -> None:
        self.log.append("WintunEndSession")


def make_host(
    state_dir: Path, executor: Recorder, admin: bool = True, acl: object = None, **extra: Any
) -> WindowsHost:
    from tests.unit.test_windows_state_dir import FakeAcl

    return WindowsHost(
        state_dir,
        executor=executor,
        open_ring=lambda: Ring(executor.calls),
        is_admin=lambda: admin,
        dns_api=lambda: True,
        app_path=r"C:\Python311\python.exe",
        install_ctrl_handler=False,
        acl=acl or FakeAcl(),  # type: ignore[arg-type]
        **extra,
    )


def journal_records(state_dir: Path) -> list[dict]:
    (path,) = state_dir.glob("*.journal")
    return [json.loads(line) for line in path.read_text().splitlines()]


def since(calls: list, mark: int) -> list:
    return calls[mark:]


def test_a_whole_run_makes_each_call_once_in_steps_and_undoes_all_newest_first(tmp_path: Path) -> None:
    ex = Recorder()
    host = make_host(tmp_path, ex)

    async def run() -> list[str]:
        assert host.start("x2ssh", 1400, [EXCLUDE], kill_switch=True) == {"undone": []}
        assert ex.calls == []  # start changes nothing on the machine

        device = await host.open_tun()
        assert isinstance(device, WintunDevice) and device.packet_port() is device.port
        assert (device.name, device.mtu, device.v4, device.v6) == ("x2ssh", 1400, TUN_V4, TUN_V6)
        assert ex.calls == [*P.adapter_plan(host._wishes()).apply, P.ConvertInterfaceLuidToIndex(P.TUN)]
        assert device.ifindex == TUN_INDEX

        mark = len(ex.calls)
        assert await host.routes([SERVER]) == "split"
        v4, v6 = ip_address("0.0.0.0"), ip_address("::")
        assert since(ex.calls, mark) == [
            P.GetBestRoute2(SERVER),
            P.GetBestRoute2(EXCLUDE.network_address),
            P.CreateIpForwardEntry2(UPLINK, ip_network("198.18.0.10/32"), GATEWAY, P.PINNED_METRIC),
            P.CreateIpForwardEntry2(LAN, EXCLUDE, v4, P.PINNED_METRIC),
            P.CreateIpForwardEntry2(P.TUN, ip_network("0.0.0.0/1"), v4, P.TUNNEL_METRIC),
            P.CreateIpForwardEntry2(P.TUN, ip_network("128.0.0.0/1"), v4, P.TUNNEL_METRIC),
            P.CreateIpForwardEntry2(P.TUN, ip_network("::/1"), v6, P.TUNNEL_METRIC),
            P.CreateIpForwardEntry2(P.TUN, ip_network("8000::/1"), v6, P.TUNNEL_METRIC),
        ]
        pinned = [r["data"] for r in journal_records(tmp_path) if r["kind"] == records.ROUTE_RECORD]
        assert pinned == [
            {"interface": UPLINK, "destination": "198.18.0.10/32", "next_hop": "198.18.0.1"},
            {"interface": LAN, "destination": "198.19.0.0/16", "next_hop": "0.0.0.0"},
        ], "the routes that outlive the process are journalled (the adapter's go with it)"

        mark = len(ex.calls)
        assert await host.dns([DNS]) == "SetInterfaceDnsSettings"
        dns_step = since(ex.calls, mark)
        assert dns_step[:3] == [
            P.SetInterfaceDnsSettings(P.TUN, P.AF_INET, (DNS,)),
            P.FwpmEngineOpen(dynamic=True),
            P.FwpmSubLayerAdd(P.SUBLAYER_NAME, P.SUBLAYER_WEIGHT),
        ]
        assert [c.name for c in dns_step[3:]] == [  # type: ignore[union-attr]
            "dns-tunnel-v4", "dns-block-udp-v4", "dns-block-tcp-v4",
            "dns-tunnel-v6", "dns-block-udp-v6", "dns-block-tcp-v6",
        ]  # fmt: skip

        mark = len(ex.calls)
        await host.kill_switch()
        ks_step = since(ex.calls, mark)
        assert ks_step and all(isinstance(c, P.FwpmFilterAdd) and c.name.startswith("ks-") for c in ks_step)
        assert P.FwpmFilterAdd in {type(c) for c in ks_step} and not any(
            isinstance(c, P.FwpmEngineOpen) for c in ks_step
        ), "the kill switch joins the WFP session the DNS filters opened"
        ssh_permit = next(c for c in ks_step if c.name == f"ks-ssh-{SERVER}")  # type: ignore[union-attr]
        assert P.Condition("FWPM_CONDITION_ALE_APP_ID", "FWP_MATCH_EQUAL", r"C:\Python311\python.exe") in (
            ssh_permit.conditions  # type: ignore[union-attr]
        )

        # Every call of the whole plan was made exactly once, in whatever step asked for it.
        queries = (str, P.GetBestRoute2, P.ConvertInterfaceLuidToIndex)
        made = [c for c in ex.calls if not isinstance(c, queries)]
        assert sorted(map(repr, made)) == sorted(map(repr, P.apply_plan(host._wishes(), host.best).apply))

        mark = len(ex.calls)
        undone = await asyncio.to_thread(host.down)
        down = since(ex.calls, mark)
        assert down[0] == "WintunEndSession", "the session ends before its adapter is closed"
        assert down[1:10] == [
            P.FwpmEngineClose(),
            P.SetInterfaceDnsSettings(P.TUN, P.AF_INET, ()),
            P.DeleteIpForwardEntry2(P.TUN, ip_network("8000::/1"), v6),
            P.DeleteIpForwardEntry2(P.TUN, ip_network("::/1"), v6),
            P.DeleteIpForwardEntry2(P.TUN, ip_network("128.0.0.0/1"), v4),
            P.DeleteIpForwardEntry2(P.TUN, ip_network("0.0.0.0/1"), v4),
            P.DeleteIpForwardEntry2(LAN, EXCLUDE, v4),
            P.DeleteIpForwardEntry2(UPLINK, ip_network("198.18.0.10/32"), GATEWAY),
            P.DeleteUnicastIpAddressEntry(P.TUN, TUN_V6),
        ]
        assert down[10:12] == [
            P.DeleteUnicastIpAddressEntry(P.TUN, TUN_V4),
            P.WintunCloseAdapter("x2ssh"),
        ]
        # then the journal's own undo (deleting a route that is gone already is harmless), newest first
        assert down[12:] == [
            P.DeleteIpForwardEntry2(LAN, EXCLUDE, v4),
            P.DeleteIpForwardEntry2(UPLINK, ip_network("198.18.0.10/32"), GATEWAY),
        ]
        return undone

    undone = asyncio.run(run())
    assert len(undone) == 13 and "removed" in undone[-1]
    assert list(tmp_path.glob("*.journal")) == [], "all undone: the journal is gone"
    with RunLock(tmp_path):  # the run lock was released
        pass
    assert host.down() == [], "down runs once"


def test_a_failing_step_rolls_back_its_own_calls_and_down_undoes_the_rest(tmp_path: Path) -> None:
    half = P.CreateIpForwardEntry2(P.TUN, ip_network("128.0.0.0/1"), ip_address("0.0.0.0"), P.TUNNEL_METRIC)
    ex = Recorder(fail_on=(half,))
    host = make_host(tmp_path, ex)

    async def run() -> None:
        host.start("x2ssh", 1400, [], kill_switch=False)
        await host.open_tun()
        mark = len(ex.calls)
        with pytest.raises(OSError, match="access denied"):
            await host.routes([SERVER])
        assert since(ex.calls, mark)[-2:] == [  # this step's changes, newest first
            P.DeleteIpForwardEntry2(P.TUN, ip_network("0.0.0.0/1"), ip_address("0.0.0.0")),
            P.DeleteIpForwardEntry2(UPLINK, ip_network("198.18.0.10/32"), GATEWAY),
        ]
        mark = len(ex.calls)
        await asyncio.to_thread(host.down)
        assert since(ex.calls, mark) == [
            "WintunEndSession",
            P.DeleteUnicastIpAddressEntry(P.TUN, TUN_V6),
            P.DeleteUnicastIpAddressEntry(P.TUN, TUN_V4),
            P.WintunCloseAdapter("x2ssh"),
            P.DeleteIpForwardEntry2(UPLINK, ip_network("198.18.0.10/32"), GATEWAY),  # the journal's record
        ]

    asyncio.run(run())
    assert list(tmp_path.glob("*.journal")) == []


def test_an_undo_that_fails_keeps_the_journal_and_cleanup_finishes_later(tmp_path: Path) -> None:
    pinned = P.DeleteIpForwardEntry2(UPLINK, ip_network("198.18.0.10/32"), GATEWAY)
    ex = Recorder(fail_on=(pinned,))
    host = make_host(tmp_path, ex)

    async def run() -> None:
        host.start("x2ssh", 1400, [], kill_switch=False)
        await host.open_tun()
        await host.routes([SERVER])
        with pytest.raises(StateError, match="--vpn-cleanup"):
            await asyncio.to_thread(host.down)

    asyncio.run(run())
    assert len(list(tmp_path.glob("*.journal"))) == 1, "kept for --vpn-cleanup"
    ex.fail_on = ()
    later = make_host(tmp_path, ex)
    mark = len(ex.calls)
    done = later.cleanup()
    assert since(ex.calls, mark) == [pinned] and len(done) == 1
    assert list(tmp_path.glob("*.journal")) == []


CRASHING_RUN = textwrap.dedent(
    """
    import asyncio, os, sys
    from ipaddress import ip_address
    sys.path.insert(0, {root!r})
    from tests.unit.test_windows_host import Recorder, make_host
    host = make_host(__import__("pathlib").Path({state!r}), Recorder())

    async def run():
        host.start("x2ssh", 1400, [], kill_switch=False)
        await host.open_tun()
        await host.routes([ip_address("198.18.0.10")])
        os._exit(9)  # killed mid-run: no down(), the journal and the pinned route stay

    asyncio.run(run())
    """
)


def test_a_crashed_run_is_undone_from_its_journal_by_cleanup_and_by_the_next_start(tmp_path: Path) -> None:
    def crash() -> None:
        code = CRASHING_RUN.format(root=str(ROOT), state=str(tmp_path))
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60)
        assert result.returncode == 9, result.stderr.decode()
        assert len(list(tmp_path.glob("*.journal"))) == 1

    crash()
    ex = Recorder()
    done = make_host(tmp_path, ex).cleanup()  # x2ssh --vpn-cleanup
    assert ex.calls == [P.DeleteIpForwardEntry2(UPLINK, ip_network("198.18.0.10/32"), GATEWAY)]
    assert done == ["route 198.18.0.10/32 via 198.18.0.1 (interface 0x6000000000000) removed"]
    assert list(tmp_path.glob("*.journal")) == []

    crash()
    ex = Recorder()
    host = make_host(tmp_path, ex)
    assert host.start("x2ssh", 1400, [], kill_switch=False) == {"undone": done}
    assert ex.calls == [P.DeleteIpForwardEntry2(UPLINK, ip_network("198.18.0.10/32"), GATEWAY)]
    assert host.down() == []


def test_without_administrator_rights_nothing_changes_and_the_message_says_what_to_do(tmp_path: Path) -> None:
    ex = Recorder()
    state = tmp_path / "state"
    host = make_host(state, ex, admin=False)
    with pytest.raises(NotPrivileged, match="Run as administrator"):
        host.start("x2ssh", 1400, [], kill_switch=True)
    with pytest.raises(NotPrivileged):
        host.cleanup()
    assert ex.calls == [] and not state.exists()


@pytest.mark.parametrize(
    ("tun", "mtu", "message"),
    [("", 1400, "adapter name"), ("x2ssh", 100, "MTU 100"), ("x" * 128, 1400, "127")],
)
def test_bad_wishes_are_refused_before_the_lock_or_the_journal(
    tmp_path: Path, tun: str, mtu: int, message: str
) -> None:
    host = make_host(tmp_path / "state", Recorder())
    with pytest.raises(P.PlanError, match=message):
        host.start(tun, mtu, [], kill_switch=False)
    assert not (tmp_path / "state").exists()


def test_steps_out_of_order_are_refused_with_a_reason(tmp_path: Path) -> None:
    ex = Recorder()
    host = make_host(tmp_path, ex)

    async def run() -> None:
        with pytest.raises(P.PlanError, match="start"):
            await host.open_tun()
        host.start("x2ssh", 1400, [], kill_switch=False)
        with pytest.raises(P.PlanError, match="routes"):
            await host.dns([DNS])
        with pytest.raises(P.PlanError, match="routes"):
            await host.kill_switch()
        assert ex.calls == []
        host.down()

    asyncio.run(run())


def test_down_from_the_console_thread_and_the_loop_at_once_undoes_once(tmp_path: Path) -> None:
    ex = Recorder()
    host = make_host(tmp_path, ex)

    async def run() -> None:
        host.start("x2ssh", 1400, [], kill_switch=False)
        await host.open_tun()
        await host.routes([SERVER])

    asyncio.run(run())
    mark = len(ex.calls)
    threads = [threading.Thread(target=host._down_quietly) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert since(ex.calls, mark).count(P.WintunCloseAdapter("x2ssh")) == 1


def test_run_dir_is_private_and_removed_at_down(tmp_path: Path) -> None:
    host = make_host(tmp_path, Recorder())

    async def run() -> Path:
        host.start("x2ssh", 1400, [], kill_switch=False)
        return await host.run_dir()

    path = asyncio.run(run())
    assert path.is_dir() and (os.name == "nt" or path.stat().st_mode & 0o077 == 0)
    host.down()
    assert not path.exists()


def test_network_changes_reach_the_session_on_the_loop_except_the_tunnels_own() -> None:
    async def run() -> list[str]:
        notify: list = []
        cancelled: list[bool] = []

        def register(callback):  # stands in for NotifyUnicastIpAddressChange
            notify.append(callback)
            return lambda: cancelled.append(True)

        got: list[str] = []
        loop_thread = threading.current_thread()
        done = asyncio.Event()

        def on_change(reason: str) -> None:
            assert threading.current_thread() is loop_thread
            got.append(reason)
            done.set()

        watch = AddressWatch(on_change, lambda: {42}, register)
        watch.start()
        for index, kind in ((42, 1), (7, 2)):  # the system calls back on threads of its own
            t = threading.Thread(target=notify[0], args=(index, kind))
            t.start()
            t.join()
        await asyncio.wait_for(done.wait(), 5)
        watch.close()
        notify[0](7, 1)  # after close: nothing
        await asyncio.sleep(0.01)
        assert cancelled == [True]
        return got

    assert asyncio.run(run()) == ["address removed on interface 7"]


def test_the_hosts_watch_knows_the_tunnel_by_its_luids_index_not_by_name(tmp_path: Path) -> None:
    """The session's `ignore` (if_nametoindex on the adapter's alias) may find nothing on Windows: the host
    adds the index that ConvertInterfaceLuidToIndex gave for the adapter's LUID."""
    notify: list = []

    def register(callback):  # stands in for NotifyUnicastIpAddressChange
        notify.append(callback)
        return lambda: None

    ex = Recorder()
    host = make_host(tmp_path, ex, watch_register=register)

    async def run() -> list[str]:
        host.start("x2ssh", 1400, [], kill_switch=False)
        await host.open_tun()
        got: list[str] = []
        done = asyncio.Event()

        def on_change(reason: str) -> None:
            got.append(reason)
            done.set()

        watch = host.network_watch(on_change, lambda: {99})  # 99: what the session's own lookup found
        watch.start()
        for index in (TUN_INDEX, 99, 7):
            notify[0](index, 1)
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.01)
        watch.close()
        await asyncio.to_thread(host.down)
        return got

    assert asyncio.run(run()) == ["address added on interface 7"]


def test_the_factory_picks_the_platforms_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(open_host(tmp_path, platform="win32"), WindowsHost)
    spawned: list[Path] = []
    monkeypatch.setattr(
        HelperClient, "spawn", staticmethod(lambda state_dir, verbose=0: spawned.append(state_dir))
    )
    open_host(tmp_path, platform="linux")
    assert spawned == [tmp_path]


def test_route_records_round_trip_and_bad_ones_are_refused() -> None:
    call = P.CreateIpForwardEntry2(UPLINK, ip_network("2001:db8::/32"), ip_address("fe80::1"), 0)
    data = json.loads(json.dumps(records.route_record(call)))
    assert records.route_undo_call(data) == P.DeleteIpForwardEntry2(UPLINK, call.destination, call.next_hop)
    for bad in (
        {},
        {**data, "interface": "wintun"},
        {**data, "interface": True},
        {**data, "destination": "x"},
    ):
        with pytest.raises(ValueError):
            records.route_undo_call(bad)
