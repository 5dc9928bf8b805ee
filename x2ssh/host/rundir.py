"""The run's directory under /run/x2ssh, owned by the user who started the run: the control socket lives in
it, so only that user (and root) can reach the running x2ssh. Created by the privileged helper, journaled,
removed on undo."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from x2ssh.errors import StateError
from x2ssh.host.journal import current_netns_identity

if TYPE_CHECKING:
    from x2ssh.host.journal import StateJournal

RUN_DIR_RECORD = "run_dir"
RUN_ROOT = Path("/run/x2ssh")


def namespace_run_dir(root: Path = RUN_ROOT) -> Path:
    """The run directory of the current network namespace: root/<namespace key>."""
    return root / current_netns_identity().key


def make_run_dir(path: Path, uid: int, gid: int, journal: StateJournal) -> Path:
    """Create `path` (a child of RUN_ROOT) for `uid`:`gid`, mode 0700; an existing one is taken over only
    if it is a real directory (not a link). Journaled first."""
    if path.parent != RUN_ROOT:
        raise StateError(f"refusing run directory outside {RUN_ROOT}: {path}")
    RUN_ROOT.mkdir(mode=0o755, exist_ok=True)
    root = os.lstat(RUN_ROOT)
    if not stat.S_ISDIR(root.st_mode) or root.st_uid != 0:
        raise StateError(f"{RUN_ROOT} is not a directory owned by root")
    if stat.S_IMODE(root.st_mode) != 0o755:
        os.chmod(RUN_ROOT, 0o755)  # each run's own directory is 0700; the parent must let its user through
    journal.record(RUN_DIR_RECORD, path=str(path))
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise StateError(f"{path} exists and is not a directory") from None
    os.chown(path, uid, gid)
    os.chmod(path, 0o700)
    return path


def undo_run_dir_record(data: dict[str, Any]) -> str:
    """Remove the run directory (and the control socket in it), if it is still there."""
    path = Path(data["path"])
    if path.parent != RUN_ROOT:
        raise StateError(f"journal names a run directory outside {RUN_ROOT}: {path}")
    if not path.is_dir() or path.is_symlink():
        return f"already gone: {path}"
    shutil.rmtree(path, ignore_errors=True)
    return f"removed {path}"
