"""The state journal: every change x2ssh makes to the machine, written down before it is made.

Theory of operation. A journal is an append-only file of JSON lines, fsync'd after each line. The first line
names the owner: PID and start time, the boot (`/proc/sys/kernel/random/boot_id`) and the network namespace.
It is created whole or not at all: written to a temporary file in the same directory, fsync'd, then linked
to its final name (an atomic rename that never replaces an existing journal) and the directory fsync'd.
Then each change is recorded *before* it is applied (a route, the original resolv.conf bytes, a
systemd-resolved link, the TUN device), so that a run killed at any instant leaves a journal that covers at
least everything it changed. Three marker kinds refer back to an earlier record by its sequence number:
`forget` (the change turned out not to be ours, e.g. the route already existed), `undone` (already
reverted), and a record that `replaces` an older one of the same kind (newer data for the same change, e.g.
the resolv.conf that another program wrote while we ran; one line, so there is no moment with neither or
both). `undo_all()` reverts the remaining records in reverse order; each undo function tolerates a change
that is already gone, so undoing a record that was written but never applied is harmless. The file is
deleted once everything is undone, and kept (with what is left) if some undo failed, so that
`x2ssh --vpn-cleanup` can try again.

Where and whose. Journals live in a directory that survives a reboot (`/var/lib/x2ssh` by default), so a
run killed just before a power cut is still undone afterwards. After a reboot every journal of the previous
boot has a dead owner, whatever its PID says: the owner line's boot_id differs from the current one. One
journal per TUN name and network namespace: `ip netns exec` does not separate /run or /var/lib, and routes
and resolv.conf belong to a namespace, so a journal is only undone from the namespace that wrote it. A
namespace is recognised
- in the same boot by its identity (device and inode of /proc/self/ns/net), and
- across boots by a stable name, because inodes are handed out afresh at each boot: the initial namespace is
  always "init", a namespace created by `ip netns add NAME` is "ns-NAME" (found, like `ip netns identify`
  does, by comparing /proc/self/ns/net with the files under /run/netns). An unnamed namespace has no stable
  name; its journals can only be matched in the boot that wrote them.
The journal's file name uses the same key (`<tun>.<key>.journal`, the key being "init", "ns-NAME" or
"ino-DEV-INO"), so a named namespace finds its journal under the same name after a reboot.

Windows (not run there: no Windows machine). There are no network namespaces (every journal is the initial
namespace's), no boot id (a process's creation time, unique across boots, stands in for the start time:
`x2ssh.host.windows.process`), no uid and mode bits (the state directory's ACL is the Windows backend's
business) and no O_CLOEXEC/O_NOFOLLOW/O_DIRECTORY. The platform package whose undo functions fill the
registry is `x2ssh.host.windows` there.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from x2ssh.errors import StateError

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".journal"
_VERSION = 2  # 2: boot_id, netns_name, netns_initial in the owner line; `replaces` on records
_OWNER = "owner"
_FORGET = "forget"
_UNDONE = "undone"
_RESERVED = (_OWNER, _FORGET, _UNDONE)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
NETNS_RUN_DIR = Path("/run/netns")  # where `ip netns add NAME` bind-mounts the namespace it creates
INITIAL_NETNS_KEY = "init"
_PROC_NET_INIT_INO = 0xEFFFFFF9  # recent kernels give the initial namespace this fixed inode
# Not inherited by programs x2ssh runs, never through a symbolic link (flags Windows does not have).
_OPEN_FLAGS = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
_WINDOWS_NETNS = "windows"  # the one "namespace" of a Windows machine

Undo = Callable[[dict[str, Any]], str]
"""Reverts one recorded change given its data; returns a short description; must tolerate 'already gone'."""


@dataclass(frozen=True)
class JournalEntry:
    """One recorded change: its sequence number, kind (e.g. "route"), JSON data, and the sequence number of
    the older record of the same change that it supersedes, if any."""

    seq: int
    kind: str
    data: dict[str, Any]
    replaces: int | None = None


@dataclass(frozen=True)
class NetnsIdentity:
    """Who a network namespace is: `id` ("dev:ino", valid within one boot), its `ip netns` name if it has
    one, and whether it is the initial (host) namespace."""

    id: str
    name: str | None = None
    initial: bool = False

    @property
    def stable_key(self) -> str | None:
        """A name that stays the same across reboots: "init", "ns-NAME", or None for an unnamed namespace."""
        if self.initial:
            return INITIAL_NETNS_KEY
        if self.name is not None:
            return f"ns-{self.name}"
        return None

    @property
    def key(self) -> str:
        """The part of the journal and lock file names that stands for this namespace."""
        return self.stable_key or "ino-" + self.id.replace(":", "-")


def current_boot_id() -> str | None:
    """The kernel's random ID of the current boot, or None where /proc does not offer it."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def current_netns() -> str:
    """An identifier of this process's network namespace (device and inode of /proc/self/ns/net)."""
    if sys.platform == "win32":
        return _WINDOWS_NETNS
    st = os.stat("/proc/self/ns/net")
    return f"{st.st_dev}:{st.st_ino}"


