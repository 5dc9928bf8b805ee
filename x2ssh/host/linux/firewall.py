"""The opt-in kill switch (`--vpn-kill-switch`): an nftables table that lets nothing but the tunnel out.

Theory of operation. One table of our own, `inet x2ssh_killswitch`, with two base chains, policy drop.

`output` (what this machine sends) accepts, in order:
  - loopback and the TUN (by name, so the rule survives the TUN being recreated);
  - replies on connections that others opened to this machine (`ct direction reply`): the machine may keep
    answering e.g. an SSH login over the LAN, but cannot start anything itself. Our own outgoing flows are
    always the "original" direction, so they never pass this way;
  - the x2ssh connection itself, by its firewall mark (`meta mark`, FWMARK from the routing module): the
    SSH TCP connection, its ProxyJump first hop, and the UDP sockets that resolve the server's name through
    the original resolvers. Only root can set SO_MARK, and only x2ssh's privileged helper hands out marked
    sockets, so no other program's traffic to the server's address gets out in the clear. Matching the mark
    instead of the destination also keeps the rules valid when the server's address or the uplink changes;
  - every `--vpn-exclude` CIDR, all protocols (the user asked for those to keep their original path);
  - what the link needs to stay up: IPv6 router/neighbour solicitation and neighbour advertisement (hop
    limit 255, link-local by RFC 4861 — without them the gateway's neighbour entry for us expires and an SSH
    connection over IPv6 dies), MLD reports (hop limit 1; switches that snoop multicast would otherwise stop
    forwarding solicited-node multicast to us), and DHCP/DHCPv6 client-to-server traffic (a lost lease kills
    the link). Sending from ports 68/546 needs root, so no ordinary program can use these holes.

`forward` (what this machine routes for containers and VMs behind it) accepts only traffic that leaves
through the TUN, replies (`ct direction reply`: the answers coming back to them) and the excluded CIDRs. A
mark is never accepted here: marks do not survive the way from another network namespace or a VM.

Everything else gets an ICMP "administratively prohibited", so programs fail at once instead of hanging;
each chain's policy drop is the net under that. ARP is not IP, so the `inet` family never sees it.

A drop in any base chain is final in nftables, so other firewalls' accept rules cannot open a hole in ours.

A second, small table, `inet x2ssh_mark` (`MarkRestore`, used with policy routing whether or not the kill
switch is on), copies the SSH connection's mark into its conntrack entry on the way out and back onto its
incoming packets, as wg-quick does. With net.ipv4.conf.all.src_valid_mark=1 the kernel's reverse-path
filter then checks those packets against the main table (where the uplink is) instead of the tunnel table;
under strict rp_filter (=1) they would otherwise be dropped as arriving on the "wrong" interface.

Each table is created and later replaced as one `nft -f` transaction (`add table`, `delete table`, then the
full definition): the kernel swaps the whole ruleset atomically, so there is never an instant without the
rules. It is journaled before it is created; undoing the record deletes the table if it still exists.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from x2ssh.errors import X2sshError
from x2ssh.host.linux.routes import FWMARK
from x2ssh.settings import IPAddress, IPNetwork

if TYPE_CHECKING:
    from x2ssh.host.journal import StateJournal

log = logging.getLogger(__name__)

KILL_SWITCH_RECORD = "killswitch"
MARK_RESTORE_RECORD = "mark_restore"
TABLE_FAMILY = "inet"
TABLE_NAME = "x2ssh_killswitch"
MARK_TABLE_NAME = "x2ssh_mark"
NFT_TIMEOUT = 30.0
_NFT_FALLBACKS = ("/usr/sbin/nft", "/sbin/nft")  # PATH under sudo/systemd may lack sbin
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_OUR_TABLE = re.compile(r"x2ssh[A-Za-z0-9_]{0,40}")

NftRunner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]
"""Runs nft with these arguments and optional stdin; returns the finished process (never raises on rc)."""


class FirewallError(X2sshError):
    """x2ssh's nftables rules could not be applied or removed."""

    exit_code = 71  # EX_OSERR


class KillSwitchError(FirewallError):
    """The kill switch's firewall rules could not be applied, replaced or removed."""


class KillSwitchUnavailable(KillSwitchError):
    """This machine cannot run the kill switch: no `nft` program or no nf_tables support in the kernel."""

    exit_code = 69  # EX_UNAVAILABLE


