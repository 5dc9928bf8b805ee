"""The Windows executor's marshalling: plan records into ctypes structures, field by field (no DLL)."""

from __future__ import annotations

import ctypes
import typing
import uuid
from ipaddress import ip_address, ip_interface, ip_network

import pytest

from x2ssh.host.windows import iphlpapi as H
from x2ssh.host.windows import plan as P
from x2ssh.host.windows import structs as S
from x2ssh.host.windows import wfp
from x2ssh.host.windows.executor import WindowsExecutor

LUID = 0x0006000000001234


def test_unicast_row() -> None:
    row = H.fill_unicast_row(S.MIB_UNICASTIPADDRESS_ROW(), LUID, ip_interface("100.100.83.1/24"))
    assert S.sockaddr_address(row.Address) == ip_address("100.100.83.1")
    assert row.InterfaceLuid.Value == LUID and row.OnLinkPrefixLength == 24
    assert row.DadState == S.IpDadStatePreferred


def test_forward_row_and_best_route_answer() -> None:
    row = H.fill_forward_row(S.MIB_IPFORWARD_ROW2(), LUID, ip_network("8000::/1"), ip_address("::"), 1)
    assert S.sockaddr_address(row.DestinationPrefix.Prefix) == ip_address("8000::")
    assert row.DestinationPrefix.PrefixLength == 1 and row.Metric == 1
    assert row.Protocol == S.MIB_IPPROTO_NETMGMT
    assert H.best_route_answer(row) == P.BestRoute(LUID, ip_address("::"))
    with pytest.raises(ValueError, match="families differ"):
        H.fill_forward_row(S.MIB_IPFORWARD_ROW2(), LUID, ip_network("10.0.0.0/8"), ip_address("::"))


def test_interface_row_for_ipv4_clears_site_prefix_length() -> None:
    row = S.MIB_IPINTERFACE_ROW(Family=S.AF_INET, SitePrefixLength=64, UseAutomaticMetric=True)
    H.fill_interface_row(row, 1400, 1)
    assert (row.NlMtu, row.Metric, row.UseAutomaticMetric, row.SitePrefixLength) == (1400, 1, 0, 0)


def test_dns_settings() -> None:
    v6 = H.dns_settings(S.AF_INET6, (ip_address("fd78:7832:7373::53"),))
    assert v6.Flags == S.DNS_SETTING_NAMESERVER | S.DNS_SETTING_IPV6
    assert v6.NameServer == "fd78:7832:7373::53" and v6.Version == 1
    cleared = H.dns_settings(S.AF_INET, ())
    assert cleared.Flags == S.DNS_SETTING_NAMESERVER and cleared.NameServer == ""


def test_check_raises_with_the_code_and_tolerates_done() -> None:
    H.check(0, "x")
    H.check(S.ERROR_NOT_FOUND, "x", (S.ERROR_NOT_FOUND,))
    with pytest.raises(OSError, match="CreateIpForwardEntry2 failed with Windows error 5") as info:
        H.check(5, "CreateIpForwardEntry2")
    assert info.value.errno == 5


def _marshal() -> wfp.Marshal:
    blob = S.FWP_BYTE_BLOB(4, (ctypes.c_uint8 * 4)(1, 2, 3, 4))
    return wfp.Marshal(uuid.UUID(int=7), LUID, lambda path: ctypes.pointer(blob))


def _filter_for(wishes: P.Wishes, name: str) -> P.FwpmFilterAdd:
    best = {e.address: P.BestRoute(1, ip_address("198.18.0.1")) for e in wishes.ssh_endpoints}
    best.update({n.network_address: P.BestRoute(1, ip_address("198.18.0.1")) for n in wishes.excludes})
    plan = P.apply_plan(wishes, best)
    return next(c for c in plan.apply if isinstance(c, P.FwpmFilterAdd) and c.name == name)


WISHES = P.Wishes(
    "x2ssh",
    1400,
    (P.Endpoint(ip_address("198.18.0.10"), 22),),
    excludes=(ip_network("198.19.0.0/16"), ip_network("fd00:1::/64")),
    kill_switch=True,
    app_path=r"C:\x2ssh\python.exe",
)


