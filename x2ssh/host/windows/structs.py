"""ctypes structures and constants of the Win32 APIs the Windows backend calls (x64 / arm64 layout).

Every integer type is fixed-width (c_uint32, not ctypes.wintypes.ULONG, which is c_ulong and 8 bytes on
64-bit Linux), so the layouts are the same on the Linux machine that tests them and on 64-bit Windows, and
the sizes in tests/unit/test_windows_ctypes.py are checked here. Sources, by header:
  netioapi.h / ws2ipdef.h (IP Helper rows), ifdef.h (NET_LUID), netioapi.h (DNS_INTERFACE_SETTINGS),
  fwptypes.h / fwpmtypes.h (WFP), guiddef.h (GUID), minwinbase.h / winnt.h / accctrl.h (security
  descriptors). Importing this module touches no DLL.
"""

from __future__ import annotations

import ctypes
import uuid
from ctypes import (
    POINTER,
    Structure,
    Union,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
    c_wchar_p,
)
from ipaddress import IPv4Address, IPv6Address

# Fixed-width Win32 names (the LLP64 model: LONG/ULONG/DWORD are 32 bits on 64-bit Windows).
UCHAR = BOOLEAN = UINT8 = c_uint8
USHORT = ADDRESS_FAMILY = UINT16 = c_uint16
ULONG = DWORD = UINT32 = NET_IFINDEX = c_uint32
BOOL = ctypes.c_int32
ULONG64 = UINT64 = c_uint64
HANDLE = c_void_p

AF_INET = 2
AF_INET6 = 23
ERROR_SUCCESS = 0
ERROR_OBJECT_ALREADY_EXISTS = 5010  # CreateIpForwardEntry2 / CreateUnicastIpAddressEntry: already there
ERROR_NOT_FOUND = 1168  # Delete*: already gone
ERROR_NO_MORE_ITEMS = 259  # WintunReceivePacket: the ring is empty
ERROR_HANDLE_EOF = 38  # WintunReceivePacket: the adapter is going away
ERROR_INVALID_PARAMETER = 87  # OpenProcess: no such process
AF_UNSPEC = 0
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
STILL_ACTIVE = 259  # GetExitCodeProcess: the process runs

IpDadStatePreferred = 4  # NL_DAD_STATE
MIB_IPPROTO_NETMGMT = 3  # NL_ROUTE_PROTOCOL: a route added by management (us)

DNS_INTERFACE_SETTINGS_VERSION1 = 1
DNS_SETTING_IPV6 = 0x0001
DNS_SETTING_NAMESERVER = 0x0002


class GUID(Structure):
    _fields_ = [("Data1", c_uint32), ("Data2", c_uint16), ("Data3", c_uint16), ("Data4", c_uint8 * 8)]

    @classmethod
    def from_uuid(cls, value: uuid.UUID | str) -> GUID:
        """The GUID of a UUID: Data1..Data3 are little-endian in memory (uuid's bytes_le)."""
        u = value if isinstance(value, uuid.UUID) else uuid.UUID(value)
        return cls.from_buffer_copy(u.bytes_le)

    def to_uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes_le=bytes(self))


class NET_LUID(Structure):
    _fields_ = [("Value", c_uint64)]


class FILETIME(Structure):
    """100-ns intervals since 1601 in two 32-bit halves (4-byte aligned, so not a UINT64)."""

    _fields_ = [("dwLowDateTime", DWORD), ("dwHighDateTime", DWORD)]

    @property
    def value(self) -> int:
        return int(self.dwHighDateTime) << 32 | int(self.dwLowDateTime)


# ---- security descriptors (minwinbase.h, winnt.h, accctrl.h, sddl.h): the state directory's ACL ----------

