"""Small pieces shared by the host-layer namespace tests that build their own namespaces (not the lab)."""

from __future__ import annotations

import json
import subprocess


def run(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
    """A command with its output captured, bounded to 60 s; raises on failure unless `check` is false."""
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60, input=stdin)


def veth(client: str, peer: str, client_dev: str, peer_dev: str, net: int) -> None:
    """A veth pair between two namespaces: 198.18.NET.2/24 and fd78:NETNET::2/64 on the client's side,
    .1 and ::1 on the peer's, both up."""
    run("ip", "-n", client, "link", "add", client_dev, "type", "veth",
        "peer", "name", peer_dev, "netns", peer)  # fmt: skip
    for ns, dev, last in ((client, client_dev, 2), (peer, peer_dev, 1)):
        run("ip", "-n", ns, "addr", "add", f"198.18.{net}.{last}/24", "dev", dev)
        run("ip", "-n", ns, "-6", "addr", "add", f"fd78:{net}{net}::{last}/64", "dev", dev, "nodad")
        run("ip", "-n", ns, "link", "set", dev, "up")


def json_reports(stdout: str) -> list[dict]:
    """The JSON objects a scenario script printed, one per line (other lines ignored)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
