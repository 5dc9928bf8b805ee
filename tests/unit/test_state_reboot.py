"""The journal across reboots and namespaces: boot_id, namespace names, atomic creation, records that
replace older ones, and a run killed mid-way (a real child process that os._exit()s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import x2ssh.host.journal as journal_mod
from x2ssh.errors import AlreadyRunning, StateError
from x2ssh.host.cleanup import cleanup
from x2ssh.host.journal import (
    NetnsIdentity,
    StateJournal,
    current_boot_id,
    current_netns_identity,
    ensure_state_dir,
    journal_path,
)

REPO = Path(__file__).resolve().parents[2]


class Machine:
    """Stands in for the kernel: which boot this is and which namespace the process is in."""

    def __init__(self, monkeypatch, boot: str, netns: NetnsIdentity):
        self.monkeypatch = monkeypatch
        self.set(boot, netns)

    def set(self, boot: str, netns: NetnsIdentity) -> None:
        self.monkeypatch.setattr(journal_mod, "current_boot_id", lambda: boot)
        self.monkeypatch.setattr(journal_mod, "current_netns_identity", lambda: netns)


def recorder():
    calls = []

    def undo(data):
        calls.append(data["name"])
        return f"undid {data['name']}"

    return calls, {"tun": undo, "route": undo, "resolv_conf": undo}


def test_the_real_boot_id_and_namespace_are_recorded(tmp_path):
    journal = StateJournal(tmp_path / "t.journal")
    owner = json.loads((tmp_path / "t.journal").read_text().splitlines()[0])["data"]
    here = current_netns_identity()
    assert (
        owner["boot_id"] == current_boot_id() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    )
    assert (owner["netns"], owner["netns_name"], owner["netns_initial"]) == (here.id, here.name, here.initial)
    assert owner["version"] == 2
    assert journal.owner_alive() and journal.belongs_here()
    journal.close()


def test_after_a_reboot_the_same_named_namespace_undoes_a_journal_whose_pid_looks_alive(
    tmp_path, monkeypatch
):
    state = tmp_path / "state"
    machine = Machine(monkeypatch, "boot-A", NetnsIdentity("4:1001", name="lab"))
    path = journal_path(state, "x2ssh0")
    assert path.name == "x2ssh0.ns-lab.journal"
    journal = StateJournal(path)  # owned by this very process, which is certainly alive
    journal.record("tun", name="x2ssh0")
    journal.record("resolv_conf", name="etc")
    journal.close()
    calls, undoers = recorder()
    with pytest.raises(AlreadyRunning):
        cleanup(state, undoers=undoers, resolv_conf=None)  # same boot: the owner (we) is alive

    machine.set("boot-B", NetnsIdentity("4:2002", name="lab"))  # reboot: same name, new inode
    assert journal_path(state, "x2ssh0") == path, "the file name must not change across a reboot"
    loaded = StateJournal.load(path)
    assert not loaded.owner_alive() and loaded.belongs_here()
    assert cleanup(state, undoers=undoers, resolv_conf=None) == ["undid etc", "undid x2ssh0"]
    assert calls == ["etc", "x2ssh0"]
    assert not path.exists()


def test_namespace_matching_rules(tmp_path, monkeypatch):
    machine = Machine(monkeypatch, "boot-A", NetnsIdentity("4:1001", name="lab"))
    named = StateJournal(tmp_path / "named.journal")
    machine.set("boot-A", NetnsIdentity("4:1002"))
    unnamed = StateJournal(tmp_path / "unnamed.journal")
    machine.set("boot-A", NetnsIdentity("4:4026531833", initial=True))
    initial = StateJournal(tmp_path / "initial.journal")
    for j in (named, unnamed, initial):
        j.close()

    def matches(boot, here):
        machine.set(boot, here)
        return {p.stem for p in tmp_path.glob("*.journal") if StateJournal.load(p).belongs_here()}

    # same boot: the inode decides, or the name (a namespace deleted and created again under that name)
    assert matches("boot-A", NetnsIdentity("4:1001", name="lab")) == {"named"}
    assert matches("boot-A", NetnsIdentity("4:1003", name="lab")) == {"named"}
    assert matches("boot-A", NetnsIdentity("4:1002")) == {"unnamed"}
    assert matches("boot-A", NetnsIdentity("4:4026531833", initial=True)) == {"initial"}
    # another boot: inodes mean nothing (the same number is another namespace); only stable names count
    assert matches("boot-B", NetnsIdentity("4:1002")) == set()
    assert matches("boot-B", NetnsIdentity("4:1001", name="other")) == set()
    assert matches("boot-B", NetnsIdentity("4:9", name="lab")) == {"named"}
    assert matches("boot-B", NetnsIdentity("4:4026531833", initial=True)) == {"initial"}


def test_a_version_1_journal_is_matched_by_inode_only(tmp_path, monkeypatch):
    path = tmp_path / "old.journal"
    owner = {"pid": 999999999, "start_time": None, "netns": "4:1001", "version": 1}
    path.write_text(json.dumps({"seq": 0, "kind": "owner", "data": owner}) + "\n")
    machine = Machine(monkeypatch, "boot-B", NetnsIdentity("4:1001", name="lab"))
    assert StateJournal.load(path).belongs_here()
    machine.set("boot-B", NetnsIdentity("4:1002", name="lab"))
    assert not StateJournal.load(path).belongs_here()


def test_journal_file_names_are_stable_keys():
    assert NetnsIdentity("4:4026531833", initial=True).key == "init"
    assert NetnsIdentity("4:4026531833", name="host", initial=True).key == "init"
    assert NetnsIdentity("4:77", name="init").key == "ns-init"  # no clash with the initial namespace
    assert NetnsIdentity("4:77").key == "ino-4-77"
    assert NetnsIdentity("4:77").stable_key is None


def test_creation_is_atomic_and_never_replaces(tmp_path):
    state = tmp_path / "state"
    journal = StateJournal(state / "t.journal")
    assert sorted(p.name for p in state.iterdir()) == ["t.journal"], "no temporary file left behind"
    assert state.stat().st_mode & 0o777 == 0o700
    journal.record("route", name="a")
    before = (state / "t.journal").read_bytes()
    with pytest.raises(StateError, match="already exists"):
        StateJournal(state / "t.journal")
    assert (state / "t.journal").read_bytes() == before
    assert sorted(p.name for p in state.iterdir()) == ["t.journal"]
    journal.close()


def test_state_dir_that_others_can_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StateError, match="writable by others"):
        StateJournal(shared / "t.journal")
    assert list(shared.iterdir()) == []
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(StateError):
        ensure_state_dir(not_a_dir)


def test_a_replacing_record_supersedes_the_old_one(tmp_path):
    path = tmp_path / "t.journal"
    journal = StateJournal(path)
    journal.record("tun", name="x2ssh0")
    first = journal.record("resolv_conf", name="v1")
    second = journal.replace(first, name="v2")
    third = journal.replace(second, name="v3")
    assert [e.data["name"] for e in journal.pending()] == ["v3", "x2ssh0"]
    with pytest.raises(ValueError):
        journal.replace(0)  # the owner line is not a change
    with pytest.raises(ValueError):
        journal.replace(99)
    journal.close()
    loaded = StateJournal.load(path)
    assert [(e.seq, e.replaces) for e in loaded.pending()] == [(third, second), (1, None)]
    calls, undoers = recorder()
    loaded.undo_all(undoers)
    assert calls == ["v3", "x2ssh0"]


CRASHING_RUN = r"""
import os, sys
from pathlib import Path
from x2ssh.host.journal import StateJournal, journal_path
j = StateJournal(journal_path(Path(sys.argv[1]), "x2ssh0"))
j.record("tun", name="x2ssh0")
seq = j.record("resolv_conf", name="first")
j.record("route", name="split")
j.replace(seq, name="newest")
os.write(j._fd, b'{"seq": 5, "kind": "route", "da')  # the kill lands in the middle of a line
os._exit(9)
"""


def test_a_run_killed_mid_write_is_undone_by_the_next_start(tmp_path):
    state = tmp_path / "state"
    done = subprocess.run([sys.executable, "-c", CRASHING_RUN, str(state)], cwd=REPO, timeout=60)
    assert done.returncode == 9
    calls, undoers = recorder()
    assert len(cleanup(state, undoers=undoers, resolv_conf=None)) == 3
    assert calls == ["newest", "split", "x2ssh0"]
    assert list(state.iterdir()) == []


def test_journal_from_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    with pytest.raises(StateError, match="belongs to uid 65534"):
        StateJournal(state / "t.journal")