SE_OBJECT_TYPE = ctypes.c_int32  # an enum
SECURITY_INFORMATION = DWORD
SE_FILE_OBJECT = 1
OWNER_SECURITY_INFORMATION = 0x00000001
DACL_SECURITY_INFORMATION = 0x00000004
PROTECTED_DACL_SECURITY_INFORMATION = 0x80000000  # the DACL inherits nothing from the parent
SDDL_REVISION_1 = 1
ERROR_ALREADY_EXISTS = 183  # CreateDirectoryW: the directory is there already


class SECURITY_ATTRIBUTES(Structure):
    _fields_ = [("nLength", DWORD), ("lpSecurityDescriptor", c_void_p), ("bInheritHandle", BOOL)]


class SOCKADDR_IN(Structure):
    _fields_ = [
        ("sin_family", ADDRESS_FAMILY),
        ("sin_port", USHORT),  # network byte order
        ("sin_addr", c_uint8 * 4),
        ("sin_zero", c_uint8 * 8),
    ]


class SOCKADDR_IN6(Structure):
    _fields_ = [
        ("sin6_family", ADDRESS_FAMILY),
        ("sin6_port", USHORT),
        ("sin6_flowinfo", ULONG),
        ("sin6_addr", c_uint8 * 16),
        ("sin6_scope_id", ULONG),
    ]


class SOCKADDR_INET(Union):
    _fields_ = [("Ipv4", SOCKADDR_IN), ("Ipv6", SOCKADDR_IN6), ("si_family", ADDRESS_FAMILY)]


def sockaddr_inet(address: IPv4Address | IPv6Address) -> SOCKADDR_INET:
    """A SOCKADDR_INET holding `address` (port 0)."""
    out = SOCKADDR_INET()
    if address.version == 4:
        out.Ipv4.sin_family = AF_INET
        out.Ipv4.sin_addr[:] = list(address.packed)
    else:
        out.Ipv6.sin6_family = AF_INET6
        out.Ipv6.sin6_addr[:] = list(address.packed)
    return out


def sockaddr_address(value: SOCKADDR_INET) -> IPv4Address | IPv6Address:
    """The address a SOCKADDR_INET holds (the reverse of `sockaddr_inet`)."""
    if value.si_family == AF_INET:
        return IPv4Address(bytes(value.Ipv4.sin_addr))
    if value.si_family == AF_INET6:
        return IPv6Address(bytes(value.Ipv6.sin6_addr))
    raise ValueError(f"unknown address family {value.si_family}")


class IP_ADDRESS_PREFIX(Structure):
    _fields_ = [("Prefix", SOCKADDR_INET), ("PrefixLength", UINT8)]


class MIB_UNICASTIPADDRESS_ROW(Structure):
    _fields_ = [
        ("Address", SOCKADDR_INET),
        ("InterfaceLuid", NET_LUID),
        ("InterfaceIndex", NET_IFINDEX),
        ("PrefixOrigin", c_uint32),  # NL_PREFIX_ORIGIN
        ("SuffixOrigin", c_uint32),  # NL_SUFFIX_ORIGIN
        ("ValidLifetime", ULONG),
        ("PreferredLifetime", ULONG),
        ("OnLinkPrefixLength", UINT8),
        ("SkipAsSource", BOOLEAN),
        ("DadState", c_uint32),  # NL_DAD_STATE
        ("ScopeId", ULONG),  # SCOPE_ID
        ("CreationTimeStamp", c_int64),  # LARGE_INTEGER
    ]


class MIB_IPFORWARD_ROW2(Structure):
    _fields_ = [
        ("InterfaceLuid", NET_LUID),
        ("InterfaceIndex", NET_IFINDEX),
        ("DestinationPrefix", IP_ADDRESS_PREFIX),
        ("NextHop", SOCKADDR_INET),
        ("SitePrefixLength", UCHAR),
        ("ValidLifetime", ULONG),
        ("PreferredLifetime", ULONG),
        ("Metric", ULONG),
        ("Protocol", c_uint32),  # NL_ROUTE_PROTOCOL
        ("Loopback", BOOLEAN),
        ("AutoconfigureAddress", BOOLEAN),
        ("Publish", BOOLEAN),
        ("Immortal", BOOLEAN),
        ("Age", ULONG),
        ("Origin", c_uint32),  # NL_ROUTE_ORIGIN
    ]


