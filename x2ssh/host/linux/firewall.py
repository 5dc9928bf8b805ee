"""The opt-in kill switch (`--vpn-kill-switch`): an nftables table that lets nothing but the tunnel out.

Theory of operation. One table of our own, `inet x2ssh_killswitch`, holds one `output` base chain with
policy drop. It accepts, in order:
  - loopback and the TUN (by name, so the rule survives the TUN being recreated);
  - replies on connections that others opened to this machine (`ct direction reply`): the machine may keep
    answering e.g. an SSH login over the LAN, but cannot start anything itself. Our own outgoing flows are
    always the "original" direction, so they never pass this way;
  - the SSH connection itself: TCP to each bypass address *and port* only. Anything else to the server's
    address would travel outside the tunnel in the clear, which is exactly what a kill switch forbids;
  - every `--vpn-exclude` CIDR, all protocols (the user asked for those to keep their original path);
  - what the link needs to stay up: IPv6 router/neighbour solicitation and neighbour advertisement (hop
    limit 255, link-local by RFC 4861 — without them the gateway's neighbour entry for us expires and an SSH
    connection over IPv6 dies), MLD reports (hop limit 1; switches that snoop multicast would otherwise stop
    forwarding solicited-node multicast to us), and DHCP/DHCPv6 client-to-server traffic (a lost lease kills
    the link). Sending from ports 68/546 needs root, so no ordinary program can use these holes.
Everything else gets an ICMP "administratively prohibited", so programs fail at once instead of hanging;
the chain's policy drop is the net under that. ARP is not IP, so the `inet` family never sees it.

A drop in any base chain is final in nftables, so other firewalls' accept rules cannot open a hole in ours.

The table is created and later replaced as one `nft -f` transaction (`add table`, `delete table`, then the
full definition): the kernel swaps the whole ruleset atomically, so there is never an instant without the
rules, also when the server's address changes on reconnect. It is journaled before it is created; undoing
the record deletes the table if it still exists.
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
from x2ssh.settings import IPAddress, IPNetwork

if TYPE_CHECKING:
    from x2ssh.host.journal import StateJournal

log = logging.getLogger(__name__)

KILL_SWITCH_RECORD = "killswitch"
TABLE_FAMILY = "inet"
TABLE_NAME = "x2ssh_killswitch"
NFT_TIMEOUT = 30.0
_NFT_FALLBACKS = ("/usr/sbin/nft", "/sbin/nft")  # PATH under sudo/systemd may lack sbin
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_OUR_TABLE = re.compile(r"x2ssh[A-Za-z0-9_]{0,40}")

Bypass = tuple[IPAddress, int]
"""An (address, TCP port) the SSH connection itself goes to: the server or the first ProxyJump hop."""

NftRunner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]
"""Runs nft with these arguments and optional stdin; returns the finished process (never raises on rc)."""


class KillSwitchError(X2sshError):
    """The kill switch's firewall rules could not be applied, replaced or removed."""

    exit_code = 71  # EX_OSERR


class KillSwitchUnavailable(KillSwitchError):
    """This machine cannot run the kill switch: no `nft` program or no nf_tables support in the kernel."""

    exit_code = 69  # EX_UNAVAILABLE


def plan_kill_switch(tun: str, bypass: Sequence[Bypass], excludes: Sequence[IPNetwork]) -> str:
    """The exact nft transaction that (re)creates the kill switch table. Pure; validates its inputs."""
    if not _IFNAME.fullmatch(tun):
        raise ValueError(f"not a valid interface name: {tun!r}")
    rules = [
        'oif "lo" accept',
        f'oifname "{tun}" accept',
        'ct direction reply accept comment "replies to connections opened to this machine"',
    ]
    for addr, port in bypass:
        addr = ipaddress.ip_address(addr)
        if not 0 < port < 65536:
            raise ValueError(f"not a TCP port: {port!r}")
        rules.append(f'{_family(addr)} daddr {addr} tcp dport {port} accept comment "ssh connection"')
    for net in excludes:
        net = ipaddress.ip_network(net)
        rules.append(f'{_family(net)} daddr {net} accept comment "vpn-exclude"')
    rules += [
        "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept"
        ' comment "neighbour discovery"',
        'icmpv6 type { mld-listener-report, mld2-listener-report } ip6 hoplimit 1 accept comment "mld"',
        'meta nfproto ipv4 udp sport 68 udp dport 67 accept comment "dhcp"',
        'meta nfproto ipv6 udp sport 546 udp dport 547 accept comment "dhcpv6"',
        'counter reject with icmpx admin-prohibited comment "x2ssh kill switch"',
    ]
    body = "".join(f"\t\t{rule}\n" for rule in rules)
    table = f"{TABLE_FAMILY} {TABLE_NAME}"
    return (
        "# x2ssh kill switch: generated, replaced as a whole in one transaction\n"
        f"add table {table}\n"
        f"delete table {table}\n"
        f"table {table} {{\n"
        "\tchain output {\n"
        "\t\ttype filter hook output priority filter; policy drop;\n"
        f"{body}"
        "\t}\n"
        "}\n"
    )


class KillSwitch:
    """The kill switch of one VPN run: `check()` (optional, changes nothing), `apply()`, `update()`,
    `remove()`. Runs `nft` in the current network namespace; blocking, so call it via asyncio.to_thread."""

    plan = staticmethod(plan_kill_switch)

    def __init__(
        self,
        tun: str,
        bypass: Sequence[Bypass],
        excludes: Sequence[IPNetwork] = (),
        *,
        runner: NftRunner | None = None,
    ) -> None:
        self.tun = tun
        self.bypass: tuple[Bypass, ...] = tuple(bypass)
        self.excludes: tuple[IPNetwork, ...] = tuple(excludes)
        self._run = runner or run_nft
        self.applied = False

    def ruleset(self) -> str:
        """The nft transaction for the current TUN, bypass and exclusions."""
        return plan_kill_switch(self.tun, self.bypass, self.excludes)

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
            "kill switch on: only %s, the SSH connection (%s) and %d excluded networks may leave",
            self.tun,
            ", ".join(_endpoint(b) for b in self.bypass) or "none",
            len(self.excludes),
        )

    def update(self, bypass: Sequence[Bypass]) -> None:
        """Let the SSH connection go to `bypass` instead (e.g. the server's address changed): replaces the
        whole table in one transaction. On failure the old rules stay and KillSwitchError is raised."""
        new = KillSwitch(self.tun, bypass, self.excludes, runner=self._run)
        self._load(new.ruleset(), "update")
        self.bypass = new.bypass
        log.info("kill switch now lets the SSH connection go to %s", ", ".join(map(_endpoint, self.bypass)))

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


def undo_killswitch_record(data: dict[str, Any]) -> str:
    """Undo a journal kill switch record: delete the table it names if it still exists."""
    family = str(data.get("family", TABLE_FAMILY))
    table = str(data.get("table", TABLE_NAME))
    if family != TABLE_FAMILY or not _OUR_TABLE.fullmatch(table):
        # never delete a table on the word of a journal line that does not look like ours
        raise KillSwitchError(f"journal names a table that is not x2ssh's: {family} {table}")
    removed = delete_table(family, table, run_nft)
    return f"{'removed' if removed else 'already gone:'} kill switch table {family} {table}"


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


def _endpoint(bypass: Bypass) -> str:
    addr, port = bypass
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
