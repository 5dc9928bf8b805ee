"""DNS apply/restore on temp files (byte-exact, in place, symlinks) and the systemd-resolved commands."""

import os
import subprocess
from ipaddress import ip_address
from pathlib import Path

import pytest

from x2ssh.errors import DnsError
from x2ssh.host.api import DNS_V4
from x2ssh.host.journal import StateJournal
from x2ssh.host.linux.dns import (
    HEADER,
    RESOLV_CONF_RECORD,
    DnsConfigurator,
    detect_backend,
    render_resolv_conf,
    resolver_addresses,
)

ORIGINAL = (
    b"# managed by someone\r\nnameserver 198.18.0.53\nsearch lab.example\noptions edns0 trust-ad\n\xff tail"
)


@pytest.fixture
def journal(tmp_path):
    j = StateJournal(tmp_path / "state" / "x2ssh0.journal")
    yield j
    j.close()


def test_resolver_addresses():
    assert resolver_addresses("remote") == [DNS_V4]
    assert resolver_addresses("off") == []
    assert resolver_addresses(ip_address("198.18.0.53")) == [ip_address("198.18.0.53")]


def test_render_keeps_search_and_options_only():
    text = render_resolv_conf([ip_address("100.100.83.53"), ip_address("fd00::53")], ORIGINAL)
    assert text.startswith(
        HEADER
        + b"nameserver 100.100.83.53\nnameserver fd00::53\nsearch lab.example\noptions edns0 trust-ad\n"
        + b"# x2ssh-original-sha256: "
    )
    rest = text.split(b"\n")[7:]
    assert rest[-1] == b"" and all(line.startswith(b"# x2ssh-original: ") for line in rest[:-1])


def test_apply_then_restore_is_byte_exact_and_in_place(tmp_path, journal):
    path = tmp_path / "resolv.conf"
    path.write_bytes(ORIGINAL)
    path.chmod(0o640)
    inode = path.stat().st_ino
    dns = DnsConfigurator("x2ssh0", resolv_conf=path)
    assert dns.backend == "resolv.conf"

    dns.apply([DNS_V4], journal)
    assert path.read_bytes().startswith(HEADER)
    assert b"nameserver 100.100.83.53\n" in path.read_bytes()
    assert b"198.18.0.53" not in path.read_bytes()
    assert path.stat().st_ino == inode, "resolv.conf must be rewritten in place, never renamed over"
    assert [e.kind for e in journal.entries] == ["owner", RESOLV_CONF_RECORD]

    dns.restore()
    assert path.read_bytes() == ORIGINAL
    assert path.stat().st_ino == inode
    assert path.stat().st_mode & 0o777 == 0o640
    dns.restore()  # idempotent
    assert path.read_bytes() == ORIGINAL


def test_symlinked_resolv_conf_stays_a_symlink(tmp_path, journal):
    target = tmp_path / "run" / "resolv.conf"
    target.parent.mkdir()
    target.write_bytes(ORIGINAL)
    link = tmp_path / "resolv.conf"
    link.symlink_to(target)
    dns = DnsConfigurator("x2ssh0", resolv_conf=link)

    dns.apply([DNS_V4], journal)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes().startswith(HEADER)
    assert journal.entries[-1].data["symlink"] == str(target)

    dns.restore()
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == ORIGINAL


def test_crash_recovery_from_the_journal_recreates_a_removed_symlink(tmp_path):
    target = tmp_path / "resolv.conf.real"
    target.write_bytes(ORIGINAL)
    link = tmp_path / "resolv.conf"
    link.symlink_to(target)
    path = tmp_path / "x2ssh0.journal"
    DnsConfigurator("x2ssh0", resolv_conf=link).apply([DNS_V4], StateJournal(path))
    link.unlink()  # something removed the link while we ran

    done = StateJournal.load(path).undo_all()
    assert done == [f"restored {link}"]
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == ORIGINAL
    assert not path.exists()


def test_missing_resolv_conf_is_removed_again(tmp_path, journal):
    path = tmp_path / "resolv.conf"
    dns = DnsConfigurator("x2ssh0", resolv_conf=path)
    dns.apply([DNS_V4], journal)
    assert path.read_bytes().startswith(HEADER)
    dns.restore()
    assert not path.exists()


def test_dangling_symlink_is_refused_without_changes(tmp_path, journal):
    link = tmp_path / "resolv.conf"
    link.symlink_to(tmp_path / "absent")
    with pytest.raises(DnsError, match="dangling symlink"):
        DnsConfigurator("x2ssh0", resolv_conf=link).apply([DNS_V4], journal)
    assert not (tmp_path / "absent").exists()
    assert [e.kind for e in journal.entries] == ["owner"]


def test_off_touches_nothing(tmp_path, journal):
    path = tmp_path / "resolv.conf"
    path.write_bytes(ORIGINAL)
    before = path.stat()
    dns = DnsConfigurator("x2ssh0", resolv_conf=path)
    dns.apply(resolver_addresses("off"), journal)
    dns.restore()
    assert path.read_bytes() == ORIGINAL
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert [e.kind for e in journal.entries] == ["owner"]


class FakeResolvectl:
    def __init__(self, fail_on: str | None = None):
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, argv):
        self.calls.append(argv)
        code = 1 if self.fail_on and self.fail_on in argv else 0
        return subprocess.CompletedProcess(argv, code, "", "Failed to set DNS" if code else "")


def test_resolved_backend_commands_and_revert(tmp_path, journal):
    run = FakeResolvectl()
    # "lo" exists in every namespace, standing in for a TUN that is still up at restore time
    dns = DnsConfigurator("lo", resolv_conf=tmp_path / "unused", backend="resolved", run=run)
    dns.apply([DNS_V4], journal)
    assert run.calls == [
        ["resolvectl", "dns", "lo", "100.100.83.53"],
        ["resolvectl", "domain", "lo", "~."],
        ["resolvectl", "default-route", "lo", "yes"],
    ]
    assert journal.entries[-1].kind == "resolved_link"
    dns.restore()
    assert run.calls[-1] == ["resolvectl", "revert", "lo"]


def test_resolved_revert_skipped_when_the_link_is_gone(tmp_path, journal):
    run = FakeResolvectl()
    dns = DnsConfigurator("x2h-no-such0", resolv_conf=tmp_path / "unused", backend="resolved", run=run)
    dns.apply([DNS_V4], journal)
    dns.restore()
    assert ["resolvectl", "revert", "x2h-no-such0"] not in run.calls


def test_resolved_failure_is_a_dns_error(tmp_path, journal):
    dns = DnsConfigurator("lo", resolv_conf=tmp_path / "unused", backend="resolved", run=FakeResolvectl("~."))
    with pytest.raises(DnsError, match="Failed to set DNS"):
        dns.apply([DNS_V4], journal)


def test_detect_backend(tmp_path):
    stub = tmp_path / "stub"
    stub.symlink_to("/run/systemd/resolve/stub-resolv.conf")  # may dangle: only the target path matters
    plain = tmp_path / "plain"
    plain.write_text("nameserver 198.18.0.53\n")
    assert detect_backend(stub, which=lambda name: "/usr/bin/resolvectl") == "resolved"
    assert detect_backend(stub, which=lambda name: None) == "resolv.conf"
    assert detect_backend(plain, which=lambda name: "/usr/bin/resolvectl") == "resolv.conf"
    assert detect_backend(Path(tmp_path / "absent"), which=lambda name: "/x") == "resolv.conf"