class MIB_IPINTERFACE_ROW(Structure):
    _fields_ = [
        ("Family", ADDRESS_FAMILY),
        ("InterfaceLuid", NET_LUID),
        ("InterfaceIndex", NET_IFINDEX),
        ("MaxReassemblySize", ULONG),
        ("InterfaceIdentifier", ULONG64),
        ("MinRouterAdvertisementInterval", ULONG),
        ("MaxRouterAdvertisementInterval", ULONG),
        ("AdvertisingEnabled", BOOLEAN),
        ("ForwardingEnabled", BOOLEAN),
        ("WeakHostSend", BOOLEAN),
        ("WeakHostReceive", BOOLEAN),
        ("UseAutomaticMetric", BOOLEAN),
        ("UseNeighborUnreachabilityDetection", BOOLEAN),
        ("ManagedAddressConfigurationSupported", BOOLEAN),
        ("OtherStatefulConfigurationSupported", BOOLEAN),
        ("AdvertiseDefaultRoute", BOOLEAN),
        ("RouterDiscoveryBehavior", c_uint32),  # NL_ROUTER_DISCOVERY_BEHAVIOR
        ("DadTransmits", ULONG),
        ("BaseReachableTime", ULONG),
        ("RetransmitTime", ULONG),
        ("PathMtuDiscoveryTimeout", ULONG),
        ("LinkLocalAddressBehavior", c_uint32),  # NL_LINK_LOCAL_ADDRESS_BEHAVIOR
        ("LinkLocalAddressTimeout", ULONG),
        ("ZoneIndices", ULONG * 16),  # ScopeLevelCount
        ("SitePrefixLength", ULONG),
        ("Metric", ULONG),
        ("NlMtu", ULONG),
        ("Connected", BOOLEAN),
        ("SupportsWakeUpPatterns", BOOLEAN),
        ("SupportsNeighborDiscovery", BOOLEAN),
        ("SupportsRouterDiscovery", BOOLEAN),
        ("ReachableTime", ULONG),
        ("TransmitOffload", UCHAR),  # NL_INTERFACE_OFFLOAD_ROD: one byte of bit fields
        ("ReceiveOffload", UCHAR),
        ("DisableDefaultRoutes", BOOLEAN),
    ]


class DNS_INTERFACE_SETTINGS(Structure):
    _fields_ = [
        ("Version", ULONG),
        ("Flags", ULONG64),
        ("Domain", c_wchar_p),
        ("NameServer", c_wchar_p),  # comma-separated addresses
        ("SearchList", c_wchar_p),
        ("RegistrationEnabled", ULONG),
        ("RegisterAdapterName", ULONG),
        ("EnableLLMNR", ULONG),
        ("QueryAdapterName", ULONG),
        ("ProfileNameServer", c_wchar_p),
    ]


# ---- WFP (fwptypes.h, fwpmtypes.h) ----------------------------------------------------------------------

FWPM_SESSION_FLAG_DYNAMIC = 0x00000001
RPC_C_AUTHN_WINNT = 10
FWP_ACTION_FLAG_TERMINATING = 0x00001000
FWP_ACTION_BLOCK = 0x1 | FWP_ACTION_FLAG_TERMINATING
FWP_ACTION_PERMIT = 0x2 | FWP_ACTION_FLAG_TERMINATING
FWP_CONDITION_FLAG_IS_LOOPBACK = 0x00000001

# FWP_DATA_TYPE
FWP_EMPTY, FWP_UINT8, FWP_UINT16, FWP_UINT32, FWP_UINT64 = 0, 1, 2, 3, 4
FWP_BYTE_BLOB_TYPE = 12
FWP_V4_ADDR_MASK, FWP_V6_ADDR_MASK, FWP_RANGE_TYPE = 0x100, 0x101, 0x102

