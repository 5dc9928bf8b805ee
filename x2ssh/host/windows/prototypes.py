"""The prototype (restype, argtypes) of every Win32 / Wintun function the Windows backend calls.

One table, `PROTOTYPES`, declared with plain ctypes types so this module imports on Linux; `function(dll,
name)` loads the DLL on first use (Windows only) and applies the prototype before handing the function
out, so nothing is ever called with ctypes' default int-sized arguments. tests/unit/test_windows_ctypes.py
checks every row against the documented C signature (Microsoft's docs for iphlpapi, fwpuclnt, kernel32,
advapi32, shell32; wintun.h as bundled with pytun-pmd3 for Wintun).

Pointers to structures the callee only reads are declared as POINTER(struct); ctypes then refuses a wrong
structure type. Handles are c_void_p. SetConsoleCtrlHandler's callback is passed as c_void_p, which accepts
a WINFUNCTYPE instance; so is NotifyUnicastIpAddressChange's callback.
"""

from __future__ import annotations

import functools
import importlib.util
import platform
import sys
from ctypes import POINTER, c_uint8, c_void_p, c_wchar_p
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from x2ssh.host.windows import structs as S


@dataclass(frozen=True)
class Prototype:
    dll: str
    name: str
    restype: Any
    argtypes: tuple[Any, ...]


_P = POINTER
PROTOTYPES: tuple[Prototype, ...] = (
    # iphlpapi.dll (netioapi.h)
    Prototype("iphlpapi", "InitializeUnicastIpAddressEntry", None, (_P(S.MIB_UNICASTIPADDRESS_ROW),)),
    Prototype("iphlpapi", "CreateUnicastIpAddressEntry", S.DWORD, (_P(S.MIB_UNICASTIPADDRESS_ROW),)),
    Prototype("iphlpapi", "DeleteUnicastIpAddressEntry", S.DWORD, (_P(S.MIB_UNICASTIPADDRESS_ROW),)),
    Prototype("iphlpapi", "InitializeIpForwardEntry", None, (_P(S.MIB_IPFORWARD_ROW2),)),
    Prototype("iphlpapi", "CreateIpForwardEntry2", S.DWORD, (_P(S.MIB_IPFORWARD_ROW2),)),
    Prototype("iphlpapi", "DeleteIpForwardEntry2", S.DWORD, (_P(S.MIB_IPFORWARD_ROW2),)),
    Prototype(
        "iphlpapi",
        "GetBestRoute2",
        S.DWORD,
        (
            _P(S.NET_LUID),
            S.NET_IFINDEX,
            _P(S.SOCKADDR_INET),
            _P(S.SOCKADDR_INET),
            S.ULONG,
            _P(S.MIB_IPFORWARD_ROW2),
            _P(S.SOCKADDR_INET),
        ),
    ),
    Prototype("iphlpapi", "InitializeIpInterfaceEntry", None, (_P(S.MIB_IPINTERFACE_ROW),)),
    Prototype("iphlpapi", "GetIpInterfaceEntry", S.DWORD, (_P(S.MIB_IPINTERFACE_ROW),)),
    Prototype("iphlpapi", "SetIpInterfaceEntry", S.DWORD, (_P(S.MIB_IPINTERFACE_ROW),)),
    Prototype("iphlpapi", "SetInterfaceDnsSettings", S.DWORD, (S.GUID, _P(S.DNS_INTERFACE_SETTINGS))),
    Prototype("iphlpapi", "ConvertInterfaceLuidToIndex", S.DWORD, (_P(S.NET_LUID), _P(S.NET_IFINDEX))),
    Prototype("iphlpapi", "ConvertInterfaceLuidToGuid", S.DWORD, (_P(S.NET_LUID), _P(S.GUID))),
    Prototype(
        "iphlpapi",
        "NotifyUnicastIpAddressChange",
        S.DWORD,
        (S.ADDRESS_FAMILY, c_void_p, c_void_p, S.BOOLEAN, _P(S.HANDLE)),
    ),
    Prototype("iphlpapi", "CancelMibChangeNotify2", S.DWORD, (S.HANDLE,)),
    # fwpuclnt.dll (fwpmu.h)
    Prototype(
        "fwpuclnt",
        "FwpmEngineOpen0",
        S.DWORD,
        (c_wchar_p, S.UINT32, c_void_p, _P(S.FWPM_SESSION0), _P(S.HANDLE)),
    ),
    Prototype("fwpuclnt", "FwpmEngineClose0", S.DWORD, (S.HANDLE,)),
    Prototype("fwpuclnt", "FwpmSubLayerAdd0", S.DWORD, (S.HANDLE, _P(S.FWPM_SUBLAYER0), c_void_p)),
    Prototype("fwpuclnt", "FwpmFilterAdd0", S.DWORD, (S.HANDLE, _P(S.FWPM_FILTER0), c_void_p, _P(S.UINT64))),
    Prototype("fwpuclnt", "FwpmGetAppIdFromFileName0", S.DWORD, (c_wchar_p, _P(_P(S.FWP_BYTE_BLOB)))),
    Prototype("fwpuclnt", "FwpmFreeMemory0", None, (_P(c_void_p),)),
    # kernel32.dll (consoleapi.h, synchapi.h, handleapi.h)
    Prototype("kernel32", "SetConsoleCtrlHandler", S.BOOL, (c_void_p, S.BOOL)),
    Prototype("kernel32", "CreateEventW", S.HANDLE, (c_void_p, S.BOOL, S.BOOL, c_wchar_p)),
    Prototype("kernel32", "SetEvent", S.BOOL, (S.HANDLE,)),
    Prototype("kernel32", "CloseHandle", S.BOOL, (S.HANDLE,)),
    Prototype("kernel32", "WaitForMultipleObjects", S.DWORD, (S.DWORD, _P(S.HANDLE), S.BOOL, S.DWORD)),
    # kernel32.dll (processthreadsapi.h)
    Prototype("kernel32", "OpenProcess", S.HANDLE, (S.DWORD, S.BOOL, S.DWORD)),
    Prototype("kernel32", "GetExitCodeProcess", S.BOOL, (S.HANDLE, _P(S.DWORD))),
    Prototype(
        "kernel32",
        "GetProcessTimes",
        S.BOOL,
        (S.HANDLE, _P(S.FILETIME), _P(S.FILETIME), _P(S.FILETIME), _P(S.FILETIME)),
    ),
    # kernel32.dll (fileapi.h, winbase.h): the state directory, made with its security descriptor
    Prototype("kernel32", "CreateDirectoryW", S.BOOL, (c_wchar_p, c_void_p)),
    Prototype("kernel32", "LocalFree", c_void_p, (c_void_p,)),
    # advapi32.dll (sddl.h, securitybaseapi.h, aclapi.h)
    Prototype(
        "advapi32",
        "ConvertStringSecurityDescriptorToSecurityDescriptorW",
        S.BOOL,
        (c_wchar_p, S.DWORD, _P(c_void_p), _P(S.ULONG)),
    ),
    Prototype(
        "advapi32", "GetSecurityDescriptorDacl", S.BOOL, (c_void_p, _P(S.BOOL), _P(c_void_p), _P(S.BOOL))
    ),
    Prototype(
        "advapi32",
        "GetNamedSecurityInfoW",
        S.DWORD,
        (
            c_wchar_p,
            S.SE_OBJECT_TYPE,
            S.SECURITY_INFORMATION,
            _P(c_void_p),
            _P(c_void_p),
            _P(c_void_p),
            _P(c_void_p),
            _P(c_void_p),
        ),
    ),
    Prototype(
        "advapi32",
        "SetNamedSecurityInfoW",
        S.DWORD,
        (c_wchar_p, S.SE_OBJECT_TYPE, S.SECURITY_INFORMATION, c_void_p, c_void_p, c_void_p, c_void_p),
    ),
    Prototype("advapi32", "ConvertSidToStringSidW", S.BOOL, (c_void_p, _P(c_void_p))),
    # shell32.dll (shlobj_core.h)
    Prototype("shell32", "IsUserAnAdmin", S.BOOL, ()),
    # wintun.dll (wintun.h)
    Prototype("wintun", "WintunCreateAdapter", c_void_p, (c_wchar_p, c_wchar_p, _P(S.GUID))),
    Prototype("wintun", "WintunCloseAdapter", None, (c_void_p,)),
    Prototype("wintun", "WintunGetAdapterLUID", None, (c_void_p, _P(S.NET_LUID))),
    Prototype("wintun", "WintunStartSession", c_void_p, (c_void_p, S.DWORD)),
    Prototype("wintun", "WintunEndSession", None, (c_void_p,)),
    Prototype("wintun", "WintunGetReadWaitEvent", S.HANDLE, (c_void_p,)),
    Prototype("wintun", "WintunReceivePacket", _P(c_uint8), (c_void_p, _P(S.DWORD))),
    Prototype("wintun", "WintunReleaseReceivePacket", None, (c_void_p, _P(c_uint8))),
    Prototype("wintun", "WintunAllocateSendPacket", _P(c_uint8), (c_void_p, S.DWORD)),
    Prototype("wintun", "WintunSendPacket", None, (c_void_p, _P(c_uint8))),
)

