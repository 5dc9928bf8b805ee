"""Process bookkeeping for the harness: descendants, CPU time and RSS from /proc, and output watching."""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the parenthesised command name (which may itself contain spaces or parentheses).
    return text.rsplit(")", 1)[1].split()


def descendants(root: int) -> list[int]:
    """PIDs of every live descendant of `root`, parents before children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    queue = [root]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def with_descendants(pids: Iterable[int]) -> list[int]:
    result: list[int] = []
    for pid in pids:
        result += [pid, *descendants(pid)]
    return list(dict.fromkeys(result))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by `pid` (0 when it is gone)."""
    fields = _stat_fields(pid)
    if not fields:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy since boot (user, system, irq, softirq, steal...)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class ResourceMeter:
    """Measures CPU seconds and peak summed RSS of a changing set of processes over an interval.

    `pids()` is called at every sample (processes may come and go, e.g. sshd sessions). CPU is the sum over
    every process seen of (last sample - first sample), so a process that exits mid-interval still counts up
    to its last sample.
    """

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.1) -> None:
        self._pids = pids
        self._interval = interval
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self.peak_rss_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="resource-meter", daemon=True)

    def _sample(self) -> None:
        total_rss = 0
        for pid in self._pids():
            cpu = cpu_seconds(pid)
            self._first.setdefault(pid, cpu)
            self._last[pid] = max(cpu, self._last.get(pid, 0.0))
            total_rss += rss_kib(pid)
        self.peak_rss_kib = max(self.peak_rss_kib, total_rss)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> ResourceMeter:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    @property
    def cpu_seconds(self) -> float:
        return sum(self._last[pid] - self._first[pid] for pid in self._last)


class OutputWatcher:
    """Drains a process's (text) stdout into a log file on a thread and signals when a line matches."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, pattern: str) -> None:
        self._proc = proc
        self._log_path = log_path
        self._regex = re.compile(pattern)
        self.matched = threading.Event()
        self.tail: list[str] = []
        self._thread = threading.Thread(target=self._drain, name=f"watch-{proc.pid}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self._proc.stdout is not None
        with open(self._log_path, "a", errors="replace") as log:
            for raw in self._proc.stdout:
                line = raw if isinstance(raw, str) else raw.decode(errors="replace")
                log.write(line)
                log.flush()
                self.tail = [*self.tail[-30:], line.rstrip()]
                if self._regex.search(line):
                    self.matched.set()

    def wait(self, timeout: float) -> bool:
        """True once the pattern was seen; False on timeout or when the process exited first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.matched.wait(0.1):
                return True
            if self._proc.poll() is not None:
                with contextlib.suppress(RuntimeError):
                    self._thread.join(timeout=1)
                return self.matched.is_set()
        return False

    def tail_text(self, lines: int = 12) -> str:
        return "\n".join(self.tail[-lines:])


def wait_ready_line(
    proc: subprocess.Popen, what: str, timeout: float = 15.0, marker: bytes = b"ready"
) -> None:
    """Wait (bounded) until `proc` (stdout=PIPE, bytes) prints `marker`; RuntimeError otherwise."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buffered = b""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([proc.stdout], [], [], 0.2)
        if readable:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buffered += chunk
            if marker in buffered:
                return
        elif proc.poll() is not None:
            break
    raise RuntimeError(f"{what} did not become ready (exit code {proc.poll()}); output: {buffered[-500:]!r}")
