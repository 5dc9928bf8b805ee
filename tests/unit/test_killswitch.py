"""The kill switch and the mark-restoring table: the exact nft rulesets for given inputs, and the order of
checks, journal and nft calls.

nft itself is never run here (a fake runner stands in, and a guard fails any real subprocess call), so these
tests cannot touch the host's firewall even when run as root.
"""

from __future__ import annotations

import subprocess
from ipaddress import ip_network as N
from pathlib import Path

import pytest

from x2ssh.errors import X2sshError
from x2ssh.host.journal import StateJournal, default_undoers
from x2ssh.host.linux import firewall as killswitch
from x2ssh.host.linux.firewall import (
    KILL_SWITCH_RECORD,
    MARK_RESTORE_RECORD,
    FirewallError,
    KillSwitch,
    KillSwitchError,
    KillSwitchUnavailable,
    MarkRestore,
    plan_kill_switch,
    plan_mark_restore,
    undo_killswitch_record,
    undo_mark_restore_record,
)
from x2ssh.host.linux.routes import FWMARK

HEAD = """\
# x2ssh kill switch: generated, replaced as a whole in one transaction
add table inet x2ssh_killswitch
delete table inet x2ssh_killswitch
table inet x2ssh_killswitch {
\tchain output {
\t\ttype filter hook output priority filter; policy drop;
\t\toif "lo" accept
"""
REPLIES = '\t\tct direction reply accept comment "replies to connections opened to this machine"\n'
MARK = '\t\tmeta mark 0x00007832 accept comment "x2ssh connection"\n'
LINK = """\
\t\ticmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept \
comment "neighbour discovery"
\t\ticmpv6 type { mld-listener-report, mld2-listener-report } ip6 hoplimit 1 accept comment "mld"
\t\tmeta nfproto ipv4 udp sport 68 udp dport 67 accept comment "dhcp"
\t\tmeta nfproto ipv6 udp sport 546 udp dport 547 accept comment "dhcpv6"
"""
REJECT = '\t\tcounter reject with icmpx admin-prohibited comment "x2ssh kill switch"\n'
FORWARD = """\
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy drop;
"""
FORWARD_REPLIES = '\t\tct direction reply accept comment "replies to forwarded connections"\n'
END = "\t}\n}\n"
EXCLUDES = (
    '\t\tip daddr 198.18.100.0/24 accept comment "vpn-exclude"\n'
    '\t\tip6 daddr fd78:100::/48 accept comment "vpn-exclude"\n'
)


@pytest.fixture(autouse=True)
def no_real_nft(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to start a real process from the module fails the test instead of touching the host."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a unit test tried to run a real process: {args}")

    monkeypatch.setattr(killswitch.subprocess, "run", refuse)


class FakeNft:
    """Stands in for `nft`: records (args, stdin) and answers from a queue of (returncode, stdout, stderr)."""

    def __init__(self, *answers: tuple[int, str, str]) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.answers = list(answers)

    def __call__(self, args, stdin):
        self.calls.append((list(args), stdin))
        rc, out, err = self.answers.pop(0) if self.answers else (0, "", "")
        return subprocess.CompletedProcess(["nft", *args], rc, out, err)


OK = (0, "", "")


def test_ruleset_with_excludes_and_custom_tun():
    text = plan_kill_switch("vpn.0-x", [N("198.18.100.0/24"), N("fd78:100::/48"), N("198.18.100.0/24")])
    assert text == (
        HEAD
        + '\t\toifname "vpn.0-x" accept\n'
        + REPLIES
        + MARK
        + EXCLUDES
        + LINK
        + REJECT
        + FORWARD
        + '\t\toifname "vpn.0-x" accept\n'
        + FORWARD_REPLIES
        + EXCLUDES
        + REJECT
        + END
    )


def test_ruleset_without_excludes_lets_only_the_tun_and_the_mark_out():
    text = KillSwitch.plan("x2ssh0")
    assert text == (
        HEAD
        + '\t\toifname "x2ssh0" accept\n'
        + REPLIES
        + MARK
        + LINK
        + REJECT
        + FORWARD
        + '\t\toifname "x2ssh0" accept\n'
        + FORWARD_REPLIES
        + REJECT
        + END
    )


