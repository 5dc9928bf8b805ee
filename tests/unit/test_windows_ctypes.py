"""Every ctypes prototype of the Windows backend against the documented C signature, and structure layouts.

The signatures below are written down from the documentation, not from our table: Microsoft's docs for
netioapi.h (iphlpapi.dll), fwpmu.h (fwpuclnt.dll), consoleapi.h / synchapi.h / handleapi.h /
processthreadsapi.h / fileapi.h / winbase.h (kernel32.dll), sddl.h / securitybaseapi.h / aclapi.h
(advapi32.dll), shlobj_core.h (shell32.dll), and wintun.h as shipped in pytun-pmd3
(pytun_pmd3/wintun/include/wintun.h).
"""

from __future__ import annotations

import ctypes
import sys
import uuid
from ctypes import POINTER, c_uint8, c_void_p, c_wchar_p
from ipaddress import ip_address

import pytest

from x2ssh.host.windows import prototypes
from x2ssh.host.windows import structs as S

# C type name -> the ctypes type a correct prototype uses for it (LLP64: DWORD/ULONG/UINT32 are 32 bits).
C_TYPES = {
    "VOID": None,
    "DWORD": S.DWORD,
    "NETIO_STATUS": S.DWORD,  # netioapi.h: typedef DWORD NETIO_STATUS in user mode
    "ULONG": S.ULONG,
    "UINT32": S.UINT32,
    "BOOL": S.BOOL,
    "NET_IFINDEX": S.NET_IFINDEX,
    "HANDLE": S.HANDLE,
    "HANDLE *": POINTER(S.HANDLE),
    "const HANDLE *": POINTER(S.HANDLE),
    "UINT64 *": POINTER(S.UINT64),
    "LPCWSTR": c_wchar_p,
    "const wchar_t *": c_wchar_p,
    "LPSECURITY_ATTRIBUTES": c_void_p,
    "SEC_WINNT_AUTH_IDENTITY_W *": c_void_p,
    "PSECURITY_DESCRIPTOR": c_void_p,
    "PHANDLER_ROUTINE": c_void_p,
    "void **": POINTER(c_void_p),
    "GUID": S.GUID,
    "GUID *": POINTER(S.GUID),
    "const GUID *": POINTER(S.GUID),
    "const NET_LUID *": POINTER(S.NET_LUID),
    "NET_LUID *": POINTER(S.NET_LUID),
    "PNET_IFINDEX": POINTER(S.NET_IFINDEX),
    "const SOCKADDR_INET *": POINTER(S.SOCKADDR_INET),
    "SOCKADDR_INET *": POINTER(S.SOCKADDR_INET),
    "PMIB_UNICASTIPADDRESS_ROW": POINTER(S.MIB_UNICASTIPADDRESS_ROW),
    "const MIB_UNICASTIPADDRESS_ROW *": POINTER(S.MIB_UNICASTIPADDRESS_ROW),
    "PMIB_IPFORWARD_ROW2": POINTER(S.MIB_IPFORWARD_ROW2),
    "const MIB_IPFORWARD_ROW2 *": POINTER(S.MIB_IPFORWARD_ROW2),
    "PMIB_IPINTERFACE_ROW": POINTER(S.MIB_IPINTERFACE_ROW),
    "const DNS_INTERFACE_SETTINGS *": POINTER(S.DNS_INTERFACE_SETTINGS),
    "const FWPM_SESSION0 *": POINTER(S.FWPM_SESSION0),
    "const FWPM_SUBLAYER0 *": POINTER(S.FWPM_SUBLAYER0),
    "const FWPM_FILTER0 *": POINTER(S.FWPM_FILTER0),
    "FWP_BYTE_BLOB **": POINTER(POINTER(S.FWP_BYTE_BLOB)),
    # wintun.h
    "WINTUN_ADAPTER_HANDLE": c_void_p,
    "WINTUN_SESSION_HANDLE": c_void_p,
    "BYTE *": POINTER(c_uint8),
    "const BYTE *": POINTER(c_uint8),
    "DWORD *": POINTER(S.DWORD),
    "LPDWORD": POINTER(S.DWORD),
    "LPFILETIME": POINTER(S.FILETIME),
    "ADDRESS_FAMILY": S.ADDRESS_FAMILY,
    "BOOLEAN": S.BOOLEAN,
    "PVOID": c_void_p,
    "PUNICAST_IPADDRESS_CHANGE_CALLBACK": c_void_p,
    # security descriptors (winnt.h, accctrl.h): the state directory's ACL
    "HLOCAL": c_void_p,
    "LPWSTR": c_wchar_p,
    "LPWSTR *": POINTER(c_void_p),  # a string Windows allocates: read with wstring_at, freed with LocalFree
    "PSECURITY_DESCRIPTOR *": POINTER(c_void_p),
    "PULONG": POINTER(S.ULONG),
    "LPBOOL": POINTER(S.BOOL),
    "PSID": c_void_p,
    "PSID *": POINTER(c_void_p),
    "PACL": c_void_p,
    "PACL *": POINTER(c_void_p),
    "SE_OBJECT_TYPE": ctypes.c_int32,  # an enum
    "SECURITY_INFORMATION": S.DWORD,  # typedef DWORD SECURITY_INFORMATION
}

