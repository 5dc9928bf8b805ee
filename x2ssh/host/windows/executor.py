"""The thin ctypes executor: carries out the plan's call records with the real Win32 functions.

NOT RUN: there is no Windows machine where this was written. Each branch only marshals a record with
`iphlpapi` / `wfp` (which the Linux tests check field by field) and makes the one call the record names,
through `prototypes.function` (whose signatures are checked against the documentation).
"""

from __future__ import annotations

import ctypes
import subprocess
import uuid
from typing import Any

from x2ssh.host.windows import iphlpapi as H
from x2ssh.host.windows import plan as P
from x2ssh.host.windows import structs as S
from x2ssh.host.windows import wfp
from x2ssh.host.windows.prototypes import function as fn

TUNNEL_TYPE = "x2ssh"


class WindowsExecutor:
    """Implements `plan.Executor` on Windows. Holds the adapter and the WFP engine handle of one run."""

    def __init__(self) -> None:
        self.adapter: int | None = None
        self.tun_luid = 0
        self.engine = S.HANDLE()
        self.marshal: wfp.Marshal | None = None

    def _luid(self, interface: P.Interface) -> int:
        return self.tun_luid if interface == P.TUN else int(interface)

    def call(self, record: P.Call) -> object:
        """Carry out one record; returns GetBestRoute2's answer as a `plan.BestRoute`, an interface index for
        ConvertInterfaceLuidToIndex, else None."""
        method = getattr(self, "_" + type(record).__name__)
        return method(record)

    # ---- Wintun
    def _WintunCreateAdapter(self, r: P.WintunCreateAdapter) -> None:
        handle = fn("WintunCreateAdapter")(r.name, r.tunnel_type, None)
        if not handle:
            raise ctypes.WinError(ctypes.get_last_error())
        self.adapter = handle
        luid = S.NET_LUID()
        fn("WintunGetAdapterLUID")(handle, ctypes.byref(luid))
        self.tun_luid = luid.Value

    def _WintunCloseAdapter(self, r: P.WintunCloseAdapter) -> None:
        if self.adapter:
            fn("WintunCloseAdapter")(self.adapter)  # removes the adapter, its addresses and routes
            self.adapter = None

    # ---- IP Helper
    def _SetIpInterfaceEntry(self, r: P.SetIpInterfaceEntry) -> None:
        row = S.MIB_IPINTERFACE_ROW()
        fn("InitializeIpInterfaceEntry")(ctypes.byref(row))
        row.Family = r.family
        row.InterfaceLuid.Value = self._luid(r.interface)
        H.check(fn("GetIpInterfaceEntry")(ctypes.byref(row)), "GetIpInterfaceEntry")
        H.fill_interface_row(row, r.mtu, r.metric)
        H.check(fn("SetIpInterfaceEntry")(ctypes.byref(row)), "SetIpInterfaceEntry")

    def _unicast(self, r: P.CreateUnicastIpAddressEntry | P.DeleteUnicastIpAddressEntry) -> Any:
        row = S.MIB_UNICASTIPADDRESS_ROW()
        fn("InitializeUnicastIpAddressEntry")(ctypes.byref(row))
        return ctypes.byref(H.fill_unicast_row(row, self._luid(r.interface), r.address))

    def _CreateUnicastIpAddressEntry(self, r: P.CreateUnicastIpAddressEntry) -> None:
        status = fn("CreateUnicastIpAddressEntry")(self._unicast(r))
        H.check(status, "CreateUnicastIpAddressEntry", (S.ERROR_OBJECT_ALREADY_EXISTS,))

    def _DeleteUnicastIpAddressEntry(self, r: P.DeleteUnicastIpAddressEntry) -> None:
        status = fn("DeleteUnicastIpAddressEntry")(self._unicast(r))
        H.check(status, "DeleteUnicastIpAddressEntry", (S.ERROR_NOT_FOUND,))

    def _GetBestRoute2(self, r: P.GetBestRoute2) -> P.BestRoute:
        row, source = S.MIB_IPFORWARD_ROW2(), S.SOCKADDR_INET()
        dest = S.sockaddr_inet(r.destination)
        status = fn("GetBestRoute2")(
            None, 0, None, ctypes.byref(dest), 0, ctypes.byref(row), ctypes.byref(source)
        )
        H.check(status, f"GetBestRoute2 for {r.destination}")
        return H.best_route_answer(row)

    def _ConvertInterfaceLuidToIndex(self, r: P.ConvertInterfaceLuidToIndex) -> int:
        luid, index = S.NET_LUID(self._luid(r.interface)), S.NET_IFINDEX()
        status = fn("ConvertInterfaceLuidToIndex")(ctypes.byref(luid), ctypes.byref(index))
        H.check(status, f"ConvertInterfaceLuidToIndex {r.interface}")
        return int(index.value)

    def _forward(self, r: P.CreateIpForwardEntry2 | P.DeleteIpForwardEntry2, metric: int) -> Any:
        row = S.MIB_IPFORWARD_ROW2()
        fn("InitializeIpForwardEntry")(ctypes.byref(row))
        return ctypes.byref(
            H.fill_forward_row(row, self._luid(r.interface), r.destination, r.next_hop, metric)
        )

    def _CreateIpForwardEntry2(self, r: P.CreateIpForwardEntry2) -> None:
        status = fn("CreateIpForwardEntry2")(self._forward(r, r.metric))
        H.check(status, f"CreateIpForwardEntry2 {r.destination}", (S.ERROR_OBJECT_ALREADY_EXISTS,))

    def _DeleteIpForwardEntry2(self, r: P.DeleteIpForwardEntry2) -> None:
        status = fn("DeleteIpForwardEntry2")(self._forward(r, 0))
        H.check(status, f"DeleteIpForwardEntry2 {r.destination}", (S.ERROR_NOT_FOUND,))

    # ---- DNS
    def _SetInterfaceDnsSettings(self, r: P.SetInterfaceDnsSettings) -> None:
        luid, guid = S.NET_LUID(self._luid(r.interface)), S.GUID()
        H.check(fn("ConvertInterfaceLuidToGuid")(ctypes.byref(luid), ctypes.byref(guid)), "LUID to GUID")
        settings = H.dns_settings(r.family, r.servers)
        H.check(fn("SetInterfaceDnsSettings")(guid, ctypes.byref(settings)), "SetInterfaceDnsSettings")

    def _Netsh(self, r: P.Netsh) -> None:
        subprocess.run(list(r.argv), check=True, capture_output=True)

    # ---- WFP
    def _FwpmEngineOpen(self, r: P.FwpmEngineOpen) -> None:
        session = wfp.dynamic_session()
        status = fn("FwpmEngineOpen0")(
            None, S.RPC_C_AUTHN_WINNT, None, ctypes.byref(session), ctypes.byref(self.engine)
        )
        H.check(status, "FwpmEngineOpen0")
        self.marshal = wfp.Marshal(uuid.uuid4(), self.tun_luid, self._app_id)

    def _app_id(self, path: str) -> Any:
        blob = ctypes.POINTER(S.FWP_BYTE_BLOB)()
        H.check(fn("FwpmGetAppIdFromFileName0")(path, ctypes.byref(blob)), f"app id of {path}")
        return blob  # freed with FwpmFreeMemory0 when the engine closes

    def _FwpmSubLayerAdd(self, r: P.FwpmSubLayerAdd) -> None:
        assert self.marshal is not None, "the plan opens the engine first"
        sub = self.marshal.sublayer_struct(r.name, r.weight)
        H.check(fn("FwpmSubLayerAdd0")(self.engine, ctypes.byref(sub), None), "FwpmSubLayerAdd0")

    def _FwpmFilterAdd(self, r: P.FwpmFilterAdd) -> None:
        assert self.marshal is not None, "the plan opens the engine first"
        filt, ident = self.marshal.filter(r), S.UINT64()
        status = fn("FwpmFilterAdd0")(self.engine, ctypes.byref(filt), None, ctypes.byref(ident))
        H.check(status, f"FwpmFilterAdd0 {r.name}")

    def _FwpmEngineClose(self, r: P.FwpmEngineClose) -> None:
        if self.engine.value:
            H.check(fn("FwpmEngineClose0")(self.engine), "FwpmEngineClose0")  # dynamic objects go with it
            self.engine = S.HANDLE()
        if self.marshal is not None:
            for kept in self.marshal.keep:
                if isinstance(kept, ctypes.POINTER(S.FWP_BYTE_BLOB)):
                    fn("FwpmFreeMemory0")(ctypes.byref(ctypes.cast(kept, ctypes.c_void_p)))
            self.marshal = None
