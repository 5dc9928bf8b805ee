"""DNS wire format of the out-of-tunnel resolver, checked against scapy's DNS layer."""

from __future__ import annotations

import ipaddress

from scapy.layers.dns import DNS, DNSQR, DNSRR

from x2ssh.ssh.resolve_outside import TYPE_AAAA, build_query, nameservers, parse_answers


def test_query_is_what_scapy_reads() -> None:
    q = DNS(build_query("server.lab.test", TYPE_AAAA, 0x1234))
    assert q.id == 0x1234 and q.rd == 1 and q.qr == 0
    assert q.qd[0].qname == b"server.lab.test." and q.qd[0].qtype == TYPE_AAAA


def test_answers_with_cname_and_both_families() -> None:
    reply = DNS(
        id=7,
        qr=1,
        rd=1,
        ra=1,
        qd=DNSQR(qname="ssh.lab.test", qtype="A"),
        an=[
            DNSRR(rrname="ssh.lab.test", type="CNAME", rdata="server.lab.test"),
            DNSRR(rrname="server.lab.test", type="A", rdata="198.18.0.3"),
            DNSRR(rrname="server.lab.test", type="AAAA", rdata="fd58:3278:7373:1::3"),
        ],
    )
    assert parse_answers(bytes(reply), 7) == [
        ipaddress.ip_address("198.18.0.3"),
        ipaddress.ip_address("fd58:3278:7373:1::3"),
    ]


def test_foreign_failed_and_truncated_replies_give_nothing() -> None:
    ok = DNS(id=9, qr=1, qd=DNSQR(qname="a.test"), an=DNSRR(rrname="a.test", type="A", rdata="198.18.0.9"))
    assert parse_answers(bytes(ok), 8) == []  # another query's answer
    assert parse_answers(bytes(DNS(id=9, qr=1, rcode=3, qd=DNSQR(qname="a.test"))), 9) == []  # NXDOMAIN
    assert parse_answers(bytes(ok)[:-3], 9) == []
    assert parse_answers(b"\x00\x09", 9) == []


def test_nameservers() -> None:
    text = (
        "search lab\nnameserver 198.18.0.1\n# nameserver 198.18.0.9\nnameserver fd58::1%eth0\nnameserver x\n"
    )
    assert nameservers(text) == ["198.18.0.1", "fd58::1"]
