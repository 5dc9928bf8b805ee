"""The state directory on Windows (`%ProgramData%\\x2ssh` by default): Administrators and SYSTEM only.

Theory of operation. The run lock and the journals live in the state directory, and an elevated x2ssh
undoes what the journals there say (it deletes the routes they name). On Linux `journal.ensure_state_dir`
refuses a directory another user owns or may write. Windows has no uid or mode bits: the trust is the
directory's owner and ACL.

- The directory's security descriptor is `STATE_DIR_SDDL`: owned by Administrators, with a protected DACL
  (nothing inherited from %ProgramData%, where every user may create folders) that gives full access to
  SYSTEM and Administrators and nobody else, inherited by every file made in it (the lock, the journals).
- A new directory gets that descriptor in the call that creates it (CreateDirectoryW with
  SECURITY_ATTRIBUTES), so it is never open to others, not even for a moment. Missing parents of a
  `--state-dir` are made first with the ACL they inherit, as `mkdir -p` does.
- An existing directory must be owned by Administrators or SYSTEM. Another user could have made it before
  x2ssh first ran, and could have written journals into it: x2ssh then refuses, and says what to do. If the
  owner is trusted, the DACL is set again (an administrator may have loosened it).

The steps are call records carried out by an executor, as the rest of the Windows backend does: `AclExecutor`
with ctypes on Windows, a recording fake in tests/unit/test_windows_state_dir.py. `AclExecutor` is NOT RUN
(there is no Windows machine where this was written); its prototypes are checked against the docs.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from x2ssh.errors import StateError
from x2ssh.host.windows import structs as S
from x2ssh.host.windows.iphlpapi import check
from x2ssh.host.windows.prototypes import function as fn

# O:BA owner Administrators; D:P a protected DACL; (A;OICI;FA;;;SY) allow, inherited by files (OI) and
# folders (CI), file all access, to SYSTEM; the same for BA, Administrators.
STATE_DIR_SDDL = "O:BAD:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)"
TRUSTED_OWNERS = {"S-1-5-32-544": "Administrators", "S-1-5-18": "SYSTEM"}


@dataclass(frozen=True)
class CreateDirectory:
    """CreateDirectoryW with the security descriptor `sddl`; answers True if made, False if it existed."""

    path: str
    sddl: str


@dataclass(frozen=True)
class GetOwner:
    """GetNamedSecurityInfoW's owner of `path`, answered as a string SID ("S-1-5-32-544")."""

    path: str


@dataclass(frozen=True)
class SetDacl:
    """SetNamedSecurityInfoW: `path` gets the protected DACL of `sddl` (its owner stays)."""

    path: str
    sddl: str


AclCall = CreateDirectory | GetOwner | SetDacl


class AclCalls(Protocol):
    """Carries out one record (`AclExecutor` on Windows, a recording fake in tests)."""

    def call(self, record: AclCall) -> object: ...


def secure_state_dir(path: Path, executor: AclCalls) -> bool:
    """Make `path` the admin-only state directory, or check and re-secure the one there.

    Returns True if it was created. Raises StateError if it exists and belongs to someone else.
    """
    where = str(path)
    created = executor.call(CreateDirectory(where, STATE_DIR_SDDL))
    if created is True:
        return True
    owner = executor.call(GetOwner(where))
    if not isinstance(owner, str) or owner not in TRUSTED_OWNERS:
        raise StateError(
            f"state directory {where} is owned by {owner}, not by Administrators or SYSTEM: another user "
            "could have written journals there. Check it, then delete it (x2ssh makes it again) or pass "
            "another --state-dir"
        )
    executor.call(SetDacl(where, STATE_DIR_SDDL))
    return False


class AclExecutor:
    """Implements `AclCalls` with the Win32 security functions (Windows only; NOT RUN)."""

    def call(self, record: AclCall) -> object:
        """Carry out one record; CreateDirectory answers a bool, GetOwner a string SID."""
        if isinstance(record, CreateDirectory):
            return self._create_directory(record)
        if isinstance(record, GetOwner):
            return self._owner(record)
        self._set_dacl(record)
        return None

    def _create_directory(self, r: CreateDirectory) -> bool:
        Path(r.path).parent.mkdir(parents=True, exist_ok=True)
        sd = _security_descriptor(r.sddl)
        try:
            attributes = S.SECURITY_ATTRIBUTES(ctypes.sizeof(S.SECURITY_ATTRIBUTES), sd, False)
            if fn("CreateDirectoryW")(r.path, ctypes.byref(attributes)):
                return True
            error = ctypes.get_last_error()
            if error == S.ERROR_ALREADY_EXISTS:
                return False
            raise ctypes.WinError(error)
        finally:
            fn("LocalFree")(sd)

    def _owner(self, r: GetOwner) -> str:
        owner, sd = ctypes.c_void_p(), ctypes.c_void_p()
        status = fn("GetNamedSecurityInfoW")(
            r.path,
            S.SE_FILE_OBJECT,
            S.OWNER_SECURITY_INFORMATION,
            ctypes.byref(owner),
            None,
            None,
            None,
            ctypes.byref(sd),
        )
        check(status, f"GetNamedSecurityInfoW {r.path}")
        try:  # the owner SID points into `sd`: read it before freeing that
            text = ctypes.c_void_p()
            if not fn("ConvertSidToStringSidW")(owner, ctypes.byref(text)):
                raise ctypes.WinError(ctypes.get_last_error())
            try:
                return ctypes.wstring_at(text.value or 0)
            finally:
                fn("LocalFree")(text)
        finally:
            fn("LocalFree")(sd)

    def _set_dacl(self, r: SetDacl) -> None:
        sd = _security_descriptor(r.sddl)
        try:
            present, dacl, defaulted = S.BOOL(), ctypes.c_void_p(), S.BOOL()
            if not fn("GetSecurityDescriptorDacl")(
                sd, ctypes.byref(present), ctypes.byref(dacl), ctypes.byref(defaulted)
            ):
                raise ctypes.WinError(ctypes.get_last_error())
            info = S.DACL_SECURITY_INFORMATION | S.PROTECTED_DACL_SECURITY_INFORMATION
            status = fn("SetNamedSecurityInfoW")(r.path, S.SE_FILE_OBJECT, info, None, None, dacl, None)
            check(status, f"SetNamedSecurityInfoW {r.path}")
        finally:
            fn("LocalFree")(sd)


def _security_descriptor(sddl: str) -> ctypes.c_void_p:
    """A self-relative security descriptor from its SDDL text; the caller frees it with LocalFree."""
    sd = ctypes.c_void_p()
    if not fn("ConvertStringSecurityDescriptorToSecurityDescriptorW")(
        sddl, S.SDDL_REVISION_1, ctypes.byref(sd), None
    ):
        raise ctypes.WinError(ctypes.get_last_error())
    return sd
