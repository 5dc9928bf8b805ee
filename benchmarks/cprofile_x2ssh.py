"""`python -m benchmarks.cprofile_x2ssh OUT ARGS...`: run `x2ssh ARGS` under cProfile counting CPU time.

A tool for benchmarks.profile_connect: py-spy samples wall time, which on a busy two-core machine charges
the time x2ssh spends preempted (often right after a socket write wakes sshd) to that write. Here the
profile's clock is the process's CPU time; the stats go to OUT when x2ssh exits.
"""

from __future__ import annotations

import cProfile
import sys
import time

from x2ssh.cli import main

if __name__ == "__main__":
    out, sys.argv[1:] = sys.argv[1], sys.argv[2:]
    profiler = cProfile.Profile(time.process_time)
    try:
        code = profiler.runcall(main)
    finally:
        profiler.dump_stats(out)
    sys.exit(code)