DOCUMENTED = [
    # netioapi.h
    ("VOID InitializeUnicastIpAddressEntry(PMIB_UNICASTIPADDRESS_ROW Row)"),
    ("NETIO_STATUS CreateUnicastIpAddressEntry(const MIB_UNICASTIPADDRESS_ROW * Row)"),
    ("NETIO_STATUS DeleteUnicastIpAddressEntry(const MIB_UNICASTIPADDRESS_ROW * Row)"),
    ("VOID InitializeIpForwardEntry(PMIB_IPFORWARD_ROW2 Row)"),
    ("NETIO_STATUS CreateIpForwardEntry2(const MIB_IPFORWARD_ROW2 * Row)"),
    ("NETIO_STATUS DeleteIpForwardEntry2(const MIB_IPFORWARD_ROW2 * Row)"),
    (
        "NETIO_STATUS GetBestRoute2(NET_LUID * InterfaceLuid, NET_IFINDEX InterfaceIndex,"
        " const SOCKADDR_INET * SourceAddress, const SOCKADDR_INET * DestinationAddress,"
        " ULONG AddressSortOptions, PMIB_IPFORWARD_ROW2 BestRoute, SOCKADDR_INET * BestSourceAddress)"
    ),
    ("VOID InitializeIpInterfaceEntry(PMIB_IPINTERFACE_ROW Row)"),
    ("NETIO_STATUS GetIpInterfaceEntry(PMIB_IPINTERFACE_ROW Row)"),
    ("NETIO_STATUS SetIpInterfaceEntry(PMIB_IPINTERFACE_ROW Row)"),
    ("NETIO_STATUS SetInterfaceDnsSettings(GUID Interface, const DNS_INTERFACE_SETTINGS * Settings)"),
    ("NETIO_STATUS ConvertInterfaceLuidToIndex(const NET_LUID * InterfaceLuid, PNET_IFINDEX InterfaceIndex)"),
    ("NETIO_STATUS ConvertInterfaceLuidToGuid(const NET_LUID * InterfaceLuid, GUID * InterfaceGuid)"),
    (
        "NETIO_STATUS NotifyUnicastIpAddressChange(ADDRESS_FAMILY Family,"
        " PUNICAST_IPADDRESS_CHANGE_CALLBACK Callback, PVOID CallerContext, BOOLEAN InitialNotification,"
        " HANDLE * NotificationHandle)"
    ),
    ("NETIO_STATUS CancelMibChangeNotify2(HANDLE NotificationHandle)"),
    # fwpmu.h
    (
        "DWORD FwpmEngineOpen0(const wchar_t * serverName, UINT32 authnService,"
        " SEC_WINNT_AUTH_IDENTITY_W * authIdentity, const FWPM_SESSION0 * session, HANDLE * engineHandle)"
    ),
    ("DWORD FwpmEngineClose0(HANDLE engineHandle)"),
    ("DWORD FwpmSubLayerAdd0(HANDLE engineHandle, const FWPM_SUBLAYER0 * subLayer, PSECURITY_DESCRIPTOR sd)"),
    (
        "DWORD FwpmFilterAdd0(HANDLE engineHandle, const FWPM_FILTER0 * filter, PSECURITY_DESCRIPTOR sd,"
        " UINT64 * id)"
    ),
    ("DWORD FwpmGetAppIdFromFileName0(const wchar_t * fileName, FWP_BYTE_BLOB ** appId)"),
    ("VOID FwpmFreeMemory0(void ** p)"),
    # kernel32 / shell32
    ("BOOL SetConsoleCtrlHandler(PHANDLER_ROUTINE HandlerRoutine, BOOL Add)"),
    (
        "HANDLE CreateEventW(LPSECURITY_ATTRIBUTES lpEventAttributes, BOOL bManualReset,"
        " BOOL bInitialState, LPCWSTR lpName)"
    ),
    ("BOOL SetEvent(HANDLE hEvent)"),
    ("BOOL CloseHandle(HANDLE hObject)"),
    (
        "DWORD WaitForMultipleObjects(DWORD nCount, const HANDLE * lpHandles, BOOL bWaitAll,"
        " DWORD dwMilliseconds)"
    ),
    # processthreadsapi.h
    ("HANDLE OpenProcess(DWORD dwDesiredAccess, BOOL bInheritHandle, DWORD dwProcessId)"),
    ("BOOL GetExitCodeProcess(HANDLE hProcess, LPDWORD lpExitCode)"),
    (
        "BOOL GetProcessTimes(HANDLE hProcess, LPFILETIME lpCreationTime, LPFILETIME lpExitTime,"
        " LPFILETIME lpKernelTime, LPFILETIME lpUserTime)"
    ),
    # fileapi.h, winbase.h
    ("BOOL CreateDirectoryW(LPCWSTR lpPathName, LPSECURITY_ATTRIBUTES lpSecurityAttributes)"),
    ("HLOCAL LocalFree(HLOCAL hMem)"),
    # sddl.h, securitybaseapi.h, aclapi.h (advapi32.dll)
    (
        "BOOL ConvertStringSecurityDescriptorToSecurityDescriptorW(LPCWSTR StringSecurityDescriptor,"
        " DWORD StringSDRevision, PSECURITY_DESCRIPTOR * SecurityDescriptor, PULONG SecurityDescriptorSize)"
    ),
    (
        "BOOL GetSecurityDescriptorDacl(PSECURITY_DESCRIPTOR pSecurityDescriptor, LPBOOL lpbDaclPresent,"
        " PACL * pDacl, LPBOOL lpbDaclDefaulted)"
    ),
    (
        "DWORD GetNamedSecurityInfoW(LPCWSTR pObjectName, SE_OBJECT_TYPE ObjectType,"
        " SECURITY_INFORMATION SecurityInfo, PSID * ppsidOwner, PSID * ppsidGroup, PACL * ppDacl,"
        " PACL * ppSacl, PSECURITY_DESCRIPTOR * ppSecurityDescriptor)"
    ),
    (
        "DWORD SetNamedSecurityInfoW(LPWSTR pObjectName, SE_OBJECT_TYPE ObjectType,"
        " SECURITY_INFORMATION SecurityInfo, PSID psidOwner, PSID psidGroup, PACL pDacl, PACL pSacl)"
    ),
    ("BOOL ConvertSidToStringSidW(PSID Sid, LPWSTR * StringSid)"),
    ("BOOL IsUserAnAdmin()"),
    # wintun.h
    (
        "WINTUN_ADAPTER_HANDLE WintunCreateAdapter(LPCWSTR Name, LPCWSTR TunnelType,"
        " const GUID * RequestedGUID)"
    ),
    ("VOID WintunCloseAdapter(WINTUN_ADAPTER_HANDLE Adapter)"),
    ("VOID WintunGetAdapterLUID(WINTUN_ADAPTER_HANDLE Adapter, NET_LUID * Luid)"),
    ("WINTUN_SESSION_HANDLE WintunStartSession(WINTUN_ADAPTER_HANDLE Adapter, DWORD Capacity)"),
    ("VOID WintunEndSession(WINTUN_SESSION_HANDLE Session)"),
    ("HANDLE WintunGetReadWaitEvent(WINTUN_SESSION_HANDLE Session)"),
    ("BYTE * WintunReceivePacket(WINTUN_SESSION_HANDLE Session, DWORD * PacketSize)"),
    ("VOID WintunReleaseReceivePacket(WINTUN_SESSION_HANDLE Session, const BYTE * Packet)"),
    ("BYTE * WintunAllocateSendPacket(WINTUN_SESSION_HANDLE Session, DWORD PacketSize)"),
    ("VOID WintunSendPacket(WINTUN_SESSION_HANDLE Session, const BYTE * Packet)"),
]