# FWP_MATCH_TYPE
FWP_MATCH = {
    "FWP_MATCH_EQUAL": 0,
    "FWP_MATCH_GREATER": 1,
    "FWP_MATCH_LESS": 2,
    "FWP_MATCH_GREATER_OR_EQUAL": 3,
    "FWP_MATCH_LESS_OR_EQUAL": 4,
    "FWP_MATCH_RANGE": 5,
    "FWP_MATCH_FLAGS_ALL_SET": 6,
    "FWP_MATCH_FLAGS_ANY_SET": 7,
    "FWP_MATCH_FLAGS_NONE_SET": 8,
    "FWP_MATCH_EQUAL_CASE_INSENSITIVE": 9,
    "FWP_MATCH_NOT_EQUAL": 10,
}


class FWP_BYTE_BLOB(Structure):
    _fields_ = [("size", UINT32), ("data", POINTER(c_uint8))]


class FWP_V4_ADDR_AND_MASK(Structure):
    _fields_ = [("addr", UINT32), ("mask", UINT32)]  # host byte order


class FWP_V6_ADDR_AND_MASK(Structure):
    _fields_ = [("addr", c_uint8 * 16), ("prefixLength", UINT8)]


class _FWP_VALUE_UNION(Union):
    # The pointer-sized members of the C union are all one c_void_p here; the executor keeps the pointee.
    _fields_ = [("uint8", UINT8), ("uint16", UINT16), ("uint32", UINT32), ("pointer", c_void_p)]


class FWP_VALUE0(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", c_uint32), ("u", _FWP_VALUE_UNION)]


class FWP_RANGE0(Structure):
    _fields_ = [("valueLow", FWP_VALUE0), ("valueHigh", FWP_VALUE0)]


class FWP_CONDITION_VALUE0(Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", c_uint32), ("u", _FWP_VALUE_UNION)]


class FWPM_DISPLAY_DATA0(Structure):
    _fields_ = [("name", c_wchar_p), ("description", c_wchar_p)]


class FWPM_SESSION0(Structure):
    _fields_ = [
        ("sessionKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", UINT32),
        ("txnWaitTimeoutInMSec", UINT32),
        ("processId", DWORD),
        ("sid", c_void_p),
        ("username", c_wchar_p),
        ("kernelMode", BOOL),
    ]


class FWPM_SUBLAYER0(Structure):
    _fields_ = [
        ("subLayerKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", UINT32),
        ("providerKey", POINTER(GUID)),
        ("providerData", FWP_BYTE_BLOB),
        ("weight", UINT16),
    ]


class FWPM_FILTER_CONDITION0(Structure):
    _fields_ = [("fieldKey", GUID), ("matchType", c_uint32), ("conditionValue", FWP_CONDITION_VALUE0)]


class FWPM_ACTION0(Structure):
    _fields_ = [("type", UINT32), ("filterType", GUID)]  # union { filterType; calloutKey; }


class _FILTER_CONTEXT(Union):
    _fields_ = [("rawContext", UINT64), ("providerContextKey", GUID)]


class FWPM_FILTER0(Structure):
    _anonymous_ = ("context",)
    _fields_ = [
        ("filterKey", GUID),
        ("displayData", FWPM_DISPLAY_DATA0),
        ("flags", UINT32),
        ("providerKey", POINTER(GUID)),
        ("providerData", FWP_BYTE_BLOB),
        ("layerKey", GUID),
        ("subLayerKey", GUID),
        ("weight", FWP_VALUE0),
        ("numFilterConditions", UINT32),
        ("filterCondition", POINTER(FWPM_FILTER_CONDITION0)),
        ("action", FWPM_ACTION0),
        ("context", _FILTER_CONTEXT),
        ("reserved", POINTER(GUID)),
        ("filterId", UINT64),
        ("effectiveWeight", FWP_VALUE0),
    ]