def plan_kill_switch(tun: str, excludes: Sequence[IPNetwork] = (), mark: int = FWMARK) -> str:
    """The exact nft transaction that (re)creates the kill switch table. Pure; validates its inputs."""
    if not _IFNAME.fullmatch(tun):
        raise ValueError(f"not a valid interface name: {tun!r}")
    _check_mark(mark)
    excluded = [
        f'{_family(net)} daddr {net} accept comment "vpn-exclude"'
        for net in dict.fromkeys(ipaddress.ip_network(n) for n in excludes)
    ]
    reject = 'counter reject with icmpx admin-prohibited comment "x2ssh kill switch"'
    output = [
        'oif "lo" accept',
        f'oifname "{tun}" accept',
        'ct direction reply accept comment "replies to connections opened to this machine"',
        f'meta mark 0x{mark:08x} accept comment "x2ssh connection"',
        *excluded,
        "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept"
        ' comment "neighbour discovery"',
        'icmpv6 type { mld-listener-report, mld2-listener-report } ip6 hoplimit 1 accept comment "mld"',
        'meta nfproto ipv4 udp sport 68 udp dport 67 accept comment "dhcp"',
        'meta nfproto ipv6 udp sport 546 udp dport 547 accept comment "dhcpv6"',
        reject,
    ]
    forward = [
        f'oifname "{tun}" accept',
        'ct direction reply accept comment "replies to forwarded connections"',
        *excluded,
        reject,
    ]
    table = f"{TABLE_FAMILY} {TABLE_NAME}"
    return (
        "# x2ssh kill switch: generated, replaced as a whole in one transaction\n"
        f"add table {table}\n"
        f"delete table {table}\n"
        f"table {table} {{\n"
        + _chain("output", "type filter hook output priority filter; policy drop;", output)
        + _chain("forward", "type filter hook forward priority filter; policy drop;", forward)
        + "}\n"
    )


def plan_mark_restore(mark: int = FWMARK) -> str:
    """The exact nft transaction that (re)creates the mark-restoring table. Pure; validates the mark."""
    _check_mark(mark)
    table = f"{TABLE_FAMILY} {MARK_TABLE_NAME}"
    return (
        "# x2ssh: the SSH connection's mark, kept in conntrack and restored on its incoming packets\n"
        f"add table {table}\n"
        f"delete table {table}\n"
        f"table {table} {{\n"
        + _chain(
            "outgoing",
            "type filter hook postrouting priority mangle; policy accept;",
            [f"meta mark 0x{mark:08x} ct mark set meta mark"],
        )
        + _chain(
            "incoming",
            "type filter hook prerouting priority mangle; policy accept;",
            [f"ct mark 0x{mark:08x} meta mark set ct mark"],
        )
        + "}\n"
    )


def _check_mark(mark: int) -> None:
    if isinstance(mark, bool) or not isinstance(mark, int) or not 0 < mark <= 0xFFFFFFFF:
        raise ValueError(f"not a firewall mark: {mark!r}")


def _chain(name: str, hook: str, rules: list[str]) -> str:
    body = "".join(f"\t\t{rule}\n" for rule in rules)
    return f"\tchain {name} {{\n\t\t{hook}\n{body}\t}}\n"


class KillSwitch:
    """The kill switch of one VPN run: `check()` (optional, changes nothing), `apply()`, `remove()`. Runs
    `nft` in the current network namespace; blocking, so call it via asyncio.to_thread."""

    plan = staticmethod(plan_kill_switch)

    def __init__(
        self,
        tun: str,
        excludes: Sequence[IPNetwork] = (),
        *,
        mark: int = FWMARK,
        runner: NftRunner | None = None,
    ) -> None:
        self.tun = tun
        self.excludes: tuple[IPNetwork, ...] = tuple(excludes)
        self.mark = mark
        self._run = runner or run_nft
        self.applied = False

    def ruleset(self) -> str:
        """The nft transaction for this TUN, mark and exclusions."""
        return plan_kill_switch(self.tun, self.excludes, self.mark)

    def check(self) -> None:
        """Raise KillSwitchUnavailable unless nft and the kernel accept our ruleset. Changes nothing."""
        ruleset = self.ruleset()
        done = _call(self._run, ["--check", "-f", "-"], ruleset)
        if done.returncode != 0:
            raise KillSwitchUnavailable(
                "the kernel refused the kill switch rules (does it have nf_tables, nft_reject and "
                f"conntrack?): {_first_error(done)}"
            )

    def apply(self, journal: StateJournal) -> None:
        """Check, journal, then create the table. Raises KillSwitchUnavailable before any change if this
        machine cannot do it, KillSwitchError if nft fails afterwards (the record stays for undo)."""
        self.check()
        journal.record(KILL_SWITCH_RECORD, family=TABLE_FAMILY, table=TABLE_NAME, tun=self.tun)
        self._load(self.ruleset(), "apply")
        self.applied = True
        log.info(
            "kill switch on: only %s, traffic marked 0x%x (the SSH connection) and %d excluded networks may "
            "leave; forwarded traffic only through %s",
            self.tun,
            self.mark,
            len(self.excludes),
            self.tun,
        )

    def remove(self) -> bool:
        """Delete our table; True if it was there. The journal record may stay: undoing it is harmless."""
        removed = delete_table(TABLE_FAMILY, TABLE_NAME, self._run)
        self.applied = False
        log.info("kill switch off")
        return removed

    def _load(self, ruleset: str, what: str) -> None:
        done = _call(self._run, ["-f", "-"], ruleset)
        if done.returncode != 0:
            raise KillSwitchError(f"cannot {what} the kill switch rules: {_first_error(done)}")


