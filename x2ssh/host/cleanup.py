"""Undo what earlier x2ssh runs left behind, from their state journals (`--vpn-cleanup` and every start)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from x2ssh.errors import AlreadyRunning
from x2ssh.host.journal import JOURNAL_SUFFIX, StateJournal, Undo, current_netns
from x2ssh.settings import DEFAULT_STATE_DIR

log = logging.getLogger(__name__)


def cleanup(
    state_dir: Path = DEFAULT_STATE_DIR,
    *,
    own_pid: int | None = None,
    undoers: Mapping[str, Undo] | None = None,
) -> list[str]:
    """Undo every journal in `state_dir` written in this network namespace by a process that is gone.

    Journals of `own_pid` (this process, as a safety net after the session) are undone too. If a journal
    belongs to another live x2ssh, nothing is changed and AlreadyRunning is raised. Returns what was undone.
    """
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return []
    here = current_netns()
    journals = [StateJournal.load(p) for p in sorted(state_dir.glob("*" + JOURNAL_SUFFIX))]
    journals = [j for j in journals if j.netns in (here, None)]
    for journal in journals:
        if journal.pid != own_pid and journal.owner_alive():
            raise AlreadyRunning(
                f"another x2ssh (pid {journal.pid}) is running in this network namespace "
                f"(state {journal.path}); stop it first"
            )
    done: list[str] = []
    for journal in journals:
        log.info("cleaning up after x2ssh pid %s (%s)", journal.pid, journal.path)
        done += journal.undo_all(undoers)
    for item in done:
        log.info("cleanup: %s", item)
    return done
