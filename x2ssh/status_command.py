"""`x2ssh status [--json]` and `x2ssh down`: ask the x2ssh running in this network namespace.

Both talk to its control socket (x2ssh.control). Exit codes: 0 done; 1 x2ssh answered wrongly or did not
stop in time; 2 usage; 3 no x2ssh is running in this network namespace; 77 the run belongs to another user.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from x2ssh.control import (
    RUN_DIR,
    ControlNotRunning,
    control_socket_path,
    exchange_sync,
    request_sync,
    user_run_dir,
)
from x2ssh.errors import UsageError, X2sshError
from x2ssh.status_report import render_status

DOWN_TIMEOUT = 30.0  # the teardown restores routes, DNS and firewall: seconds, not minutes
EXIT_NOT_RUNNING = ControlNotRunning.exit_code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"x2ssh {command}", description=description, allow_abbrev=False)
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        type=Path,
        default=RUN_DIR,
        help=f"where the runs' control sockets live: DIR/<network namespace>/control.sock [{RUN_DIR}]",
    )
    p.add_argument(
        "--socket", metavar="PATH", type=Path, help="this control socket instead (overrides --run-dir)"
    )
    return p


def main_status(argv: list[str]) -> int:
    """`x2ssh status [--json]`: print the running x2ssh's status as a table, or as JSON (schema in
    x2ssh.status_report). Returns the exit code."""
    p = _parser("status", "Show the state of the x2ssh running in this network namespace.")
    p.add_argument("--json", action="store_true", help="print the status as JSON (stable keys)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="wait for an answer [5]")
    try:
        args = _parse(p, argv)
        data = request_sync(_socket(args), "status", timeout=args.timeout)
    except X2sshError as e:
        return _fail(e)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        Console().print(render_status(data))
    return 0


def main_down(argv: list[str]) -> int:
    """`x2ssh down`: stop the running x2ssh as SIGTERM would, and wait (bounded) until it has finished
    restoring the machine and exited. Returns the exit code."""
    p = _parser("down", "Stop the x2ssh running in this network namespace and wait until it has exited.")
    p.add_argument(
        "--timeout",
        type=float,
        default=DOWN_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for it to exit [{DOWN_TIMEOUT:g}]",
    )
    try:
        args = _parse(p, argv)
        path = _socket(args)
        exchange = exchange_sync(path, "down", timeout=min(args.timeout, 5.0))
    except X2sshError as e:
        return _fail(e)
    who = f"x2ssh (pid {exchange.server_pid})" if exchange.server_pid else "x2ssh"
    if not wait_until_stopped(path, exchange.server_pid, args.timeout):
        print(f"x2ssh: {who} was asked to stop but still runs after {args.timeout:g} s", file=sys.stderr)
        return 1
    print(f"x2ssh: {who} stopped", file=sys.stderr)
    return 0


def wait_until_stopped(path: Path, pid: int | None, timeout: float, poll: float = 0.1) -> bool:
    """Wait until the run is over: its process gone (when its PID is known), else its socket file gone.
    True if that happened within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if not (process_alive(pid) if pid else path.exists()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still exists and is not a zombie (an exited process its parent has not reaped
    has finished its work)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else (e.g. root's service asked by a user who may control it)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # gone between the two checks
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # --help
        raise _Done(e.code if isinstance(e.code, int) else 0) from None
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    return args


def _socket(args: argparse.Namespace) -> Path:
    """--socket, else the namespace's socket under --run-dir (a VPN run), else the user's own (`x2ssh -D`)."""
    if args.socket is not None:
        return args.socket
    system = control_socket_path(args.run_dir)
    try:
        if system.exists():
            return system
    except PermissionError:
        return system  # there, but another user's run: connecting says so
    users = control_socket_path(user_run_dir())
    return users if users.exists() else system


class _Done(X2sshError):
    """--help was printed: end with its exit code, nothing more to say."""

    def __init__(self, code: int) -> None:
        super().__init__("")
        self.exit_code = code


def _fail(e: X2sshError) -> int:
    if e.message:
        print(f"x2ssh: {e.message}", file=sys.stderr)
    return e.exit_code


def main(argv: list[str] | None = None) -> int:
    """`python -m x2ssh.status_command status|down [options]` (what `x2ssh status|down` dispatches to)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"status": main_status, "down": main_down}
    if not argv or argv[0] not in commands:
        print("usage: python -m x2ssh.status_command {status,down} [options]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
