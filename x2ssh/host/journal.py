"""The state journal: every change x2ssh makes to the machine, written down before it is made.

Theory of operation. A journal is an append-only file of JSON lines, fsync'd after each line. The first line
names the owner (PID, its start time, the network namespace). Then each change is recorded *before* it is
applied (a route, the original resolv.conf bytes, a systemd-resolved link, the TUN device), so that a run
killed at any instant leaves a journal that covers at least everything it changed. Two marker kinds refer
back to an earlier record by its sequence number: `forget` (the change turned out not to be ours, e.g. the
route already existed) and `undone` (already reverted). `undo_all()` reverts the remaining records in reverse
order; each undo function tolerates a change that is already gone, so undoing a record that was written but
never applied is harmless. The file is deleted once everything is undone, and kept (with what is left) if
some undo failed, so that `x2ssh --vpn-cleanup` can try again.

One journal per TUN name and network namespace: `ip netns exec` does not separate /run, and routes and
resolv.conf belong to a namespace, so a journal is only undone from the namespace that wrote it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from x2ssh.errors import StateError

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"
_VERSION = 1
_OWNER = "owner"
_FORGET = "forget"
_UNDONE = "undone"

Undo = Callable[[dict[str, Any]], str]
"""Reverts one recorded change given its data; returns a short description; must tolerate 'already gone'."""


@dataclass(frozen=True)
class JournalEntry:
    """One recorded change: its sequence number, kind (e.g. "route") and JSON data."""

    seq: int
    kind: str
    data: dict[str, Any]


def current_netns() -> str:
    """An identifier of this process's network namespace (device and inode of /proc/self/ns/net)."""
    st = os.stat("/proc/self/ns/net")
    return f"{st.st_dev}:{st.st_ino}"


def journal_path(state_dir: Path, tun: str) -> Path:
    """Where the journal of TUN `tun` in the current network namespace lives."""
    return state_dir / f"{tun}.{current_netns().replace(':', '-')}{JOURNAL_SUFFIX}"


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of process `pid`, or None if it does not exist.

    Stored next to the PID so that a PID reused by an unrelated process is not mistaken for the owner.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may contain spaces and ')'
    return int(fields[19])  # field 22 of proc(5); fields[0] is field 3