def current_netns_identity() -> NetnsIdentity:
    """This process's network namespace: its id, and its name under /run/netns or "initial" if it has one."""
    if sys.platform == "win32":
        return NetnsIdentity(_WINDOWS_NETNS, initial=True)
    here = os.stat("/proc/self/ns/net")
    ident = f"{here.st_dev}:{here.st_ino}"
    if _is_initial_netns(here):
        return NetnsIdentity(ident, initial=True)
    try:
        names = sorted(os.listdir(NETNS_RUN_DIR))
    except OSError:
        names = []
    for name in names:
        try:
            st = os.stat(NETNS_RUN_DIR / name)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino):
            return NetnsIdentity(ident, name=name)
    return NetnsIdentity(ident)


def _is_initial_netns(here: os.stat_result) -> bool:
    try:
        init = os.stat("/proc/1/ns/net")
    except OSError:  # no ptrace access to PID 1 (e.g. a container): the kernel's fixed inode is the sign
        return here.st_ino == _PROC_NET_INIT_INO
    return (init.st_dev, init.st_ino) == (here.st_dev, here.st_ino)


def journal_path(state_dir: Path, tun: str) -> Path:
    """Where the journal of TUN `tun` in the current network namespace lives (the same path after a reboot
    for the initial namespace and for named ones)."""
    return state_dir / f"{tun}.{current_netns_identity().key}{JOURNAL_SUFFIX}"


def ensure_state_dir(path: Path) -> None:
    """Create the state directory (mode 0700) if needed; refuse one that another user could tamper with.

    Raises StateError if it is not a directory, not owned by this user, or writable by group or others.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True)
        os.chmod(path, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    except OSError as e:
        raise StateError(f"cannot create state directory {path}: {e.strerror}") from e
    try:
        st = os.stat(path)
    except OSError as e:
        raise StateError(f"cannot use state directory {path}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"state directory {path} is not a directory")
    if sys.platform == "win32":
        return  # no uid or mode bits: the directory's ACL is set by the Windows backend
    if st.st_uid != os.geteuid():
        raise StateError(f"state directory {path} belongs to uid {st.st_uid}, not to uid {os.geteuid()}")
    if st.st_mode & 0o022:
        raise StateError(f"state directory {path} is writable by others (mode {st.st_mode & 0o777:o})")


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of process `pid`, or None if it does not run (gone, or a
    zombie: it was killed and only waits for its parent to collect its status).

    Stored next to the PID so that a PID reused by an unrelated process is not mistaken for the owner.
    On Windows it is the process's creation time.
    """
    if sys.platform == "win32":
        from x2ssh.host.windows.process import process_start_time as windows_start_time

        return windows_start_time(pid)
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat_line.rpartition(")")[2].split()  # the command name may contain spaces and ')'
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of proc(5); fields[0] is field 3


