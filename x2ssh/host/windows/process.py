"""Is a process still the one that wrote a journal? Its creation time, the Windows counterpart of the start
time that `x2ssh.host.journal` reads from /proc on Linux (NOT RUN here: no Windows machine).

A PID alone is not enough: Windows reuses PIDs. The creation time (GetProcessTimes, 100-ns units since
1601) is unique per process, so the journal stores it beside the PID and compares both.
"""

from __future__ import annotations

import ctypes

from x2ssh.host.windows import structs as S
from x2ssh.host.windows.prototypes import function as fn


def process_start_time(pid: int) -> int | None:
    """The creation time of process `pid`, or None if no such process runs (gone, or exited and only kept
    by an open handle)."""
    handle = fn("OpenProcess")(S.PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return None  # ERROR_INVALID_PARAMETER: no such process (access denied means it runs: see below)
    try:
        code = S.DWORD()
        if not fn("GetExitCodeProcess")(handle, ctypes.byref(code)) or code.value != S.STILL_ACTIVE:
            return None
        created, ended, kernel, user = S.FILETIME(), S.FILETIME(), S.FILETIME(), S.FILETIME()
        if not fn("GetProcessTimes")(
            handle, ctypes.byref(created), ctypes.byref(ended), ctypes.byref(kernel), ctypes.byref(user)
        ):
            return None
        return created.value
    finally:
        fn("CloseHandle")(handle)