BY_NAME = {p.name: p for p in PROTOTYPES}

WINTUN_ARCH = {"amd64": "amd64", "x86_64": "amd64", "arm64": "arm64", "aarch64": "arm64", "x86": "x86"}


def wintun_dll_path(machine: str | None = None) -> Path:
    """The wintun.dll that pytun-pmd3 ships for this machine (found without importing pytun_pmd3)."""
    spec = importlib.util.find_spec("pytun_pmd3")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("pytun-pmd3 is not installed: it ships wintun.dll")
    arch = WINTUN_ARCH.get((machine or platform.machine()).lower(), "")
    if not arch:
        raise OSError(f"no wintun.dll for this machine ({machine or platform.machine()})")
    return Path(next(iter(spec.submodule_search_locations))) / "wintun" / "bin" / arch / "wintun.dll"


@functools.cache
def _dll(name: str) -> Any:
    if sys.platform != "win32":
        raise OSError(f"{name}.dll exists only on Windows")
    import ctypes

    if name == "wintun":
        return ctypes.WinDLL(str(wintun_dll_path()), use_last_error=True)
    return ctypes.WinDLL(name, use_last_error=True)


@functools.cache
def function(name: str) -> Any:
    """The named function of its DLL with its prototype applied (Windows only; loads the DLL once)."""
    proto = BY_NAME[name]
    fn = getattr(_dll(proto.dll), name)
    fn.restype = proto.restype
    fn.argtypes = proto.argtypes
    return fn