def parse(signature: str) -> tuple[str, str, list[str]]:
    """'RET NAME(TYPE NAME, ...)' -> (RET, NAME, [TYPE, ...]); a pointer's '*' stays with its type."""
    head, _, args = signature.partition("(")
    ret, name = head.rsplit(" ", 1)
    params = [a.strip() for a in args.rstrip(")").split(",") if a.strip()]
    return ret.strip(), name, [p.rsplit(" ", 1)[0] for p in params]


@pytest.mark.parametrize("signature", DOCUMENTED, ids=lambda s: parse(s)[1])
def test_prototype_matches_documented_signature(signature: str) -> None:
    ret, name, params = parse(signature)
    proto = prototypes.BY_NAME[name]
    assert proto.restype is C_TYPES[ret], f"{name}: restype"
    assert list(proto.argtypes) == [C_TYPES[p] for p in params], f"{name}: argtypes"


def test_every_prototype_is_documented_in_this_table() -> None:
    assert {parse(s)[1] for s in DOCUMENTED} == set(prototypes.BY_NAME)
    assert len(prototypes.PROTOTYPES) == len(prototypes.BY_NAME)  # no name declared twice


def test_fixed_width_types_match_llp64() -> None:
    assert ctypes.sizeof(S.DWORD) == ctypes.sizeof(S.ULONG) == ctypes.sizeof(S.BOOL) == 4
    assert ctypes.sizeof(S.UINT64) == 8 and ctypes.sizeof(S.HANDLE) == ctypes.sizeof(c_void_p)