class StateJournal:
    """An append-only, fsync'd record of the changes made by one x2ssh process.

    `StateJournal(path)` starts a new journal owned by this process (refusing if one exists: clean it up
    first); `StateJournal.load(path)` opens an existing one, e.g. left behind by a crashed run.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.pid = os.getpid()
        self.start_time = process_start_time(self.pid)
        self.netns = current_netns()
        self._entries: list[JournalEntry] = []
        self._fd: int | None = None
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
        except FileExistsError:
            raise StateError(
                f"state journal {self.path} already exists: run x2ssh --vpn-cleanup first"
            ) from None
        except OSError as e:
            raise StateError(f"cannot create state journal {self.path}: {e.strerror}") from e
        self._append(
            _OWNER, {"pid": self.pid, "start_time": self.start_time, "netns": self.netns, "version": _VERSION}
        )
        _fsync_dir(self.path.parent)

    @classmethod
    def load(cls, path: Path) -> StateJournal:
        """Read an existing journal. A torn last line (crash mid-write) is ignored."""
        journal = cls.__new__(cls)
        journal.path = Path(path)
        journal.pid = None
        journal.start_time = None
        journal.netns = None
        journal._entries = []
        journal._fd = None
        try:
            lines = journal.path.read_bytes().splitlines()
        except OSError as e:
            raise StateError(f"cannot read state journal {path}: {e.strerror}") from e
        for number, line in enumerate(lines):
            try:
                item = json.loads(line)
                entry = JournalEntry(int(item["seq"]), str(item["kind"]), dict(item["data"]))
            except (ValueError, KeyError, TypeError):
                log.warning("state journal %s: ignoring unreadable line %d", path, number + 1)
                continue
            journal._entries.append(entry)
            if entry.kind == _OWNER:
                journal.pid = entry.data.get("pid")
                journal.start_time = entry.data.get("start_time")
                journal.netns = entry.data.get("netns")
        return journal

    @property
    def entries(self) -> list[JournalEntry]:
        """All entries, including owner and marker entries, in the order written."""
        return list(self._entries)

    def owner_alive(self) -> bool:
        """True if the process that wrote this journal still runs (same PID and same start time)."""
        if not isinstance(self.pid, int):
            return False
        if self.pid == os.getpid():
            return True
        started = process_start_time(self.pid)
        return started is not None and (self.start_time is None or started == self.start_time)

    def record(self, kind: str, **data: Any) -> int:
        """Write down a change about to be made (fsync'd before returning); returns its sequence number."""
        if kind in (_OWNER, _FORGET, _UNDONE):
            raise ValueError(f"reserved journal kind {kind!r}")
        return self._append(kind, data)

    def forget(self, seq: int) -> None:
        """Mark record `seq` as not ours (the change was not made by us), so it is never undone."""
        self._append(_FORGET, {"seq": seq})

    def pending(self) -> list[JournalEntry]:
        """The changes still to undo, newest first."""
        skipped = {e.data.get("seq") for e in self._entries if e.kind in (_FORGET, _UNDONE)}
        return [
            e
            for e in reversed(self._entries)
            if e.kind not in (_OWNER, _FORGET, _UNDONE) and e.seq not in skipped
        ]

    def undo_all(self, undoers: Mapping[str, Undo] | None = None) -> list[str]:
        """Revert every pending change in reverse order; delete the journal if all succeeded.

        Returns descriptions of what was undone. Raises StateError (journal kept) if some undo failed.
        """
        undoers = default_undoers() if undoers is None else undoers
        done: list[str] = []
        failures: list[str] = []
        for entry in self.pending():
            undo = undoers.get(entry.kind)
            if undo is None:
                failures.append(f"#{entry.seq} {entry.kind}: no undo function for this kind")
                continue
            try:
                done.append(undo(entry.data))
            except Exception as e:
                log.warning("undoing %s %s failed: %s", entry.kind, entry.data, e)
                failures.append(f"#{entry.seq} {entry.kind}: {e}")
                continue
            self._mark_undone(entry.seq)
        if failures:
            raise StateError(
                f"could not undo everything (journal kept at {self.path}): " + "; ".join(failures)
            )
        self.close()
        self.path.unlink(missing_ok=True)
        return done

    def close(self) -> None:
        """Stop writing (the file stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _mark_undone(self, seq: int) -> None:
        if self._fd is None and self.path.exists():
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            except OSError:
                return  # a read-only journal is still undone; the mark only saves repeating it
        if self._fd is not None:
            self._append(_UNDONE, {"seq": seq})

    def _append(self, kind: str, data: dict[str, Any]) -> int:
        if self._fd is None:
            raise StateError(f"state journal {self.path} is not open for writing")
        seq = self._entries[-1].seq + 1 if self._entries else 0
        line = json.dumps({"seq": seq, "kind": kind, "data": data}, sort_keys=True) + "\n"
        try:
            os.write(self._fd, line.encode())
            os.fsync(self._fd)
        except OSError as e:
            raise StateError(f"cannot write state journal {self.path}: {e.strerror}") from e
        self._entries.append(JournalEntry(seq, kind, data))
        return seq


_UNDOERS: dict[str, Undo] = {}
PLATFORM_PACKAGE = "x2ssh.host.linux"  # importing it registers the undo function of each change it makes


def register_undo(kind: str, undo: Undo) -> None:
    """Declare how to undo journal records of `kind` (called by each host module that records changes)."""
    if kind in (_OWNER, _FORGET, _UNDONE):
        raise ValueError(f"reserved journal kind {kind!r}")
    _UNDOERS[kind] = undo


def default_undoers() -> dict[str, Undo]:
    """The undo function of every change kind registered by the platform package (imported lazily: it
    needs pyroute2 and friends)."""
    importlib.import_module(PLATFORM_PACKAGE)
    return dict(_UNDOERS)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