class MarkRestore:
    """The mark-restoring table of one VPN run with policy routing: `apply()`, `remove()`. Runs `nft` in the
    current network namespace; blocking, so call it via asyncio.to_thread."""

    def __init__(self, mark: int = FWMARK, *, runner: NftRunner | None = None) -> None:
        self.mark = mark
        self._run = runner or run_nft
        self.applied = False

    def ruleset(self) -> str:
        """The nft transaction for this mark."""
        return plan_mark_restore(self.mark)

    def apply(self, journal: StateJournal) -> bool:
        """Check, journal, then create the table; True if it is in place.

        Returns False, having changed nothing, if this machine has no nft or the kernel refuses the rules
        (no nf_tables or conntrack): policy routing still works then, unless an uplink filters reverse paths
        strictly (rp_filter=1). Raises FirewallError if nft fails after the check (the record stays).
        """
        ruleset = self.ruleset()
        try:
            checked = _call(self._run, ["--check", "-f", "-"], ruleset)
        except KillSwitchUnavailable as e:
            log.warning(
                "cannot keep the SSH connection's mark on its replies (%s): strict rp_filter breaks it", e
            )
            return False
        if checked.returncode != 0:
            log.warning(
                "the kernel refused the mark-restoring rules (%s): strict rp_filter would drop the SSH "
                "connection's replies",
                _first_error(checked),
            )
            return False
        journal.record(MARK_RESTORE_RECORD, family=TABLE_FAMILY, table=MARK_TABLE_NAME)
        done = _call(self._run, ["-f", "-"], ruleset)
        if done.returncode != 0:
            raise FirewallError(f"cannot apply the mark-restoring rules: {_first_error(done)}")
        self.applied = True
        log.debug("mark 0x%x kept in conntrack and restored on incoming packets", self.mark)
        return True

    def remove(self) -> bool:
        """Delete our table; True if it was there."""
        removed = delete_table(TABLE_FAMILY, MARK_TABLE_NAME, self._run)
        self.applied = False
        return removed


def undo_killswitch_record(data: dict[str, Any]) -> str:
    """Undo a journal kill switch record: delete the table it names if it still exists."""
    return _undo_table(data, TABLE_NAME, "kill switch table")


def undo_mark_restore_record(data: dict[str, Any]) -> str:
    """Undo a journal mark-restore record: delete the table it names if it still exists."""
    return _undo_table(data, MARK_TABLE_NAME, "mark-restoring table")


def _undo_table(data: dict[str, Any], default: str, what: str) -> str:
    family = str(data.get("family", TABLE_FAMILY))
    table = str(data.get("table", default))
    if family != TABLE_FAMILY or not _OUR_TABLE.fullmatch(table):
        # never delete a table on the word of a journal line that does not look like ours
        raise FirewallError(f"journal names a table that is not x2ssh's: {family} {table}")
    removed = delete_table(family, table, run_nft)
    return f"{'removed' if removed else 'already gone:'} {what} {family} {table}"


def delete_table(family: str, table: str, runner: NftRunner) -> bool:
    """Delete nft table `family table` if it exists; True if it did. Tolerates it being gone."""
    listed = _call(runner, ["list", "tables", family], None)
    if listed.returncode != 0:
        raise KillSwitchError(f"cannot list nft tables: {_first_error(listed)}")
    existed = f"table {family} {table}" in listed.stdout.splitlines()
    # `add` then `delete` in one transaction succeeds whether or not it exists (nft 1.0.6 has no `destroy`)
    done = _call(runner, ["-f", "-"], f"add table {family} {table}\ndelete table {family} {table}\n")
    if done.returncode != 0:
        raise KillSwitchError(f"cannot delete nft table {family} {table}: {_first_error(done)}")
    return existed


def nft_path() -> str:
    """Where the nft program is; raises KillSwitchUnavailable if it is not installed."""
    found = shutil.which("nft")
    if found:
        return found
    for path in _NFT_FALLBACKS:
        if os.access(path, os.X_OK):
            return path
    raise KillSwitchUnavailable("--vpn-kill-switch needs nftables: install the `nftables` package")


def run_nft(args: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    """Run nft (no shell) in the current network namespace, bounded by NFT_TIMEOUT."""
    argv = [nft_path(), *args]
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=NFT_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise KillSwitchError(f"nft did not finish within {NFT_TIMEOUT:g} s") from e
    except OSError as e:
        raise KillSwitchUnavailable(f"cannot run {argv[0]}: {e.strerror}") from e


def _call(runner: NftRunner, args: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    log.debug("nft %s", " ".join(args))
    return runner(args, stdin)


def _first_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    return (errors or lines or [f"nft exited with status {done.returncode}"])[0]


def _family(target: IPAddress | IPNetwork) -> str:
    return "ip6" if target.version == 6 else "ip"
