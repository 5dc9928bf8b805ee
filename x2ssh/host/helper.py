"""The privileged helper: the only part of x2ssh that runs as root during a VPN run.

Theory of operation. x2ssh starts this program itself (through `sudo` when run by a normal user, directly
when it is root) with one end of an AF_UNIX SOCK_SEQPACKET socketpair as its standard input. It answers the
closed list of requests in `helper_protocol` and nothing else: it creates the TUN device and sockets that
carry the firewall mark (their descriptors go back over SCM_RIGHTS), changes routes, DNS and the kill switch,
and keeps the journal of every change. It never parses a packet or a byte from the SSH server.

Requests are checked twice: `validate()` for shape and range, then against the run's state (each change
once, in order: start, open_tun, routes, dns, kill_switch). The helper undoes everything, newest first, when
asked ("down"), when its parent goes away (end of file on the socket: the parent exited or was killed), or
on SIGTERM. SIGINT and SIGHUP are ignored: Ctrl-C or a closed terminal reach the parent, which shuts down in
order and then says "down". While the run is up it checks once a second that nobody rewrote the DNS
configuration, and re-applies it if so.
"""

from __future__ import annotations

import argparse
import array
import logging
import os
import select
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from x2ssh.errors import X2sshError
from x2ssh.host import helper_protocol as proto
from x2ssh.host.cleanup import cleanup
from x2ssh.host.journal import StateJournal, ensure_state_dir, journal_path
from x2ssh.host.lock import RunLock
from x2ssh.settings import DEFAULT_STATE_DIR

log = logging.getLogger("x2ssh.helper")

GUARD_INTERVAL = 1.0
MAX_MARKED_SOCKETS = 4096  # reconnects and a connection pool need a few; far fewer than this
EXIT_INTERNAL = 70


