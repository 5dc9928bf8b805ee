"""WFP structures built from the plan's filter records (pure: fills ctypes structures, calls nothing).

GUIDs from fwpmu.h (cross-checked against mingw-w64's copy as OpenVPN ships it in win32-wfp.h). A filter
condition points at values that must outlive the FwpmFilterAdd0 call; `Marshal.keep` holds them.

Weights: the sublayer has the highest weight (0xFFFF), so its verdict is taken before other sublayers'
permits can matter for a block; inside it, filters carry an FWP_UINT8 weight (0..15), permits above blocks.
"""

from __future__ import annotations

import ctypes
import uuid
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from x2ssh.host.windows import structs as S
from x2ssh.host.windows.plan import TUN, Condition, FwpmFilterAdd

LAYERS = {
    "FWPM_LAYER_ALE_AUTH_CONNECT_V4": uuid.UUID("c38d57d1-05a7-4c33-904f-7fbceee60e82"),
    "FWPM_LAYER_ALE_AUTH_CONNECT_V6": uuid.UUID("4a72393b-319f-44bc-84c3-ba54dcb3b6b4"),
    "FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V4": uuid.UUID("e1cd9fe7-f4b5-4273-96c0-592e487b8650"),
    "FWPM_LAYER_ALE_AUTH_RECV_ACCEPT_V6": uuid.UUID("a3b42c97-9f04-4672-b87e-cee9c483257f"),
}
CONDITIONS = {
    "FWPM_CONDITION_IP_LOCAL_INTERFACE": uuid.UUID("4cd62a49-59c3-4969-b7f3-bda5d32890a4"),
    "FWPM_CONDITION_IP_REMOTE_ADDRESS": uuid.UUID("b235ae9a-1d64-49b8-a44c-5ff3d9095045"),
    "FWPM_CONDITION_IP_REMOTE_PORT": uuid.UUID("c35a604d-d22b-4e1a-91b4-68f674ee674b"),
    "FWPM_CONDITION_IP_LOCAL_PORT": uuid.UUID("0c1ba1af-5765-453f-af22-a8f791ac775b"),
    "FWPM_CONDITION_IP_PROTOCOL": uuid.UUID("3971ef2b-623e-4f9a-8cb1-6e79b806b9a7"),
    "FWPM_CONDITION_ALE_APP_ID": uuid.UUID("d78e1e87-8644-4ea5-9437-d809ecefc971"),
    "FWPM_CONDITION_FLAGS": uuid.UUID("632ce23b-5167-435c-86d7-e903684aa80c"),
}
# fwpmu.h: #define FWPM_CONDITION_ICMP_TYPE FWPM_CONDITION_IP_LOCAL_PORT
CONDITIONS["FWPM_CONDITION_ICMP_TYPE"] = CONDITIONS["FWPM_CONDITION_IP_LOCAL_PORT"]
FLAGS = {"FWP_CONDITION_FLAG_IS_LOOPBACK": S.FWP_CONDITION_FLAG_IS_LOOPBACK}
PORT_FIELDS = {"FWPM_CONDITION_IP_REMOTE_PORT", "FWPM_CONDITION_IP_LOCAL_PORT", "FWPM_CONDITION_ICMP_TYPE"}

AppId = Callable[[str], Any]  # path -> POINTER(FWP_BYTE_BLOB) (FwpmGetAppIdFromFileName0 on Windows)


