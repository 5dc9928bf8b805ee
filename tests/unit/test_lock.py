"""RunLock between real processes: exclusive, names its holder, released by exit and by SIGKILL."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from x2ssh.errors import AlreadyRunning
from x2ssh.host.lock import RunLock, lock_path

REPO = Path(__file__).resolve().parents[2]

HOLDER = r"""
import sys, time
from pathlib import Path
from x2ssh.host.lock import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
sys.stdin.readline()  # hold until told (or killed)
lock.release()
print("released", flush=True)
time.sleep(60 if sys.argv[2] == "linger" else 0)
"""


def start_holder(state: Path, after: str = "exit") -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state), after],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_with_the_holders_pid(tmp_path):
    state = tmp_path / "state"
    holder = start_holder(state)
    try:
        with pytest.raises(AlreadyRunning, match=f"pid {holder.pid}") as refused:
            RunLock(state).acquire()
        assert refused.value.exit_code == 75
        assert lock_path(state).read_text() == f"{holder.pid}\n"
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_sigkill_leaves_no_stale_lock(tmp_path):
    state = tmp_path / "state"
    holder = start_holder(state)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    with RunLock(state) as lock:
        assert lock.held
        assert lock_path(state).read_text() == f"{os.getpid()}\n"
    assert not lock.held


def test_release_lets_the_next_one_in_while_the_first_still_runs(tmp_path):
    state = tmp_path / "state"
    holder = start_holder(state, after="linger")
    try:
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        lock = RunLock(state)
        lock.acquire()
        lock.acquire()  # idempotent
        lock.release()
        lock.release()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_the_lock_is_per_namespace_and_in_the_state_dir(tmp_path):
    state = tmp_path / "state"
    with RunLock(state):
        assert lock_path(state).parent == state
        assert lock_path(state).name.endswith(".lock")
        assert state.stat().st_mode & 0o777 == 0o700
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
            RunLock(state).acquire()  # a second descriptor in the same process is refused too


def test_release_deletes_the_file_so_dead_namespaces_leave_nothing(tmp_path):
    state = tmp_path / "state"
    with RunLock(state):
        assert lock_path(state).exists()
    assert not lock_path(state).exists()
    assert list(state.iterdir()) == []


def test_a_waiter_that_locked_a_deleted_file_retries_on_the_new_one(tmp_path, monkeypatch):
    """The race that deleting lock files opens: B opens the file, A releases (deletes it), B's flock
    succeeds on the dead inode. B must notice, and then hold the lock on the file that the path names,
    so that a third process is refused."""
    import x2ssh.host.lock as lock_module

    state = tmp_path / "state"
    first = RunLock(state)
    first.acquire()
    real_lock = lock_module._lock
    calls = []

    def lock_after_release(fd):
        calls.append(fd)
        if len(calls) == 1:
            first.release()  # deletes the file B has open
        return real_lock(fd)

    monkeypatch.setattr(lock_module, "_lock", lock_after_release)
    second = RunLock(state)
    second.acquire()
    monkeypatch.setattr(lock_module, "_lock", real_lock)
    try:
        assert len(calls) == 2  # the first attempt locked the deleted inode and was given up
        assert lock_path(state).read_text() == f"{os.getpid()}\n"
        with pytest.raises(AlreadyRunning):
            RunLock(state).acquire()
    finally:
        second.release()