class PrivilegedHelper:
    """The request handlers and the run's state; `handle()` never raises for a bad request."""

    def __init__(self, state_dir: Path, peer_uid: int = 0) -> None:
        self.state_dir = state_dir
        self.peer_uid = peer_uid  # who made our socket: root (sudo x2ssh) or the user
        self.lock = RunLock(state_dir)  # one run per network namespace, held until this process ends
        self.params: dict[str, Any] | None = None
        self.journal: StateJournal | None = None
        self.tun_name: str | None = None
        self.done: set[str] = set()
        self.marked = 0
        self.finished = False
        self.dns: Any = None  # the DnsConfigurator once DNS is applied
        self.routing_mode = "none"

    # -- dispatch --

    def handle(self, data: bytes) -> tuple[dict[str, Any], int | None]:
        """One request datagram in, (reply, fd to pass or None) out."""
        try:
            op, args = proto.validate(proto.decode(data))
            self._check_order(op)
            result, fd = getattr(self, f"_op_{op}")(**args)
            if op != "marked_socket":
                self.done.add(op)
            return {"ok": True, "result": result}, fd
        except X2sshError as e:
            log.warning("request refused: %s", e.message)
            return {"ok": False, "error": e.message, "code": e.exit_code}, None
        except Exception as e:  # a bug here must not leave the host changed: report, keep serving
            log.exception("internal error")
            return {"ok": False, "error": f"internal error in the privileged helper: {e}", "code": 70}, None

    def _check_order(self, op: str) -> None:
        needs = {
            "open_tun": "start",
            "marked_socket": "start",
            "routes": "open_tun",
            "dns": "open_tun",
            "kill_switch": "routes",
            "run_dir": "start",
        }
        if op in self.done and op not in ("status", "marked_socket"):
            raise proto.RequestRejected(f"{op}: already done in this run")
        if op in ("start", "cleanup") and ({"start", "cleanup"} & self.done):
            raise proto.RequestRejected(f"{op}: the run has started already")
        required = needs.get(op)
        if required is not None and required not in self.done:
            raise proto.RequestRejected(f"{op}: needs {required} first")
        if op == "kill_switch" and not (self.params and self.params["kill_switch"]):
            raise proto.RequestRejected("kill_switch: not requested at start")

    # -- requests --

    def _op_start(
        self, version: int, tun: str, mtu: int, excludes: list[str], kill_switch: bool
    ) -> tuple[dict[str, Any], None]:
        from x2ssh.host.preflight import check_tun_device, check_tun_name_free

        self.lock.acquire()  # before anything changes; refuses while another x2ssh runs here
        undone = cleanup(self.state_dir)  # runs that were killed; refuses if another x2ssh is live here
        check_tun_device()
        check_tun_name_free(tun)
        if kill_switch:  # fail before anything changes when nftables cannot do it
            self._kill_switch(tun, excludes).check()
        self.params = {"tun": tun, "mtu": mtu, "excludes": excludes, "kill_switch": kill_switch}
        self.journal = StateJournal(journal_path(self.state_dir, tun))
        return {"pid": os.getpid(), "undone": undone}, None

    def _op_cleanup(self) -> tuple[dict[str, Any], None]:
        self.lock.acquire()
        return {"undone": cleanup(self.state_dir)}, None

    def _op_open_tun(self) -> tuple[dict[str, Any], int]:
        from x2ssh.host.linux.tun import open_tun

        assert self.params is not None
        tun = open_tun(self.params["tun"], self.params["mtu"], journal=self.journal)
        self.tun_name = tun.name
        result = {
            "name": tun.name,
            "mtu": tun.mtu,
            "v4": str(tun.v4),
            "v6": str(tun.v6) if tun.v6 is not None else None,
        }
        return result, tun.fd  # the parent owns the device from now on; our copy is closed after sending

    def _op_marked_socket(self, family: int, type: str) -> tuple[dict[str, Any], int]:
        from x2ssh.host.linux import routes

        if self.marked >= MAX_MARKED_SOCKETS:
            raise proto.RequestRejected(f"marked_socket: more than {MAX_MARKED_SOCKETS} in one run")
        fam = socket.AF_INET6 if family == 6 else socket.AF_INET
        kind = socket.SOCK_STREAM if type == "stream" else socket.SOCK_DGRAM
        sock = socket.socket(fam, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, routes.FWMARK)
        self.marked += 1
        return {"mark": routes.FWMARK}, sock.detach()

    def _op_routes(self, bypass: list[str]) -> tuple[dict[str, Any], None]:
        """Policy routing (marked sockets follow the main table) where the kernel has it, else the /1 split
        routes with the server and ProxyJump hops (`bypass`) pinned to their current path."""
        import ipaddress

        from x2ssh.host.linux.firewall import MarkRestore
        from x2ssh.host.linux.routes import LinuxRouting, plan_policy, plan_routes

        assert self.params is not None and self.journal is not None and self.tun_name is not None
        excludes = [ipaddress.ip_network(n) for n in self.params["excludes"]]
        routing = LinuxRouting()
        families = routing.policy_families(self.tun_name)
        if 4 in families:
            routing.apply_policy(plan_policy(self.tun_name, excludes, families), self.journal)
            # replies carry the SSH connection's mark back, else strict rp_filter drops them
            MarkRestore().apply(self.journal)
            self.routing_mode = "policy"
        else:
            log.warning("no policy routing in this kernel: split routes, pinned server (no roaming)")
            addrs = [ipaddress.ip_address(a) for a in bypass]
            routing.apply(plan_routes(self.tun_name, addrs, excludes, routing.lookup_original), self.journal)
            self.routing_mode = "split"
        return {"mode": self.routing_mode}, None

    def _op_dns(self, servers: list[str]) -> tuple[dict[str, Any], None]:
        import ipaddress

        from x2ssh.host.linux.dns import DnsConfigurator

        assert self.journal is not None and self.tun_name is not None
        dns = DnsConfigurator(self.tun_name)
        dns.apply([ipaddress.ip_address(s) for s in servers], self.journal)
        self.dns = dns
        return {"backend": dns.backend}, None

    def _op_kill_switch(self) -> tuple[dict[str, Any], None]:
        assert self.params is not None and self.journal is not None
        self._kill_switch(self.params["tun"], self.params["excludes"]).apply(self.journal)
        return {}, None

    def _op_run_dir(self, uid: int) -> tuple[dict[str, Any], None]:
        """The run's directory for the control socket, owned by `uid`: the user on the other end of our
        socket, or the one sudo ran us for; root (x2ssh started by root, or by sudo before it gave up root)
        may name any user."""
        from x2ssh.host.rundir import make_run_dir, namespace_run_dir

        sudo_uid = os.environ.get("SUDO_UID", "")
        if self.peer_uid != 0 and uid != self.peer_uid and str(uid) != sudo_uid:
            raise proto.RequestRejected(f"run_dir: uid {uid} is not the requesting user")
        import pwd

        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid
        assert self.journal is not None
        path = make_run_dir(namespace_run_dir(), uid, gid, self.journal)
        return {"path": str(path)}, None

    def _op_status(self) -> tuple[dict[str, Any], None]:
        return {
            "tun": self.tun_name,
            "routing": self.routing_mode,
            "dns": self.dns.backend if self.dns is not None else None,
            "kill_switch": "kill_switch" in self.done,
            "journal": str(self.journal.path) if self.journal is not None else None,
        }, None

    def _op_down(self) -> tuple[dict[str, Any], None]:
        undone = self.undo_all()
        self.finished = True
        return {"undone": undone}, None

    @staticmethod
    def _kill_switch(tun: str, excludes: list[str]) -> Any:
        import ipaddress

        from x2ssh.host.linux.firewall import KillSwitch

        return KillSwitch(tun, [ipaddress.ip_network(n) for n in excludes])

    # -- housekeeping --

    def tick(self) -> None:
        """Called about once a second: put DNS back if something else rewrote it."""
        if self.dns is None or self.journal is None:
            return
        try:
            message = self.dns.check(self.journal)
        except X2sshError as e:
            log.warning("DNS check failed: %s", e.message)
            return
        except Exception:
            log.exception("DNS check failed")
            return
        if message:
            log.warning("%s", message)

    def undo_all(self) -> list[str]:
        """Undo every change of this run, newest first; what could not be undone stays in the journal."""
        journal, self.journal = self.journal, None
        self.dns = None
        if journal is None:
            return []
        try:
            return journal.undo_all()
        except X2sshError as e:
            log.error("%s (run x2ssh --vpn-cleanup)", e.message)
            return []