class StateJournal:
    """An append-only, fsync'd record of the changes made by one x2ssh process.

    `StateJournal(path)` starts a new journal owned by this process (refusing if one exists: clean it up
    first); `StateJournal.load(path)` opens an existing one, e.g. left behind by a crashed run.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.pid: int | None = os.getpid()
        self.start_time = process_start_time(os.getpid())
        here = current_netns_identity()
        self.netns: str | None = here.id
        self.netns_name: str | None = here.name
        self.netns_initial: bool | None = here.initial
        self.boot_id: str | None = current_boot_id()
        self._entries: list[JournalEntry] = []
        self._fd: int | None = None
        ensure_state_dir(self.path.parent)
        owner = {
            "pid": self.pid,
            "start_time": self.start_time,
            "boot_id": self.boot_id,
            "netns": self.netns,
            "netns_name": self.netns_name,
            "netns_initial": self.netns_initial,
            "version": _VERSION,
        }
        first = JournalEntry(0, _OWNER, owner)
        self._create(_encode(first))
        self._entries.append(first)

    def _create(self, content: bytes) -> None:
        """Make the file appear with its owner line complete, never half-written, never over another."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _OPEN_FLAGS, 0o600)
                try:
                    _write_all(fd, content)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                _link_no_replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(self.path.parent)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | _OPEN_FLAGS)
        except FileExistsError:
            raise StateError(
                f"state journal {self.path} already exists: run x2ssh --vpn-cleanup first"
            ) from None
        except OSError as e:
            raise StateError(f"cannot create state journal {self.path}: {e.strerror}") from e

    @classmethod
    def load(cls, path: Path) -> StateJournal:
        """Read an existing journal. A torn last line (crash mid-write) is ignored."""
        journal = cls.__new__(cls)
        journal.path = Path(path)
        journal.pid = None
        journal.start_time = None
        journal.netns = None
        journal.netns_name = None
        journal.netns_initial = None
        journal.boot_id = None
        journal._entries = []
        journal._fd = None
        try:
            lines = journal.path.read_bytes().splitlines()
        except OSError as e:
            raise StateError(f"cannot read state journal {path}: {e.strerror}") from e
        for number, line in enumerate(lines):
            try:
                item = json.loads(line)
                replaces = item.get("replaces")
                entry = JournalEntry(
                    int(item["seq"]),
                    str(item["kind"]),
                    dict(item["data"]),
                    int(replaces) if replaces is not None else None,
                )
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("state journal %s: ignoring unreadable line %d", path, number + 1)
                continue
            journal._entries.append(entry)
            if entry.kind == _OWNER:
                journal.pid = entry.data.get("pid")
                journal.start_time = entry.data.get("start_time")
                journal.netns = entry.data.get("netns")
                journal.netns_name = entry.data.get("netns_name")
                journal.netns_initial = entry.data.get("netns_initial")
                journal.boot_id = entry.data.get("boot_id")
        return journal

    @property
    def entries(self) -> list[JournalEntry]:
        """All entries, including owner and marker entries, in the order written."""
        return list(self._entries)

    def same_boot(self) -> bool:
        """True unless the journal was provably written during an earlier boot (journals without a
        boot_id, written by older versions, count as this boot's)."""
        now = current_boot_id()
        return self.boot_id is None or now is None or self.boot_id == now

    def owner_alive(self) -> bool:
        """True if the process that wrote this journal still runs: same boot, same PID, same start time."""
        if not isinstance(self.pid, int) or not self.same_boot():
            return False
        if self.pid == os.getpid():
            return True
        started = process_start_time(self.pid)
        return started is not None and (self.start_time is None or started == self.start_time)

    def belongs_here(self, here: NetnsIdentity | None = None) -> bool:
        """True if this journal was written in the network namespace `here` (default: the current one).

        Same boot: the namespace identity (inode) must match. Any boot: a matching stable name ("init",
        or the same `ip netns` name) matches too; in the same boot that means the named namespace was
        deleted and created again, and the old one's changes to files such as /etc/netns/NAME/resolv.conf
        are this one's to undo. An old journal without namespace data is taken as this namespace's.
        """
        here = here or current_netns_identity()
        if self.netns is None:
            return True
        if self.same_boot() and self.netns == here.id:
            return True
        if self.netns_initial is None:
            return False  # version 1: only the inode is known, and it means nothing across boots
        mine = NetnsIdentity(self.netns, self.netns_name, bool(self.netns_initial)).stable_key
        return mine is not None and mine == here.stable_key

    def record(self, kind: str, **data: Any) -> int:
        """Write down a change about to be made (fsync'd before returning); returns its sequence number."""
        if kind in _RESERVED:
            raise ValueError(f"reserved journal kind {kind!r}")
        return self._append(kind, data)

    def replace(self, seq: int, **data: Any) -> int:
        """Write down newer data for the change recorded as `seq` (same kind), in one fsync'd line: from now
        on only the new record is undone. Returns the new record's sequence number."""
        old = next((e for e in self._entries if e.seq == seq), None)
        if old is None or old.kind in _RESERVED:
            raise ValueError(f"no journal record #{seq} to replace")
        return self._append(old.kind, data, replaces=seq)

    def forget(self, seq: int) -> None:
        """Mark record `seq` as not ours (the change was not made by us), so it is never undone."""
        self._append(_FORGET, {"seq": seq})

    def pending(self) -> list[JournalEntry]:
        """The changes still to undo, newest first."""
        skipped = {e.data.get("seq") for e in self._entries if e.kind in (_FORGET, _UNDONE)}
        skipped |= {e.replaces for e in self._entries if e.replaces is not None}
        return [e for e in reversed(self._entries) if e.kind not in _RESERVED and e.seq not in skipped]

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
        _fsync_dir(self.path.parent)
        return done

    def close(self) -> None:
        """Stop writing (the file stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _mark_undone(self, seq: int) -> None:
        if self._fd is None and self.path.exists():
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | _OPEN_FLAGS)
            except OSError:
                return  # a read-only journal is still undone; the mark only saves repeating it
        if self._fd is not None:
            self._append(_UNDONE, {"seq": seq})

    def _append(self, kind: str, data: dict[str, Any], replaces: int | None = None) -> int:
        if self._fd is None:
            raise StateError(f"state journal {self.path} is not open for writing")
        seq = self._entries[-1].seq + 1 if self._entries else 0
        entry = JournalEntry(seq, kind, data, replaces)
        try:
            _write_all(self._fd, _encode(entry))
            os.fsync(self._fd)
        except OSError as e:
            raise StateError(f"cannot write state journal {self.path}: {e.strerror}") from e
        self._entries.append(entry)
        return seq


_UNDOERS: dict[str, Undo] = {}
# Importing it registers the undo function of each change it makes.
PLATFORM_PACKAGE = "x2ssh.host.windows" if sys.platform == "win32" else "x2ssh.host.linux"


def register_undo(kind: str, undo: Undo) -> None:
    """Declare how to undo journal records of `kind` (called by each host module that records changes)."""
    if kind in _RESERVED:
        raise ValueError(f"reserved journal kind {kind!r}")
    _UNDOERS[kind] = undo


def default_undoers() -> dict[str, Undo]:
    """The undo function of every change kind registered by the platform package (imported lazily: it
    needs pyroute2 and friends)."""
    importlib.import_module(PLATFORM_PACKAGE)
    return dict(_UNDOERS)


def _encode(entry: JournalEntry) -> bytes:
    item: dict[str, Any] = {"seq": entry.seq, "kind": entry.kind, "data": entry.data}
    if entry.replaces is not None:
        item["replaces"] = entry.replaces
    return (json.dumps(item, sort_keys=True) + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _link_no_replace(src: Path, dst: Path) -> None:
    """Give `src` the name `dst` atomically; FileExistsError if `dst` exists (a rename would replace it)."""
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # a file system without hard links: rename, which is atomic but would replace; the run lock
        # (x2ssh.host.lock) makes sure nobody else creates this journal meanwhile
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))  # Windows: refused, skipped
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