def test_ssh_permit_filter_fields() -> None:
    m = _marshal()
    f = m.filter(_filter_for(WISHES, "ks-ssh-198.18.0.10-22"))
    assert f.layerKey.to_uuid() == wfp.LAYERS["FWPM_LAYER_ALE_AUTH_CONNECT_V4"]
    assert f.subLayerKey.to_uuid() == uuid.UUID(int=7)
    assert f.action.type == S.FWP_ACTION_PERMIT == 0x1002
    assert (f.weight.type, f.weight.uint8) == (S.FWP_UINT8, P.W_PERMIT)
    assert f.numFilterConditions == 4
    conds = [f.filterCondition[i] for i in range(4)]
    assert [c.fieldKey.to_uuid() for c in conds] == [
        wfp.CONDITIONS[n]
        for n in (
            "FWPM_CONDITION_ALE_APP_ID",
            "FWPM_CONDITION_IP_PROTOCOL",
            "FWPM_CONDITION_IP_REMOTE_ADDRESS",
            "FWPM_CONDITION_IP_REMOTE_PORT",
        )
    ]
    app, proto, addr, port = (c.conditionValue for c in conds)
    assert app.type == S.FWP_BYTE_BLOB_TYPE
    assert ctypes.cast(app.pointer, ctypes.POINTER(S.FWP_BYTE_BLOB)).contents.size == 4
    assert (proto.type, proto.uint8) == (S.FWP_UINT8, 6)
    assert (addr.type, addr.uint32) == (S.FWP_UINT32, int(ip_address("198.18.0.10")))
    assert (port.type, port.uint16) == (S.FWP_UINT16, 22)


def test_exclude_networks_and_interface_and_ranges() -> None:
    m = _marshal()
    v4 = m.filter(_filter_for(WISHES, "ks-exclude-out-198.19.0.0/16")).filterCondition[0].conditionValue
    mask = ctypes.cast(v4.pointer, ctypes.POINTER(S.FWP_V4_ADDR_AND_MASK)).contents
    assert v4.type == S.FWP_V4_ADDR_MASK
    assert (mask.addr, mask.mask) == (int(ip_address("198.19.0.0")), 0xFFFF0000)
    v6 = m.filter(_filter_for(WISHES, "ks-exclude-out-fd00:1::/64")).filterCondition[0].conditionValue
    mask6 = ctypes.cast(v6.pointer, ctypes.POINTER(S.FWP_V6_ADDR_AND_MASK)).contents
    assert v6.type == S.FWP_V6_ADDR_MASK and mask6.prefixLength == 64
    assert bytes(mask6.addr) == ip_address("fd00:1::").packed
    tun = m.filter(_filter_for(WISHES, "ks-tunnel-out-v4")).filterCondition[0].conditionValue
    assert tun.type == S.FWP_UINT64
    assert ctypes.cast(tun.pointer, ctypes.POINTER(ctypes.c_uint64)).contents.value == LUID
    nd = m.filter(_filter_for(WISHES, "ks-nd-in"))
    assert nd.filterCondition[1].matchType == S.FWP_MATCH["FWP_MATCH_RANGE"]
    rng = ctypes.cast(nd.filterCondition[1].conditionValue.pointer, ctypes.POINTER(S.FWP_RANGE0)).contents
    assert (rng.valueLow.uint16, rng.valueHigh.uint16) == (133, 137)
    loop = m.filter(_filter_for(WISHES, "ks-loopback-in-v6")).filterCondition[0]
    assert loop.matchType == S.FWP_MATCH["FWP_MATCH_FLAGS_ALL_SET"]
    assert (loop.conditionValue.type, loop.conditionValue.uint32) == (S.FWP_UINT32, 1)


def test_block_all_has_no_conditions() -> None:
    f = _marshal().filter(_filter_for(WISHES, "ks-block-in-v6"))
    assert f.numFilterConditions == 0 and not f.filterCondition
    assert f.action.type == S.FWP_ACTION_BLOCK == 0x1001
    assert f.layerKey.to_uuid() == wfp.LAYERS["FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6"]


def test_dynamic_session_and_sublayer() -> None:
    assert wfp.dynamic_session().flags == S.FWPM_SESSION_FLAG_DYNAMIC
    sub = _marshal().sublayer_struct("x2ssh", P.SUBLAYER_WEIGHT)
    assert sub.weight == 0xFFFF and sub.subLayerKey.to_uuid() == uuid.UUID(int=7)


def test_every_condition_the_plans_use_has_a_guid() -> None:
    best = {ip_address("198.18.0.10"): P.BestRoute(1, ip_address("198.18.0.1"))}
    best.update({n.network_address: P.BestRoute(1, ip_address("198.18.0.1")) for n in WISHES.excludes})
    plan = P.apply_plan(P.Wishes(**{**WISHES.__dict__, "dns_servers": (ip_address("100.100.83.53"),)}), best)
    filters = [c for c in plan.apply if isinstance(c, P.FwpmFilterAdd)]
    m = _marshal()
    for f in filters:
        m.filter(f)  # raises on an unknown field, layer or match
    assert {c.field for f in filters for c in f.conditions} <= set(wfp.CONDITIONS)


def test_executor_has_a_handler_for_every_call_record() -> None:
    records = typing.get_args(P.Call)
    assert len(records) == 15
    for record in records:
        assert callable(getattr(WindowsExecutor, "_" + record.__name__)), record.__name__
