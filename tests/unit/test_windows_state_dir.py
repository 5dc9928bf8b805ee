"""The Windows state directory: %ProgramData%\\x2ssh by default, created Administrators-only in one call, an
existing one trusted only if Administrators or SYSTEM own it. The Win32 calls are faked by a recorder; the
run lock and the journal are real."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from x2ssh.errors import StateError
from x2ssh.host.windows import statedir
from x2ssh.host.windows.host import WindowsHost
from x2ssh.host.windows.statedir import CreateDirectory, GetOwner, SetDacl
from x2ssh.settings import default_state_dir

ADMINS, SYSTEM, A_USER = "S-1-5-32-544", "S-1-5-18", "S-1-5-21-1004336348-1177238915-682003330-1001"


class FakeAcl:
    """Records the calls; CreateDirectory makes a plain directory (the ACL cannot be shown on Linux)."""

    def __init__(self, owner: str = ADMINS) -> None:
        self.owner = owner
        self.calls: list[statedir.AclCall] = []

    def call(self, record: statedir.AclCall) -> object:
        self.calls.append(record)
        if isinstance(record, CreateDirectory):
            path = Path(record.path)
            if path.exists():
                return False
            path.mkdir(parents=True)
            return True
        if isinstance(record, GetOwner):
            return self.owner
        return None


def test_the_default_is_under_program_data_on_windows_and_var_lib_elsewhere() -> None:
    assert str(default_state_dir("win32", {"ProgramData": r"D:\ProgramData"})) == r"D:\ProgramData\x2ssh"
    assert str(default_state_dir("win32", {"ALLUSERSPROFILE": r"C:\ProgramData"})) == r"C:\ProgramData\x2ssh"
    assert str(default_state_dir("win32", {})) == r"C:\ProgramData\x2ssh"
    assert default_state_dir("linux", {"ProgramData": r"D:\ProgramData"}) == Path("/var/lib/x2ssh")


def test_the_security_descriptor_admits_only_system_and_administrators() -> None:
    sddl = statedir.STATE_DIR_SDDL
    owner, dacl = re.fullmatch(r"O:(\w+)D:(.*)", sddl).groups()  # type: ignore[union-attr]
    assert owner == "BA"
    flags, aces = re.fullmatch(r"([A-Z]*)((?:\([^)]*\))+)", dacl).groups()  # type: ignore[union-attr]
    assert flags == "P", "protected: nothing inherited from %ProgramData%, where users may create folders"
    entries = re.findall(r"\(([^)]*)\)", aces)
    assert sorted(e.split(";")[5] for e in entries) == ["BA", "SY"]
    for entry in entries:
        kind, inherit, rights, _, _, _ = entry.split(";")
        assert (kind, inherit, rights) == ("A", "OICI", "FA"), "allow, inherited by files and folders"
    assert set(statedir.TRUSTED_OWNERS) == {ADMINS, SYSTEM}


def test_a_new_directory_is_made_with_its_acl_in_one_call(tmp_path: Path) -> None:
    acl = FakeAcl()
    path = tmp_path / "x2ssh"
    assert statedir.secure_state_dir(path, acl) is True
    assert acl.calls == [CreateDirectory(str(path), statedir.STATE_DIR_SDDL)]


@pytest.mark.parametrize("owner", [ADMINS, SYSTEM])
def test_an_existing_directory_owned_by_admins_gets_its_dacl_again(tmp_path: Path, owner: str) -> None:
    acl = FakeAcl(owner)
    assert statedir.secure_state_dir(tmp_path, acl) is False
    assert acl.calls == [
        CreateDirectory(str(tmp_path), statedir.STATE_DIR_SDDL),
        GetOwner(str(tmp_path)),
        SetDacl(str(tmp_path), statedir.STATE_DIR_SDDL),
    ]


@pytest.mark.parametrize("owner", [A_USER, None])
def test_a_directory_someone_else_made_is_refused_and_left_alone(tmp_path: Path, owner: str | None) -> None:
    acl = FakeAcl(owner)  # type: ignore[arg-type]
    with pytest.raises(StateError, match=rf"owned by {owner}, not by Administrators or SYSTEM"):
        statedir.secure_state_dir(tmp_path, acl)
    assert not any(isinstance(c, SetDacl) for c in acl.calls)


def _windows_host(state_dir: Path, acl: FakeAcl) -> WindowsHost:
    from tests.unit.test_windows_host import Recorder, make_host

    return make_host(state_dir, Recorder(), acl=acl)


def test_the_host_secures_the_directory_before_its_lock_and_journal(tmp_path: Path) -> None:
    state = tmp_path / "x2ssh"
    acl = FakeAcl()
    host = _windows_host(state, acl)
    host.start("x2ssh", 1400, [], kill_switch=False)
    assert acl.calls == [CreateDirectory(str(state), statedir.STATE_DIR_SDDL)]
    assert host.lock.held and host.lock.path.parent == state and host.journal is not None
    asyncio.run(asyncio.to_thread(host.down))

    acl = FakeAcl()
    assert _windows_host(state, acl).cleanup() == []  # --vpn-cleanup checks it too
    assert [type(c) for c in acl.calls] == [CreateDirectory, GetOwner, SetDacl]


def test_the_host_refuses_a_users_directory_before_locking_or_undoing(tmp_path: Path) -> None:
    (tmp_path / "x2ssh.init.journal").write_text("planted\n")
    for run in (
        lambda host: host.start("x2ssh", 1400, [], kill_switch=False),
        lambda host: host.cleanup(),
    ):
        host = _windows_host(tmp_path, FakeAcl(A_USER))
        with pytest.raises(StateError, match="owned by S-1-5-21"):
            run(host)
        assert not host.lock.held and not host.lock.path.exists()
        assert host.executor.calls == []  # nothing undone from a journal there
