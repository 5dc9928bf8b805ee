"""Undo what earlier x2ssh runs left behind, from their state journals (`--vpn-cleanup` and every start)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from x2ssh.errors import AlreadyRunning, X2sshError
from x2ssh.host.journal import JOURNAL_SUFFIX, StateJournal, Undo
from x2ssh.settings import DEFAULT_STATE_DIR

log = logging.getLogger(__name__)

SYSTEM_RESOLV_CONF = Path("/etc/resolv.conf")  # inside `ip netns exec NAME`: /etc/netns/NAME/resolv.conf


def cleanup(
    state_dir: Path = DEFAULT_STATE_DIR,
    *,
    own_pid: int | None = None,
    undoers: Mapping[str, Undo] | None = None,
    resolv_conf: Path | None = SYSTEM_RESOLV_CONF,
) -> list[str]:
    """Undo every journal in `state_dir` written in this network namespace by a process that is gone.

    Journals of `own_pid` (this process, as a safety net after the session) are undone too; so are journals
    of an earlier boot (their owner is dead whatever its PID). If a journal belongs to another live x2ssh,
    nothing is changed and AlreadyRunning is raised. Then, if `resolv_conf` still carries x2ssh's header
    although no journal covered it (the journal was lost), the original embedded in it is put back, unless
    some x2ssh that may be using that file is alive. Returns what was undone.
    """
    state_dir = Path(state_dir)
    everyone = _load_all(state_dir)
    journals = [j for j in everyone if j.belongs_here()]
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
    # a namespace without its own /etc/netns/NAME/resolv.conf shares the host's file: do not take it away
    # from a live x2ssh there
    others_alive = any(j.pid != own_pid and j.owner_alive() for j in everyone if j not in journals)
    if resolv_conf is not None and not others_alive:
        done += _recover_resolv_conf(resolv_conf)
    for item in done:
        log.info("cleanup: %s", item)
    return done


def _load_all(state_dir: Path) -> list[StateJournal]:
    if not state_dir.is_dir():
        return []
    return [StateJournal.load(p) for p in sorted(state_dir.glob("*" + JOURNAL_SUFFIX))]


def _recover_resolv_conf(path: Path) -> list[str]:
    from x2ssh.host.linux.dns import recover_resolv_conf  # lazily, like the undoers: needs the platform

    try:
        done = recover_resolv_conf(path)
    except X2sshError as e:  # e.g. an older x2ssh's file without an original: say so, do not block a start
        log.warning("%s", e.message)
        return []
    return [done] if done else []
