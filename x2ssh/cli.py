"""The `x2ssh` command: parse, check, clean up leftovers, run the VPN session, report errors.

Exit codes: 0 success, 2 usage, 129/130/143 interrupted by SIGHUP/SIGINT/SIGTERM, 70 internal error,
otherwise the exit_code of the X2sshError raised (see x2ssh.errors).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import traceback
from types import FrameType

from x2ssh.errors import UsageError, X2sshError
from x2ssh.frontends.stop import STOP_SIGNALS
from x2ssh.host.api import Host
from x2ssh.host.platform import open_host
from x2ssh.host.privileges import drop_to, sudo_user
from x2ssh.sd_notify import Notifier
from x2ssh.settings import Settings, build_parser, parse_args

log = logging.getLogger("x2ssh")

EXIT_INTERNAL = 70  # EX_SOFTWARE


def main(argv: list[str] | None = None) -> int:
    """Run x2ssh with `argv` (None: sys.argv[1:]); returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("status", "down"):  # a bare first word: `x2ssh --vpn status` is a host
        from x2ssh.status_command import main_down, main_status

        return (main_status if args[0] == "status" else main_down)(args[1:])
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
        if settings.dynamic is not None and not settings.vpn:
            return _run_proxy(settings)
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
    helper = open_host(settings.state_dir, settings.verbose)
    try:
        done = helper.cleanup()
    finally:
        helper.down()
    for item in done:
        log.info("cleanup: %s", item)
    if not done:
        log.info("nothing to clean up")
    return 0


YOUNG_GENERATION_THRESHOLD = 20_000  # Python's default is 700


def settle_heap() -> None:
    """Prepare the garbage collector for the data plane, once everything is imported.

    Every connection and packet makes short-lived objects, and Python starts a young-generation collection
    every 700 net allocations: with a higher threshold the collector runs far less often for the same
    garbage. `gc.freeze` moves what start-up built (modules, asyncssh's tables, rich) out of the
    collector's reach, so the rarer full collections do not walk it again and again.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)


def _run_proxy(settings: Settings) -> int:
    """`x2ssh -D`: no root, no helper, no host change: the proxy runs as whoever started it."""
    from x2ssh.frontends import proxy  # imported late: it pulls in asyncssh

    try:
        settle_heap()
        return asyncio.run(proxy.run_proxy(settings))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def _run_vpn(settings: Settings) -> int:
    """Start the privileged helper (through sudo unless root), give up root if sudo started us, then run
    (with -D, the proxy runs beside the VPN in this process, so its port is opened as the user too).

    SIGTERM and SIGHUP unwind like Ctrl-C until the session installs its own handlers, so a signal at any
    moment ends in the helper's orderly undo (and if this process dies instead, the helper undoes anyway).
    """
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS if sig != signal.SIGINT}
    helper: Host | None = None
    notifier = Notifier(unset_environment=True)  # the helper and ssh children must not inherit it
    try:
        if settings.dynamic is not None:
            from x2ssh.frontends.proxy import check_proxy_bind

            check_proxy_bind(settings)  # a LAN bind without credentials: before sudo and any change
        invoker = sudo_user()
        helper = open_host(settings.state_dir, settings.verbose)
        if invoker is not None:
            drop_to(invoker)  # SSH and the data plane run as the user who typed `sudo x2ssh`
        s = settings
        start = helper.start(s.vpn_tun, s.vpn_mtu, s.vpn_exclude, s.vpn_kill_switch)
        for item in start.get("undone", []):
            log.warning("restored what an earlier run left behind: %s", item)
        from x2ssh.frontends import vpn  # imported late: it pulls in asyncssh and the native netstack

        settle_heap()
        result = asyncio.run(vpn.run_vpn(settings, helper, notifier))
        return result if isinstance(result, int) else 0
    except KeyboardInterrupt:
        return 128 + (received[0] if received else signal.SIGINT)
    finally:
        if helper is not None:
            helper.down()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