def test_ruleset_with_another_mark():
    text = plan_kill_switch("x2ssh0", [], mark=0xCAFE0001)
    assert '\t\tmeta mark 0xcafe0001 accept comment "x2ssh connection"\n' in text
    assert "0x00007832" not in text
    assert text.count("meta mark") == 1  # never in the forward chain: marks do not survive into it


def test_default_mark_is_the_routing_mark():
    assert KillSwitch("x2ssh0").mark == FWMARK == 0x7832


@pytest.mark.parametrize("tun", ["", "x" * 16, 'x2"; flush ruleset', "a b", "tun*"])
def test_ruleset_refuses_interface_names_that_could_inject_or_match_others(tun):
    with pytest.raises(ValueError):
        plan_kill_switch(tun, [])


@pytest.mark.parametrize("mark", [0, -1, 2**32, True, "0x7832", 1.5])
def test_ruleset_refuses_bad_marks(mark):
    with pytest.raises(ValueError, match="firewall mark"):
        plan_kill_switch("x2ssh0", [], mark)


def test_ruleset_refuses_bad_excludes():
    with pytest.raises(ValueError):
        plan_kill_switch("x2ssh0", ["198.18.100.1/24"])


def test_apply_checks_then_journals_then_loads(tmp_path: Path):
    nft = FakeNft(OK, OK)
    journal = StateJournal(tmp_path / "j.journal")
    ks = KillSwitch("x2ssh0", [N("198.18.100.0/24")], runner=nft)
    ks.apply(journal)
    expected = plan_kill_switch("x2ssh0", [N("198.18.100.0/24")])
    assert nft.calls == [(["--check", "-f", "-"], expected), (["-f", "-"], expected)]
    [record] = journal.pending()
    assert record.kind == KILL_SWITCH_RECORD
    assert record.data == {"family": "inet", "table": "x2ssh_killswitch", "tun": "x2ssh0"}
    assert ks.applied


def test_apply_refused_by_the_kernel_changes_nothing(tmp_path: Path):
    nft = FakeNft((1, "", "Error: Could not process rule: Operation not supported\nadd table inet x\n"))
    journal = StateJournal(tmp_path / "j.journal")
    ks = KillSwitch("x2ssh0", runner=nft)
    with pytest.raises(KillSwitchUnavailable, match="Operation not supported") as caught:
        ks.apply(journal)
    assert caught.value.exit_code == 69 and isinstance(caught.value, X2sshError)
    assert [args for args, _ in nft.calls] == [["--check", "-f", "-"]]  # only the check ran
    assert journal.pending() == []
    assert not ks.applied


def test_apply_without_nft_installed_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(killswitch.shutil, "which", lambda name: None)
    monkeypatch.setattr(killswitch, "_NFT_FALLBACKS", (str(tmp_path / "no-nft"),))
    journal = StateJournal(tmp_path / "j.journal")
    with pytest.raises(KillSwitchUnavailable, match="install the `nftables` package"):
        KillSwitch("x2ssh0").apply(journal)
    assert journal.pending() == []


def test_failed_load_after_the_record_keeps_it_for_undo(tmp_path: Path):
    nft = FakeNft(OK, (1, "", "Error: something broke"))
    journal = StateJournal(tmp_path / "j.journal")
    with pytest.raises(KillSwitchError, match="cannot apply the kill switch rules: Error: something broke"):
        KillSwitch("x2ssh0", runner=nft).apply(journal)
    assert [e.kind for e in journal.pending()] == [KILL_SWITCH_RECORD]


LISTED = "table inet filter\ntable inet x2ssh_killswitch\n"
DELETE = "add table inet x2ssh_killswitch\ndelete table inet x2ssh_killswitch\n"


def test_remove_deletes_our_table_only():
    nft = FakeNft((0, LISTED, ""), OK)
    assert KillSwitch("x2ssh0", runner=nft).remove() is True
    assert nft.calls == [(["list", "tables", "inet"], None), (["-f", "-"], DELETE)]


def test_remove_when_already_gone_is_fine():
    nft = FakeNft((0, "table inet filter\ntable inet x2ssh_killswitch_old\n", ""), OK)
    assert KillSwitch("x2ssh0", runner=nft).remove() is False


def test_undo_record_deletes_the_table(monkeypatch: pytest.MonkeyPatch):
    nft = FakeNft((0, LISTED, ""), OK)
    monkeypatch.setattr(killswitch, "run_nft", nft)
    data = {"family": "inet", "table": "x2ssh_killswitch", "tun": "x2ssh0"}
    assert undo_killswitch_record(data) == "removed kill switch table inet x2ssh_killswitch"
    assert nft.calls[1] == (["-f", "-"], DELETE)
    nft.answers = [(0, "", ""), OK]
    assert undo_killswitch_record(data) == "already gone: kill switch table inet x2ssh_killswitch"


