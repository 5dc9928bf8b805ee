"""The state journal: durable records, undo order, markers, and recovery after a crashed (dead) owner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from x2ssh.errors import AlreadyRunning, StateError
from x2ssh.host.cleanup import cleanup
from x2ssh.host.journal import (
    StateJournal,
    current_netns,
    current_netns_identity,
    journal_path,
    process_start_time,
)

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """Fake undo functions that remember the order they were called in."""

    def __init__(self, failing: set[str] = frozenset()):
        self.calls: list[str] = []
        self.failing = set(failing)

    def undoers(self):
        return {kind: self._undo(kind) for kind in ("tun", "route", "resolv_conf")}

    def _undo(self, kind):
        def undo(data):
            name = f"{kind}:{data['name']}"
            if name in self.failing:
                raise OSError(f"cannot undo {name}")
            self.calls.append(name)
            return f"undid {name}"

        return undo


def test_undo_all_reverts_in_reverse_order_skipping_forgotten(tmp_path):
    path = tmp_path / "s" / "t.journal"
    journal = StateJournal(path)
    journal.record("tun", name="x2ssh0")
    journal.record("route", name="server")
    not_ours = journal.record("route", name="exclude")
    journal.forget(not_ours)
    journal.record("route", name="split")
    journal.record("resolv_conf", name="etc")
    assert oct(path.stat().st_mode & 0o777) == "0o600"

    rec = Recorder()
    done = journal.undo_all(rec.undoers())
    assert rec.calls == ["resolv_conf:etc", "route:split", "route:server", "tun:x2ssh0"]
    assert done == [f"undid {c}" for c in rec.calls]
    assert not path.exists()


def test_records_are_on_disk_before_returning(tmp_path):
    path = tmp_path / "t.journal"
    journal = StateJournal(path)
    seq = journal.record("route", name="a", dst="198.18.0.0/24")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["kind"] == "owner"
    assert lines[0]["data"]["pid"] == os.getpid()
    assert lines[0]["data"]["netns"] == current_netns()
    assert lines[1] == {"seq": seq, "kind": "route", "data": {"name": "a", "dst": "198.18.0.0/24"}}
    journal.close()


def test_failed_undo_keeps_the_journal_and_a_retry_does_only_the_rest(tmp_path):
    path = tmp_path / "t.journal"
    journal = StateJournal(path)
    journal.record("tun", name="x2ssh0")
    journal.record("route", name="server")
    journal.record("resolv_conf", name="etc")

    rec = Recorder(failing={"route:server"})
    with pytest.raises(StateError, match="journal kept"):
        journal.undo_all(rec.undoers())
    assert rec.calls == ["resolv_conf:etc", "tun:x2ssh0"]
    assert path.exists()

    retry = Recorder()
    StateJournal.load(path).undo_all(retry.undoers())
    assert retry.calls == ["route:server"]
    assert not path.exists()


def test_unknown_kind_is_not_silently_dropped(tmp_path):
    journal = StateJournal(tmp_path / "t.journal")
    journal.record("firewall", name="x")
    with pytest.raises(StateError, match="no undo function"):
        journal.undo_all(Recorder().undoers())


def test_existing_journal_is_not_overwritten(tmp_path):
    path = tmp_path / "t.journal"
    StateJournal(path).close()
    with pytest.raises(StateError, match="--vpn-cleanup"):
        StateJournal(path)


def test_reserved_kinds(tmp_path):
    journal = StateJournal(tmp_path / "t.journal")
    with pytest.raises(ValueError, match="reserved"):
        journal.record("forget", seq=1)
    journal.close()


def test_torn_last_line_is_ignored(tmp_path):
    path = tmp_path / "t.journal"
    journal = StateJournal(path)
    journal.record("route", name="a")
    journal.close()
    with path.open("ab") as f:
        f.write(b'{"seq": 2, "kind": "rou')  # killed mid-write
    loaded = StateJournal.load(path)
    assert [e.kind for e in loaded.pending()] == ["route"]


def write_foreign_journal(path: Path, pid: int, start_time, netns: str | None = None) -> None:
    owner = {"pid": pid, "start_time": start_time, "netns": netns or current_netns(), "version": 1}
    lines = [
        {"seq": 0, "kind": "owner", "data": owner},
        {"seq": 1, "kind": "tun", "data": {"name": "x2ssh0"}},
        {"seq": 2, "kind": "route", "data": {"name": "split"}},
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_owner_liveness_uses_pid_and_start_time(tmp_path):
    path = tmp_path / "t.journal"
    write_foreign_journal(path, 1, process_start_time(1))
    assert StateJournal.load(path).owner_alive()
    write_foreign_journal(path, 1, process_start_time(1) + 12345)  # PID 1 reused by "another" process
    assert not StateJournal.load(path).owner_alive()


def test_cleanup_undoes_a_journal_left_by_a_dead_process(tmp_path):
    state_dir = tmp_path / "run"
    child = (
        "import sys, os; from pathlib import Path; "
        "from x2ssh.host.journal import StateJournal, journal_path\n"
        "j = StateJournal(journal_path(Path(sys.argv[1]), 'x2ssh0'))\n"
        "j.record('tun', name='x2ssh0'); j.record('route', name='server'); j.record('route', name='split')\n"
        "os._exit(0)  # dies without undoing anything\n"
    )
    subprocess.run([sys.executable, "-c", child, str(state_dir)], cwd=REPO, check=True, timeout=60)
    assert list(state_dir.iterdir()) == [journal_path(state_dir, "x2ssh0")]

    rec = Recorder()
    done = cleanup(state_dir, undoers=rec.undoers(), resolv_conf=None)
    assert rec.calls == ["route:split", "route:server", "tun:x2ssh0"]
    assert len(done) == 3
    assert list(state_dir.iterdir()) == []
    assert cleanup(state_dir, undoers=rec.undoers(), resolv_conf=None) == []


def test_cleanup_refuses_while_the_owner_lives_and_changes_nothing(tmp_path):
    state_dir = tmp_path / "run"
    child = (
        "import sys, time; from pathlib import Path; "
        "from x2ssh.host.journal import StateJournal, journal_path\n"
        "j = StateJournal(journal_path(Path(sys.argv[1]), 'x2ssh0'))\n"
        "j.record('tun', name='x2ssh0'); print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(state_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        rec = Recorder()
        with pytest.raises(AlreadyRunning, match=f"pid {proc.pid}"):
            cleanup(state_dir, undoers=rec.undoers(), resolv_conf=None)
        assert rec.calls == []
        assert journal_path(state_dir, "x2ssh0").exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    rec = Recorder()
    cleanup(state_dir, undoers=rec.undoers(), resolv_conf=None)
    assert rec.calls == ["tun:x2ssh0"]


def test_cleanup_of_own_pid_and_other_namespaces(tmp_path):
    state_dir = tmp_path / "run"
    mine = StateJournal(state_dir / "mine.journal")
    mine.record("tun", name="x2ssh0")
    write_foreign_journal(state_dir / "other-netns.journal", 999999999, None, netns="0:1")
    rec = Recorder()
    with pytest.raises(AlreadyRunning):
        # our own live journal counts as "running"
        cleanup(state_dir, undoers=rec.undoers(), resolv_conf=None)
    cleanup(state_dir, own_pid=os.getpid(), undoers=rec.undoers(), resolv_conf=None)
    assert rec.calls == ["tun:x2ssh0"]
    assert sorted(p.name for p in state_dir.iterdir()) == ["other-netns.journal"]  # not ours to undo here


def test_cleanup_of_missing_state_dir(tmp_path):
    assert cleanup(tmp_path / "absent", resolv_conf=None) == []


def test_journal_path_is_per_tun_and_namespace(tmp_path):
    path = journal_path(tmp_path, "x2ssh0")
    assert path.parent == tmp_path
    assert path.name == f"x2ssh0.{current_netns_identity().key}.journal"
