"""The `x2ssh` command: parse, check, clean up leftovers, run the VPN session, report errors.

Exit codes: 0 success, 2 usage, 130/143 interrupted by SIGINT/SIGTERM, 70 internal error, otherwise the
exit_code of the X2sshError raised (see x2ssh.errors).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import traceback
from types import FrameType

from x2ssh.errors import UsageError, X2sshError
from x2ssh.host.cleanup import cleanup
from x2ssh.host.preflight import check_privileges, check_tun_device, check_tun_name_free
from x2ssh.settings import Settings, build_parser, parse_args

log = logging.getLogger("x2ssh")

EXIT_INTERNAL = 70  # EX_SOFTWARE


def main(argv: list[str] | None = None) -> int:
    """Run x2ssh with `argv` (None: sys.argv[1:]); returns the process exit code."""
    try:
        settings = parse_args(argv)
    except UsageError as e:
        sys.stderr.write(build_parser().format_usage())
        print(f"x2ssh: error: {e.message}", file=sys.stderr)
        return e.exit_code
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    configure_logging(settings.verbose, settings.quiet)
    try:
        if settings.vpn_cleanup:
            return _cleanup_only(settings)
        return _run_vpn(settings)
    except X2sshError as e:
        log.debug("error details", exc_info=True)
        print(f"x2ssh: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception:
        print("x2ssh: internal error (please report it):", file=sys.stderr)
        traceback.print_exc()
        return EXIT_INTERNAL


def configure_logging(verbose: int, quiet: bool) -> None:
    """stderr logging: -q warnings only, default info, -v debug of x2ssh, -vv also asyncssh, -vvv all."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(detailed=verbose > 0))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("asyncssh").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose >= 3 else logging.WARNING)


class _Formatter(logging.Formatter):
    def __init__(self, detailed: bool) -> None:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if detailed else "x2ssh: %(message)s"
        super().__init__(fmt)
        self.detailed = detailed

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not self.detailed and record.levelno >= logging.WARNING:
            record.message = f"{record.levelname.lower()}: {record.message}"
        return super().formatMessage(record)


def _cleanup_only(settings: Settings) -> int:
    check_privileges()
    done = cleanup(settings.state_dir)
    if not done:
        log.info("nothing to clean up")
    return 0


def _run_vpn(settings: Settings) -> int:
    check_privileges()
    check_tun_device()
    cleanup(settings.state_dir)  # leftovers of a run that was killed; refuses if another x2ssh is live
    check_tun_name_free(settings.vpn_tun)
    if settings.vpn_kill_switch:  # fail before anything changes when nftables cannot do it
        from x2ssh.host.linux.firewall import KillSwitch

        KillSwitch(settings.vpn_tun, [], settings.vpn_exclude).check()
    from x2ssh import session  # imported late: it pulls in asyncssh and the native netstack

    received: list[int] = []

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt  # unwinds like Ctrl-C, so the session's own cleanup runs

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        result = asyncio.run(session.run_vpn(settings))
        return result if isinstance(result, int) else 0
    except KeyboardInterrupt:
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _safety_net(settings)


def _safety_net(settings: Settings) -> None:
    """Undo whatever the session journaled but did not undo itself (it normally leaves nothing)."""
    try:
        leftovers = cleanup(settings.state_dir, own_pid=os.getpid())
    except X2sshError as e:
        log.error("could not restore everything: %s (run x2ssh --vpn-cleanup)", e.message)
        return
    if leftovers:
        log.warning("restored what the session left behind: %s", "; ".join(leftovers))
