"""Point the machine's DNS at the tunnel, and put it back exactly as it was.

Two backends behind `DnsConfigurator`:
- systemd-resolved (when /etc/resolv.conf points into /run/systemd/resolve and `resolvectl` exists): the TUN
  link gets our server, the routing domain `~.` and the default route, so every query goes through it;
  `resolvectl revert` undoes it (and resolved forgets the link anyway when the TUN disappears).
- resolv.conf: the exact original bytes (and whether the path was a symlink) go into the journal, then our
  content is written IN PLACE through the path. Never rename over it: inside `ip netns exec` the file is a
  bind mount of /etc/netns/NAME/resolv.conf, and a rename would replace the mount point, not the file.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from x2ssh.errors import DnsError
from x2ssh.host.linux.tun import DNS_V4
from x2ssh.settings import DnsSetting, IPAddress

if TYPE_CHECKING:
    from x2ssh.host.journal import StateJournal

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_DIR = "/run/systemd/resolve/"
RESOLV_CONF_RECORD = "resolv_conf"
RESOLVED_RECORD = "resolved_link"
HEADER = (
    b"# Written by x2ssh while its VPN is up. The original is restored when x2ssh exits\n"
    b"# (after a crash: x2ssh --vpn-cleanup).\n"
)
_KEPT_DIRECTIVES = (b"search", b"domain", b"options")  # local search domains stay useful through the VPN

Backend = Literal["resolved", "resolv.conf"]
Runner = Callable[[list[str]], subprocess.CompletedProcess]


def resolver_addresses(setting: DnsSetting) -> list[IPAddress]:
    """The DNS servers to configure for a `--vpn-dns` setting: `remote` → the tunnel's own DNS address
    (answered by the session), an address → that server (reached through the tunnel), `off` → none."""
    if setting == "off":
        return []
    if setting == "remote":
        return [DNS_V4]
    return [setting]


def detect_backend(
    resolv_conf: Path = RESOLV_CONF, which: Callable[[str], str | None] = shutil.which
) -> Backend:
    """systemd-resolved if resolv.conf is its file and resolvectl is installed, else resolv.conf."""
    if os.path.realpath(resolv_conf).startswith(RESOLVED_DIR) and which("resolvectl"):
        return "resolved"
    return "resolv.conf"


def run_command(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a helper command (resolvectl) with a bounded wait; output captured for error messages."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)


class DnsConfigurator:
    """Applies and restores the DNS settings for TUN `tun`; every change is journaled first."""

    def __init__(
        self,
        tun: str,
        *,
        resolv_conf: Path = RESOLV_CONF,
        backend: Backend | None = None,
        run: Runner = run_command,
    ) -> None:
        self.tun = tun
        self.resolv_conf = Path(resolv_conf)
        self.backend: Backend = backend or detect_backend(self.resolv_conf)
        self._run = run
        self._applied: tuple[str, dict[str, Any]] | None = None

    def apply(self, servers: Sequence[IPAddress], journal: StateJournal) -> None:
        """Send all DNS to `servers`. An empty list (`--vpn-dns off`) changes nothing. Raises DnsError."""
        if not servers:
            log.info("DNS left alone (--vpn-dns off)")
            return
        if self._applied is not None:
            raise DnsError("DNS settings are already applied")
        if self.backend == "resolved":
            data: dict[str, Any] = {"link": self.tun}
            journal.record(RESOLVED_RECORD, **data)
            self._applied = (RESOLVED_RECORD, data)
            self._apply_resolved(servers)
        else:
            data = _snapshot(self.resolv_conf)
            journal.record(RESOLV_CONF_RECORD, **data)
            self._applied = (RESOLV_CONF_RECORD, data)
            original = base64.b64decode(data["original"]) if data["original"] is not None else b""
            _write_in_place(self.resolv_conf, render_resolv_conf(servers, original))
        log.info("DNS through the tunnel: %s (%s)", ", ".join(map(str, servers)), self.backend)

    def restore(self) -> None:
        """Undo what `apply` did (idempotent)."""
        if self._applied is None:
            return
        kind, data = self._applied
        if kind == RESOLVED_RECORD:
            log.info(undo_resolved_record(data, run=self._run))
        else:
            log.info(undo_resolv_conf_record(data))
        self._applied = None

    def _apply_resolved(self, servers: Sequence[IPAddress]) -> None:
        commands = [
            ["resolvectl", "dns", self.tun, *map(str, servers)],
            ["resolvectl", "domain", self.tun, "~."],
            ["resolvectl", "default-route", self.tun, "yes"],
        ]
        for argv in commands:
            result = self._run(argv)
            if result.returncode != 0:
                raise DnsError(
                    f"{' '.join(argv)} failed: {(result.stderr or '').strip() or result.returncode}"
                )


def render_resolv_conf(servers: Sequence[IPAddress], original: bytes) -> bytes:
    """Our resolv.conf: a header, one nameserver line per server, and the original search/options lines."""
    kept = [
        line
        for line in original.splitlines()
        if line.split(maxsplit=1)[:1] and line.split(maxsplit=1)[0] in _KEPT_DIRECTIVES
    ]
    lines = [f"nameserver {s}".encode() for s in servers] + kept
    return HEADER + b"\n".join(lines) + b"\n"


def undo_resolv_conf_record(data: dict[str, Any]) -> str:
    """Restore resolv.conf byte-exact from a journal record (in place; a vanished symlink is recreated)."""
    path = Path(data["path"])
    if data["original"] is None:  # there was no file: remove ours, if it is still ours
        try:
            if path.read_bytes().startswith(HEADER):
                path.unlink()
                return f"removed {path} (there was none before)"
        except FileNotFoundError:
            pass
        return f"left alone: {path} (not ours)"
    original = base64.b64decode(data["original"])
    target = data.get("symlink")
    if target is not None and not os.path.lexists(path):
        os.symlink(target, path)
    try:
        _write_in_place(path, original, mode=data.get("mode"))
    except OSError as e:
        raise DnsError(f"cannot restore {path}: {e.strerror}") from e
    return f"restored {path}"


def undo_resolved_record(data: dict[str, Any], run: Runner = run_command) -> str:
    """Revert systemd-resolved's settings of the TUN link, unless the link is gone (resolved forgot it)."""
    link = data["link"]
    try:
        socket.if_nametoindex(link)
    except OSError:
        return f"already gone: resolved settings of {link} (link removed)"
    result = run(["resolvectl", "revert", link])
    if result.returncode != 0:
        raise DnsError(
            f"resolvectl revert {link} failed: {(result.stderr or '').strip() or result.returncode}"
        )
    return f"reverted resolved settings of {link}"


def _snapshot(path: Path) -> dict[str, Any]:
    target = os.readlink(path) if path.is_symlink() else None
    try:
        original: bytes | None = path.read_bytes()
        mode: int | None = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        if target is not None:
            raise DnsError(f"{path} is a dangling symlink to {target}: fix it or use --vpn-dns off") from None
        original, mode = None, None
    except OSError as e:
        raise DnsError(f"cannot read {path}: {e.strerror}") from e
    return {
        "path": str(path),
        "original": base64.b64encode(original).decode() if original is not None else None,
        "symlink": target,
        "mode": mode,
    }


def _write_in_place(path: Path, data: bytes, mode: int | None = None) -> None:
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644 if mode is None else mode
        )
    except OSError as e:
        raise DnsError(f"cannot write {path}: {e.strerror}") from e
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