@pytest.mark.parametrize(
    "data", [{"family": "inet", "table": "filter"}, {"family": "ip", "table": "x2ssh_killswitch"}]
)
def test_undo_record_refuses_tables_that_are_not_ours(monkeypatch: pytest.MonkeyPatch, data):
    nft = FakeNft()
    monkeypatch.setattr(killswitch, "run_nft", nft)
    with pytest.raises(FirewallError, match="not x2ssh's"):
        undo_killswitch_record(data)
    assert nft.calls == []


def test_undo_record_is_registered_with_the_journal():
    assert default_undoers()[KILL_SWITCH_RECORD] is undo_killswitch_record


# -- the mark-restoring table (policy routing under strict rp_filter) --------------------------------------

MARK_RULESET = """\
# x2ssh: the SSH connection's mark, kept in conntrack and restored on its incoming packets
add table inet x2ssh_mark
delete table inet x2ssh_mark
table inet x2ssh_mark {
\tchain outgoing {
\t\ttype filter hook postrouting priority mangle; policy accept;
\t\tmeta mark 0x00007832 ct mark set meta mark
\t}
\tchain incoming {
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tct mark 0x00007832 meta mark set ct mark
\t}
}
"""


def test_mark_restore_ruleset():
    assert plan_mark_restore() == MARK_RULESET
    assert plan_mark_restore(0x10) == MARK_RULESET.replace("0x00007832", "0x00000010")
    with pytest.raises(ValueError, match="firewall mark"):
        plan_mark_restore(0)


def test_mark_restore_checks_then_journals_then_loads(tmp_path: Path):
    nft = FakeNft(OK, OK)
    journal = StateJournal(tmp_path / "j.journal")
    assert MarkRestore(runner=nft).apply(journal) is True
    assert nft.calls == [(["--check", "-f", "-"], MARK_RULESET), (["-f", "-"], MARK_RULESET)]
    [record] = journal.pending()
    assert (record.kind, record.data) == (MARK_RESTORE_RECORD, {"family": "inet", "table": "x2ssh_mark"})


def test_mark_restore_refused_by_the_kernel_changes_nothing_and_is_not_fatal(tmp_path: Path):
    nft = FakeNft((1, "", "Error: Could not process rule: No such file or directory\n"))
    journal = StateJournal(tmp_path / "j.journal")
    assert MarkRestore(runner=nft).apply(journal) is False
    assert len(nft.calls) == 1 and journal.pending() == []


def test_mark_restore_without_nft_changes_nothing_and_is_not_fatal(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(killswitch.shutil, "which", lambda name: None)
    monkeypatch.setattr(killswitch, "_NFT_FALLBACKS", (str(tmp_path / "no-nft"),))
    journal = StateJournal(tmp_path / "j.journal")
    assert MarkRestore().apply(journal) is False
    assert journal.pending() == []


def test_mark_restore_failed_load_raises_and_keeps_the_record(tmp_path: Path):
    nft = FakeNft(OK, (1, "", "Error: broke"))
    journal = StateJournal(tmp_path / "j.journal")
    with pytest.raises(FirewallError, match="cannot apply the mark-restoring rules: Error: broke"):
        MarkRestore(runner=nft).apply(journal)
    assert [e.kind for e in journal.pending()] == [MARK_RESTORE_RECORD]


def test_mark_restore_undo_record_is_registered_and_deletes_only_our_table(monkeypatch):
    assert default_undoers()[MARK_RESTORE_RECORD] is undo_mark_restore_record
    nft = FakeNft((0, "table inet x2ssh_mark\n", ""), OK)
    monkeypatch.setattr(killswitch, "run_nft", nft)
    assert undo_mark_restore_record({"family": "inet", "table": "x2ssh_mark"}) == (
        "removed mark-restoring table inet x2ssh_mark"
    )
    assert nft.calls[1] == (["-f", "-"], "add table inet x2ssh_mark\ndelete table inet x2ssh_mark\n")
    with pytest.raises(FirewallError, match="not x2ssh's"):
        undo_mark_restore_record({"family": "inet", "table": "filter"})
