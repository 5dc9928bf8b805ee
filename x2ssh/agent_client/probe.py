"""What deployment must know about a server before it starts the agent: its OS and a usable Python.

1. The OS (`remote_os.detect_remote_os`: `uname -s`, else `cmd /c ver`, else PowerShell). It decides how
   commands are written (POSIX shell quoting, or command lines cmd and PowerShell parse alike) and which
   pythons are tried.
2. Python: every candidate at once (one exec channel each) prints its version, `sys.platform` and path;
   the first in order that is 3.8 or newer wins. POSIX servers try the settings' list (`python3`,
   `/usr/bin/python3`, `python`); Windows servers `python`, then `py -3` (the launcher), and take only a
   native Windows python (`sys.platform == 'win32'`): the Windows bootstrap needs `icacls` and `%TEMP%`.

Both answers are cached per server (`ServerFactsCache`, keyed by user, address, port and host key), so a
reconnect skips the probes; deployment drops the entry when a start fails and probes once more.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncssh

from x2ssh.agent_client import remote_os as ros
from x2ssh.agent_client.link import AgentUnavailable, ServerPython

log = logging.getLogger(__name__)

MIN_PYTHON = (3, 8)
NOT_FOUND_STATUSES = (127, 9009)  # POSIX shells; cmd.exe ("is not recognized", the Store's python alias)
FALLBACK = "TCP still works, DNS falls back to DNS over TCP"


@dataclass(frozen=True)
class ServerFacts:
    """A server's OS and the python that runs the agent there."""

    os: ros.RemoteOS
    python: ServerPython


class ServerFactsCache:
    """ServerFacts by server, so reconnects to the same server skip the probes."""

    def __init__(self) -> None:
        self._facts: dict[tuple[str, ...], ServerFacts] = {}

    def get(self, key: tuple[str, ...] | None) -> ServerFacts | None:
        return None if key is None else self._facts.get(key)

    def put(self, key: tuple[str, ...] | None, facts: ServerFacts) -> None:
        if key is not None:
            self._facts[key] = facts

    def forget(self, key: tuple[str, ...] | None) -> None:
        if key is not None:
            self._facts.pop(key, None)


def server_key(conn: Any) -> tuple[str, ...] | None:
    """(user, address, port, host key fingerprint) of `conn`'s server; None when any is unknown."""
    try:
        host_key = conn.get_server_host_key()
        peer = conn.get_extra_info("peername")
        user = conn.get_extra_info("username")
    except (AttributeError, TypeError):
        return None
    if host_key is None or not peer or user is None:
        return None
    return (str(user), str(peer[0]), str(peer[1]), host_key.get_fingerprint())


def _label(command: str) -> str:
    return "powershell" if command.startswith("powershell ") else command


def _last_line(text: object) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[-1].strip() if lines else ""


async def detect_os(conn: asyncssh.SSHClientConnection, timeout: float) -> ros.RemoteOS:
    """The server's OS; AgentUnavailable (with what each probe said) when no probe gives a clear answer."""
    notes: list[str] = []

    async def run(command: str) -> tuple[int | None, str]:
        try:
            result = await conn.run(command, timeout=timeout)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            notes.append(f"{_label(command)}: {exc or type(exc).__name__}")
            return None, ""
        stderr = _last_line(result.stderr)
        notes.append(
            f"{_label(command)}: exit status {result.exit_status}" + (f" ({stderr})" if stderr else "")
        )
        return result.exit_status, str(result.stdout or "")

    kind = await ros.detect_remote_os(run)
    if kind is ros.RemoteOS.UNKNOWN:
        raise AgentUnavailable(f"cannot tell the server's operating system ({'; '.join(notes)}); {FALLBACK}")
    log.debug("server OS: %s", kind.value)
    return kind


def probe_command(candidate: str, kind: ros.RemoteOS) -> str:
    """The command that makes `candidate` print 'X2SSH-PY MAJOR MINOR PLATFORM EXECUTABLE'."""
    if kind is ros.RemoteOS.WINDOWS:
        return ros.python_probe_command(candidate)
    return shlex.join([candidate, "-I", "-c", ros.PROBE_CODE])


async def probe_python(
    conn: asyncssh.SSHClientConnection,
    candidates: Sequence[str],
    timeout: float,
    kind: ros.RemoteOS = ros.RemoteOS.POSIX,
) -> tuple[ServerPython | None, list[str]]:
    """The first candidate that is a usable Python >= 3.8, and what was found for each (for errors)."""

    async def probe(candidate: str) -> ServerPython | str:
        try:
            result = await conn.run(probe_command(candidate, kind), timeout=timeout)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            return f"{candidate}: {exc or type(exc).__name__}"
        for line in str(result.stdout or "").splitlines():
            fields = line.strip().split(" ", 4)
            if len(fields) == 5 and fields[0] == "X2SSH-PY":
                return ServerPython(candidate, (int(fields[1]), int(fields[2])), fields[3], fields[4])
        stderr = _last_line(result.stderr)
        if result.exit_status in NOT_FOUND_STATUSES or "is not recognized" in stderr:
            return f"{candidate}: not found" + (
                f" ({stderr})" if result.exit_status == 9009 and stderr else ""
            )
        return f"{candidate}: exit status {result.exit_status}" + (f" ({stderr})" if stderr else "")

    results = await asyncio.gather(*(probe(candidate) for candidate in candidates))
    found = None
    notes = []
    for result in results:
        if isinstance(result, str):
            notes.append(result)
        elif result.version < MIN_PYTHON:
            notes.append(f"{result.command}: Python {result.version[0]}.{result.version[1]} is too old")
        elif kind is ros.RemoteOS.WINDOWS and result.platform != "win32":
            notes.append(f"{result.command}: a {result.platform} python, not a native Windows one")
        else:
            found = found or result
    return found, notes


def no_python_message(kind: ros.RemoteOS, notes: Sequence[str]) -> str:
    """Why no agent can run, and what to do about it."""
    need = f"Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}"
    if kind is ros.RemoteOS.WINDOWS:
        return (
            f"no {need} on the Windows server ({'; '.join(notes)}); install Python from python.org "
            f"(it brings the py launcher) for the SSH user; {FALLBACK}"
        )
    return f"no {need} on the server ({'; '.join(notes)}); {FALLBACK}"


async def server_facts(
    conn: asyncssh.SSHClientConnection, posix_candidates: Sequence[str], timeout: float
) -> ServerFacts:
    """Detect the OS, then find Python (raises AgentUnavailable with a clear reason for either)."""
    kind = await detect_os(conn, timeout)
    candidates = ros.python_candidates(kind, posix_candidates)
    python, notes = await probe_python(conn, candidates, timeout, kind)
    if python is None:
        raise AgentUnavailable(no_python_message(kind, notes))
    return ServerFacts(kind, python)