def serve(sock: socket.socket, helper: PrivilegedHelper) -> None:
    """Answer requests until "down", end of file, or SIGTERM; then undo everything."""
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    for ignored in (signal.SIGINT, signal.SIGHUP):
        signal.signal(ignored, signal.SIG_IGN)
    try:
        while not stopping and not helper.finished:
            try:
                ready, _, _ = select.select([sock], [], [], GUARD_INTERVAL)
            except InterruptedError:
                continue
            if not ready:
                helper.tick()
                continue
            try:
                data, _, flags, _ = sock.recvmsg(proto.MAX_MESSAGE + 1)
            except OSError as e:
                log.debug("socket error: %s", e)
                break
            if not data:
                log.info("x2ssh went away: undoing its changes")
                break
            if flags & socket.MSG_TRUNC or len(data) > proto.MAX_MESSAGE:
                reply: dict[str, Any] = {"ok": False, "error": "request too large", "code": 77}
                fd = None
            else:
                reply, fd = helper.handle(data)
            try:
                _send(sock, reply, fd)
            except OSError as e:
                log.debug("cannot answer: %s", e)
                break
            finally:
                if fd is not None:
                    os.close(fd)
    finally:
        undone = helper.undo_all()
        for item in undone:
            log.debug("undone: %s", item)


def _send(sock: socket.socket, reply: dict[str, Any], fd: int | None) -> None:
    data = proto.encode(reply)
    if fd is None:
        sock.sendmsg([data])
    else:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def main(argv: list[str] | None = None) -> int:
    """`python -m x2ssh.host.helper [--state-dir DIR] [-v]`, standard input being the request socket."""
    parser = argparse.ArgumentParser(prog="x2ssh-helper", description="x2ssh's privileged helper")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="x2ssh helper: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if os.geteuid() != 0:
        print("x2ssh helper: must run as root (x2ssh starts it through sudo)", file=sys.stderr)
        return 77
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        sock = None
    if sock is None or sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        print("x2ssh helper: standard input must be x2ssh's request socket", file=sys.stderr)
        return 64
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # fd 0 again, so nothing reads the socket by accident
    state_dir = args.state_dir
    try:
        if not state_dir.is_absolute():
            raise X2sshError(f"the state directory must be an absolute path: {state_dir}")
        ensure_state_dir(state_dir)  # root's own: a journal nobody else can edit
    except X2sshError as e:
        _send(sock, {"ok": False, "error": e.message, "code": e.exit_code}, None)
        return e.exit_code
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, peer_uid, _ = struct.unpack("3i", creds)
    serve(sock, PrivilegedHelper(state_dir, peer_uid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
