"""One x2ssh per network namespace: an exclusive lock held for the whole run.

The lock is `flock(2)` on `<state_dir>/<key>.lock`, where `<key>` names the network namespace as the
journal's file name does ("init", "ns-NAME", "ino-DEV-INO"; see x2ssh.host.journal). One lock per namespace,
not per TUN: two runs in the same namespace with different TUN names would still fight over the default
route and resolv.conf. The holder writes its PID into the file so that the next one can say who holds it.

The kernel drops a flock when its last file descriptor closes, so a run killed by SIGKILL (or a reboot)
never leaves a stale lock behind. The holder deletes the file when it lets go, so files of namespaces that
are gone do not pile up in the state directory. Deleting a lock file is safe only because every acquirer,
once it holds the flock, checks that the path still names the inode it locked: one that locked a file
unlinked meanwhile lets go and tries again on the new file, so two processes never both hold "the" lock.

Windows has no flock: there the lock is a byte range locked with `msvcrt.locking` (past the PID, so others
can still read who holds it), which Windows also releases when the process ends (not run there: no
Windows machine). An open file cannot be deleted there, so the file stays.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from types import TracebackType

from x2ssh.errors import AlreadyRunning, StateError
from x2ssh.host.journal import current_netns_identity, ensure_state_dir

LOCK_SUFFIX = ".lock"
_OPEN_FLAGS = getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
_WINDOWS_LOCK_OFFSET = 4096  # the byte locked on Windows: beyond any PID written at offset 0


def _lock(fd: int) -> None:
    """Lock `fd` exclusively without waiting; BlockingIOError if another process holds it."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except PermissionError as e:  # EACCES: locked by another process
            raise BlockingIOError(str(e)) from e
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def lock_path(state_dir: Path) -> Path:
    """The lock file of the current network namespace in `state_dir`."""
    return Path(state_dir) / f"{current_netns_identity().key}{LOCK_SUFFIX}"


class RunLock:
    """The exclusive run lock of this network namespace; take it before changing anything.

    `with RunLock(state_dir): ...`, or `acquire()` / `release()`. The file descriptor is close-on-exec, so
    programs that x2ssh runs do not inherit (and prolong) the lock.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = lock_path(state_dir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True between a successful acquire() and release()."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock without waiting. Raises AlreadyRunning naming the holder's PID, or StateError."""
        if self._fd is not None:
            return
        ensure_state_dir(self.path.parent)
        for _ in range(_ATTEMPTS):
            fd = self._try_once()
            if fd is not None:
                self._fd = fd
                return
        raise StateError(f"cannot lock {self.path}: it keeps being replaced")

    def _try_once(self) -> int | None:
        """One attempt: the locked fd, or None if the file was unlinked or replaced while we locked it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
        except OSError as e:
            raise StateError(f"cannot open lock file {self.path}: {e.strerror}") from e
        try:
            _lock(fd)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder is not None else "pid unknown"
            raise AlreadyRunning(
                f"another x2ssh ({who}) is running in this network namespace "
                f"(lock {self.path}); stop it first"
            ) from None
        except OSError as e:
            os.close(fd)
            raise StateError(f"cannot lock {self.path}: {e.strerror}") from e
        if not _names(self.path, fd):  # the previous holder deleted it as we locked it
            os.close(fd)
            return None
        with contextlib.suppress(OSError):  # the PID only informs; the lock itself is held
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def release(self) -> None:
        """Let go of the lock (idempotent) and delete its file while still holding it."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if _names(self.path, fd):
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


_ATTEMPTS = 16


def _names(path: Path, fd: int) -> bool:
    """True if `path` is (still) the file open on `fd`."""
    try:
        there, ours = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