@pytest.mark.skipif(ctypes.sizeof(c_void_p) != 8, reason="the sizes below are 64-bit Windows' (x64, arm64)")
@pytest.mark.parametrize(
    ("struct", "size"),
    [  # sizeof() on 64-bit Windows, as wireguard-go's winipcfg and wireguard-nt's headers check them
        (S.GUID, 16),
        (S.FILETIME, 8),
        (S.SOCKADDR_INET, 28),
        (S.IP_ADDRESS_PREFIX, 32),
        (S.MIB_UNICASTIPADDRESS_ROW, 80),
        (S.MIB_IPFORWARD_ROW2, 104),
        (S.MIB_IPINTERFACE_ROW, 168),
        (S.DNS_INTERFACE_SETTINGS, 64),
        (S.FWP_VALUE0, 16),
        (S.FWPM_DISPLAY_DATA0, 16),
        (S.FWPM_FILTER_CONDITION0, 40),
        (S.FWPM_SESSION0, 72),
        (S.FWPM_SUBLAYER0, 72),
        (S.FWPM_FILTER0, 200),
        (S.SECURITY_ATTRIBUTES, 24),
    ],
)
def test_structure_sizes(struct, size) -> None:
    assert ctypes.sizeof(struct) == size


def test_guid_round_trip_is_little_endian_in_memory() -> None:
    g = S.GUID.from_uuid("c38d57d1-05a7-4c33-904f-7fbceee60e82")
    assert bytes(g)[:4] == bytes.fromhex("d1578dc3")
    assert g.Data1 == 0xC38D57D1 and g.to_uuid() == uuid.UUID("c38d57d1-05a7-4c33-904f-7fbceee60e82")


@pytest.mark.parametrize("text", ["198.18.0.10", "fd78:7832:7373::53"])
def test_sockaddr_inet_round_trip(text: str) -> None:
    a = ip_address(text)
    s = S.sockaddr_inet(a)
    assert s.si_family == (S.AF_INET if a.version == 4 else S.AF_INET6)
    assert S.sockaddr_address(s) == a


def test_wintun_dll_comes_from_pytun_pmd3() -> None:
    path = prototypes.wintun_dll_path("AMD64")
    assert path.parts[-4:] == ("wintun", "bin", "amd64", "wintun.dll") and path.is_file()
    assert prototypes.wintun_dll_path("ARM64").is_file()
    with pytest.raises(OSError, match=r"no wintun\.dll"):
        prototypes.wintun_dll_path("mips")


@pytest.mark.skipif(sys.platform == "win32", reason="checks the refusal off Windows")
def test_functions_are_refused_off_windows_with_a_clear_error() -> None:
    prototypes.function.cache_clear()
    with pytest.raises(OSError, match="only on Windows"):
        prototypes.function("CreateIpForwardEntry2")