class Marshal:
    """Turns plan filter records into FWPM_FILTER0 structures; keeps every pointee alive while in use."""

    def __init__(self, sublayer: uuid.UUID, tun_luid: int, app_id: AppId) -> None:
        self.sublayer = sublayer
        self.tun_luid = tun_luid
        self.app_id = app_id
        self.keep: list[Any] = []

    def _hold(self, obj: Any) -> int:
        self.keep.append(obj)
        return ctypes.addressof(obj)

    def value(self, cond: Condition) -> S.FWP_CONDITION_VALUE0:
        """The FWP_CONDITION_VALUE0 for one condition of the plan."""
        out = S.FWP_CONDITION_VALUE0()
        v = cond.value
        name = cond.field
        if name == "FWPM_CONDITION_IP_LOCAL_INTERFACE":
            luid = S.UINT64(self.tun_luid if v == TUN else int(v))  # type: ignore[call-overload]
            out.type, out.pointer = S.FWP_UINT64, self._hold(luid)
        elif name == "FWPM_CONDITION_IP_PROTOCOL":
            out.type, out.uint8 = S.FWP_UINT8, int(v)  # type: ignore[call-overload]
        elif name in PORT_FIELDS and isinstance(v, tuple):
            rng = S.FWP_RANGE0()
            rng.valueLow.type, rng.valueLow.uint16 = S.FWP_UINT16, v[0]
            rng.valueHigh.type, rng.valueHigh.uint16 = S.FWP_UINT16, v[1]
            out.type, out.pointer = S.FWP_RANGE_TYPE, self._hold(rng)
        elif name in PORT_FIELDS:
            out.type, out.uint16 = S.FWP_UINT16, int(v)  # type: ignore[call-overload]
        elif name == "FWPM_CONDITION_FLAGS":
            out.type, out.uint32 = S.FWP_UINT32, FLAGS[str(v)]
        elif name == "FWPM_CONDITION_ALE_APP_ID":
            blob = self.app_id(str(v))
            self.keep.append(blob)
            out.type, out.pointer = S.FWP_BYTE_BLOB_TYPE, ctypes.cast(blob, ctypes.c_void_p).value
        elif name == "FWPM_CONDITION_IP_REMOTE_ADDRESS":
            self._address(out, v)
        else:
            raise ValueError(f"no marshalling for condition {name}")
        return out

    def _address(self, out: S.FWP_CONDITION_VALUE0, v: object) -> None:
        if isinstance(v, IPv4Address):
            out.type, out.uint32 = S.FWP_UINT32, int(v)  # host byte order
        elif isinstance(v, IPv4Network):
            mask = S.FWP_V4_ADDR_AND_MASK(int(v.network_address), int(v.netmask))
            out.type, out.pointer = S.FWP_V4_ADDR_MASK, self._hold(mask)
        elif isinstance(v, IPv6Address | IPv6Network):
            net = IPv6Network(v)
            mask6 = S.FWP_V6_ADDR_AND_MASK()
            mask6.addr[:] = list(net.network_address.packed)
            mask6.prefixLength = net.prefixlen
            out.type, out.pointer = S.FWP_V6_ADDR_MASK, self._hold(mask6)
        else:
            raise ValueError(f"not an address or network: {v!r}")

    def filter(self, record: FwpmFilterAdd) -> S.FWPM_FILTER0:
        """The FWPM_FILTER0 for one filter record."""
        f = S.FWPM_FILTER0()
        f.displayData.name = f"x2ssh {record.name}"
        f.layerKey = S.GUID.from_uuid(LAYERS[record.layer])
        f.subLayerKey = S.GUID.from_uuid(self.sublayer)
        f.weight.type, f.weight.uint8 = S.FWP_UINT8, record.weight
        f.action.type = S.FWP_ACTION_PERMIT if record.action == "PERMIT" else S.FWP_ACTION_BLOCK
        if record.conditions:
            conds = (S.FWPM_FILTER_CONDITION0 * len(record.conditions))()
            for slot, cond in zip(conds, record.conditions, strict=True):
                slot.fieldKey = S.GUID.from_uuid(CONDITIONS[cond.field])
                slot.matchType = S.FWP_MATCH[cond.match]
                slot.conditionValue = self.value(cond)
            self.keep.append(conds)
            f.numFilterConditions = len(record.conditions)
            f.filterCondition = ctypes.cast(conds, ctypes.POINTER(S.FWPM_FILTER_CONDITION0))
        return f

    def sublayer_struct(self, name: str, weight: int) -> S.FWPM_SUBLAYER0:
        s = S.FWPM_SUBLAYER0()
        s.subLayerKey = S.GUID.from_uuid(self.sublayer)
        s.displayData.name = name
        s.weight = weight
        return s


def dynamic_session() -> S.FWPM_SESSION0:
    """FWPM_SESSION0 with FWPM_SESSION_FLAG_DYNAMIC: every object added goes when the handle closes."""
    session = S.FWPM_SESSION0()
    session.displayData.name = "x2ssh"
    session.flags = S.FWPM_SESSION_FLAG_DYNAMIC
    return session
