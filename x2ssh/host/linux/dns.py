"""Point the machine's DNS at the tunnel, and put it back exactly as it was.

Three backends behind `DnsConfigurator`, best first (`detect_backend`):
- systemd-resolved (when /etc/resolv.conf points into /run/systemd/resolve and `resolvectl` exists): the TUN
  link gets our server, the routing domain `~.` and the default route, so every query goes through it;
  `resolvectl revert` undoes it, and resolved forgets the link anyway when the TUN disappears.
- resolvconf, when it is openresolv and manages /etc/resolv.conf: `resolvconf -a <tun>.x2ssh -m 0 -x` with
  our nameserver lines on stdin (`-x`: exclusive, only these servers are used while the record exists), as
  wg-quick does; undone by `resolvconf -d <tun>.x2ssh -f`. The record lives in /run, so a reboot drops it.
  Debian's own resolvconf ignores `-x` and would merge our servers with the others (queries would leak
  outside the tunnel), so there the resolv.conf backend is used instead.
- resolv.conf: the original bytes (and whether the path was a symlink) go into the journal, then our content
  is written IN PLACE through the path. Never rename over it: inside `ip netns exec` the file is a bind mount
  of /etc/netns/NAME/resolv.conf, and a rename would replace the mount point, not the file.

Our resolv.conf is never taken for the original, even with the journal lost (a crash, then a reboot, with an
older x2ssh that kept its journal in /run). It starts with HEADER and carries the original inside itself:

    # x2ssh-original-sha256: <hex digest of the original bytes>      or "absent" if there was no file
    # x2ssh-original: <base64 of the original bytes, 64 characters per line; as many lines as needed>

(comment lines, short enough for every resolver library). A snapshot that turns out to be ours stands for the
original embedded in it; `recover_resolv_conf()` puts that original back when there is no journal.

Another program may rewrite resolv.conf while the tunnel is up (NetworkManager, dhclient, resolvconf).
`DnsConfigurator.check()`, called about once a second, notices, journals the new content as the newest
original (one record that replaces the older one) and writes ours again. Restoring writes back the newest
content that is not ours; and if the file is not ours at that moment, it is left as it is, because it is
then itself the newest content that is not ours.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from x2ssh.errors import DnsError
from x2ssh.host.api import DNS_V4
from x2ssh.settings import DnsSetting, IPAddress

if TYPE_CHECKING:
    from x2ssh.host.journal import StateJournal

log = logging.getLogger(__name__)

RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_DIR = "/run/systemd/resolve/"
RESOLVCONF_DIRS = ("/run/resolvconf/", "/etc/resolvconf/run/")  # where resolvconf keeps its resolv.conf
RESOLV_CONF_RECORD = "resolv_conf"
RESOLVED_RECORD = "resolved_link"
RESOLVCONF_RECORD = "resolvconf_record"
RESOLVCONF_SUFFIX = ".x2ssh"  # our resolvconf record is "<tun>.x2ssh" (interface.protocol)
HEADER = (
    b"# Written by x2ssh while its VPN is up. The original is restored when x2ssh exits\n"
    b"# (after a crash: x2ssh --vpn-cleanup).\n"
)
_OURS = b"# Written by x2ssh"  # the start of HEADER, in every version: the mark of a file that is ours
ORIGINAL_SUM_TAG = b"# x2ssh-original-sha256: "
ORIGINAL_TAG = b"# x2ssh-original: "
_ABSENT = b"absent"
_CHUNK = 64
_KEPT_DIRECTIVES = (b"search", b"domain", b"options")  # local search domains stay useful through the VPN

Backend = Literal["resolved", "resolvconf", "resolv.conf"]


class Runner(Protocol):
    """Runs a helper program (resolvectl, resolvconf): argv, optional text on stdin."""

    def __call__(self, argv: list[str], input: str | None = None) -> subprocess.CompletedProcess: ...


def resolver_addresses(setting: DnsSetting) -> list[IPAddress]:
    """The DNS servers to configure for a `--vpn-dns` setting: `remote` → the tunnel's own DNS address
    (answered by the session), an address → that server (reached through the tunnel), `off` → none."""
    if setting == "off":
        return []
    if setting == "remote":
        return [DNS_V4]
    return [setting]


def run_command(argv: list[str], input: str | None = None) -> subprocess.CompletedProcess:
    """Run a helper command with a bounded wait; output captured for error messages."""
    return subprocess.run(argv, input=input, capture_output=True, text=True, timeout=15, check=False)


def detect_backend(
    resolv_conf: Path = RESOLV_CONF,
    which: Callable[[str], str | None] = shutil.which,
    run: Runner = run_command,
) -> Backend:
    """systemd-resolved if resolv.conf is its file and resolvectl is installed; else resolvconf if it is
    openresolv and resolv.conf is its output; else resolv.conf."""
    real = os.path.realpath(resolv_conf)
    if real.startswith(RESOLVED_DIR) and which("resolvectl"):
        return "resolved"
    if which("resolvconf") and _managed_by_resolvconf(Path(real)) and _is_openresolv(run):
        return "resolvconf"
    return "resolv.conf"


def _managed_by_resolvconf(real: Path) -> bool:
    if str(real).startswith(RESOLVCONF_DIRS):
        return True
    try:
        with real.open("rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return any(line.startswith(b"#") and b"resolvconf" in line for line in head.splitlines())


def _is_openresolv(run: Runner) -> bool:
    try:
        result = run(["resolvconf", "--version"])
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0 and (result.stdout or "").startswith("openresolv")


@dataclass(frozen=True)
class Original:
    """What resolv.conf held before x2ssh: its bytes, or None if there was no file."""

    content: bytes | None


def is_ours(content: bytes | None) -> bool:
    """True if `content` is a resolv.conf written by x2ssh (any version)."""
    return content is not None and content.startswith(_OURS)


def embed_original(original: Original) -> bytes:
    """The comment lines that carry `original` inside our resolv.conf (format in the module docstring)."""
    if original.content is None:
        return ORIGINAL_SUM_TAG + _ABSENT + b"\n"
    encoded = base64.b64encode(original.content)
    lines = [ORIGINAL_SUM_TAG + hashlib.sha256(original.content).hexdigest().encode()]
    lines += [ORIGINAL_TAG + encoded[i : i + _CHUNK] for i in range(0, len(encoded), _CHUNK)]
    return b"\n".join(lines) + b"\n"


def embedded_original(content: bytes) -> Original | None:
    """The original carried by our resolv.conf `content`, or None if it has none or it is torn."""
    digest: bytes | None = None
    chunks: list[bytes] = []
    for line in content.splitlines():
        if line.startswith(ORIGINAL_SUM_TAG):
            digest = line[len(ORIGINAL_SUM_TAG) :].strip()
        elif line.startswith(ORIGINAL_TAG):
            chunks.append(line[len(ORIGINAL_TAG) :].strip())
    if digest is None:
        return None
    if digest == _ABSENT:
        return Original(None) if not chunks else None
    try:
        data = base64.b64decode(b"".join(chunks), validate=True)
    except (binascii.Error, ValueError):
        return None
    return Original(data) if hashlib.sha256(data).hexdigest().encode() == digest else None


def original_of(content: bytes | None) -> Original:
    """The original that a resolv.conf snapshot stands for: itself unless it is ours; if it is ours, the
    original embedded in it; if that is missing too (an older x2ssh's file), our file without our lines,
    i.e. without nameservers, with a warning: better than keeping the dead tunnel address for good."""
    if not is_ours(content):
        return Original(content)
    assert content is not None
    embedded = embedded_original(content)
    if embedded is not None:
        return embedded
    log.warning(
        "resolv.conf was written by an older x2ssh and its original is lost: using it without x2ssh's lines "
        "(no nameserver); restart NetworkManager or your DHCP client to get yours back"
    )
    kept = [
        line
        for line in content.splitlines()
        if line.strip() and not line.startswith(b"#") and not line.startswith(b"nameserver")
    ]
    return Original(b"".join(line + b"\n" for line in kept))


def render_resolv_conf(servers: Sequence[IPAddress], original: bytes | None) -> bytes:
    """Our resolv.conf: the header, one nameserver line per server, the original's search/domain/options
    lines, and the original itself in comment lines (see the module docstring)."""
    kept = [
        line
        for line in (original or b"").splitlines()
        if line.split(maxsplit=1)[:1] and line.split(maxsplit=1)[0] in _KEPT_DIRECTIVES
    ]
    lines = [f"nameserver {s}".encode() for s in servers] + kept
    return HEADER + b"\n".join(lines) + b"\n" + embed_original(Original(original))


class DnsConfigurator:
    """Applies, guards and restores the DNS settings for TUN `tun`; every change is journaled first."""

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
        self._run = run
        self.backend: Backend = backend or detect_backend(self.resolv_conf, run=run)
        self._applied: tuple[str, dict[str, Any]] | None = None
        self._seq: int | None = None  # the journal record of what is applied now
        self._servers: list[IPAddress] = []
        self._written: bytes | None = None  # our resolv.conf as last written (resolv.conf backend)

    @property
    def original(self) -> bytes | None:
        """The newest resolv.conf content that is not ours (resolv.conf backend, while applied; updated by
        check()), e.g. to find the resolvers outside the tunnel; None otherwise or if there was no file."""
        if self._applied is None or self._applied[0] != RESOLV_CONF_RECORD:
            return None
        return _decode(self._applied[1]["original"])

    def apply(self, servers: Sequence[IPAddress], journal: StateJournal) -> None:
        """Send all DNS to `servers`. An empty list (`--vpn-dns off`) changes nothing. Raises DnsError."""
        if not servers:
            log.info("DNS left alone (--vpn-dns off)")
            return
        if self._applied is not None:
            raise DnsError("DNS settings are already applied")
        self._servers = list(servers)
        if self.backend == "resolved":
            data: dict[str, Any] = {"link": self.tun}
            self._seq = journal.record(RESOLVED_RECORD, **data)
            self._applied = (RESOLVED_RECORD, data)
            self._apply_resolved(servers)
        elif self.backend == "resolvconf":
            data = {"record": self.tun + RESOLVCONF_SUFFIX}
            self._seq = journal.record(RESOLVCONF_RECORD, **data)
            self._applied = (RESOLVCONF_RECORD, data)
            self._apply_resolvconf(data["record"], servers)
        else:
            data = _snapshot(self.resolv_conf)
            self._seq = journal.record(RESOLV_CONF_RECORD, **data)
            self._applied = (RESOLV_CONF_RECORD, data)
            self._write_ours(data)
        log.info("DNS through the tunnel: %s (%s)", ", ".join(map(str, servers)), self.backend)

    def check(self, journal: StateJournal) -> str | None:
        """Re-apply tunnel DNS if another program rewrote resolv.conf; call it about once a second.

        If the file is no longer ours, its new content is journaled as the newest original (replacing the
        older record, so a restore, also after a crash, writes back the newest content that is not ours),
        and ours is written again. Returns a message to log, or None if nothing changed (one small read).
        The resolved and resolvconf backends need no guard (returns None): their settings belong to the link
        or record, which the manager keeps and merges into every resolv.conf it writes. Raises DnsError.
        """
        if self._applied is None or self._applied[0] != RESOLV_CONF_RECORD or self._seq is None:
            return None
        current = _read(self.resolv_conf)
        if current == self._written:
            return None
        if is_ours(current):  # our file, but not as we wrote it: write it again, the original is unchanged
            self._write_ours(self._applied[1])
            return f"{self.resolv_conf} was modified; tunnel DNS written again"
        data = _snapshot(self.resolv_conf)  # read again: symlink and mode too
        self._seq = journal.replace(self._seq, **data)
        self._applied = (RESOLV_CONF_RECORD, data)
        self._write_ours(data)
        return (
            f"{self.resolv_conf} was rewritten by another program: its content is kept for the restore, "
            "tunnel DNS written again"
        )

    def restore(self) -> None:
        """Undo what `apply` did (idempotent)."""
        if self._applied is None:
            return
        kind, data = self._applied
        if kind == RESOLVED_RECORD:
            log.info(undo_resolved_record(data, run=self._run))
        elif kind == RESOLVCONF_RECORD:
            log.info(undo_resolvconf_record(data, run=self._run))
        else:
            log.info(undo_resolv_conf_record(data))
        self._applied = None
        self._seq = None
        self._written = None

    def _write_ours(self, data: dict[str, Any]) -> None:
        original = _decode(data["original"])
        self._written = render_resolv_conf(self._servers, original)
        _write_in_place(self.resolv_conf, self._written)

    def _apply_resolved(self, servers: Sequence[IPAddress]) -> None:
        commands = [
            ["resolvectl", "dns", self.tun, *map(str, servers)],
            ["resolvectl", "domain", self.tun, "~."],
            ["resolvectl", "default-route", self.tun, "yes"],
        ]
        for argv in commands:
            _check_result(argv, self._run(argv))

    def _apply_resolvconf(self, record: str, servers: Sequence[IPAddress]) -> None:
        argv = ["resolvconf", "-a", record, "-m", "0", "-x"]
        _check_result(argv, self._run(argv, input="".join(f"nameserver {s}\n" for s in servers)))


def recover_resolv_conf(path: Path = RESOLV_CONF) -> str | None:
    """Put back the original embedded in our resolv.conf at `path`, for when no journal covers it (lost).

    Returns what was done, or None if the file is not ours (nothing to do). Raises DnsError if it is ours
    but carries no readable original (an older x2ssh's file, or a torn write), or cannot be written.
    """
    path = Path(path)
    current = _read(path)
    if not is_ours(current):
        return None
    assert current is not None
    embedded = embedded_original(current)
    if embedded is None:
        raise DnsError(
            f"{path} was written by x2ssh but holds no readable original: put yours back by hand "
            "(e.g. restart NetworkManager or your DHCP client)"
        )
    if embedded.content is None:
        try:
            path.unlink()
        except OSError as e:
            raise DnsError(f"cannot remove {path}: {e.strerror}") from e
        return f"removed {path} (written by x2ssh; there was none before)"
    _write_in_place(path, embedded.content)
    return f"restored {path} from the original embedded in it"


def undo_resolv_conf_record(data: dict[str, Any]) -> str:
    """Restore resolv.conf byte-exact from a journal record (in place; a vanished symlink is recreated).

    If the file is not ours any more, another program wrote it since: that is the newest original, and it
    stays. A recorded original that is itself ours (an older x2ssh's journal) stands for its embedded one.
    """
    path = Path(data["path"])
    original = original_of(_decode(data["original"])).content
    current = _read(path)
    if current is not None and not is_ours(current):
        return f"left alone: {path} (not ours: written by another program)"
    if original is None:  # there was no file: remove ours
        if current is None:
            return f"already gone: {path}"
        try:
            path.unlink()
        except OSError as e:
            raise DnsError(f"cannot remove {path}: {e.strerror}") from e
        return f"removed {path} (there was none before)"
    target = data.get("symlink")
    if target is not None and not os.path.lexists(path):
        os.symlink(target, path)
    _write_in_place(path, original, mode=data.get("mode"))
    return f"restored {path}"


def undo_resolved_record(data: dict[str, Any], run: Runner = run_command) -> str:
    """Revert systemd-resolved's settings of the TUN link, unless the link is gone (resolved forgot it)."""
    link = data["link"]
    try:
        socket.if_nametoindex(link)
    except OSError:
        return f"already gone: resolved settings of {link} (link removed)"
    argv = ["resolvectl", "revert", link]
    _check_result(argv, run(argv))
    return f"reverted resolved settings of {link}"


def undo_resolvconf_record(data: dict[str, Any], run: Runner = run_command) -> str:
    """Delete our resolvconf record (`-f`: no error if it is already gone, e.g. after a reboot)."""
    record = data["record"]
    argv = ["resolvconf", "-d", record, "-f"]
    _check_result(argv, run(argv))
    return f"deleted resolvconf record {record}"


def _check_result(argv: list[str], result: subprocess.CompletedProcess) -> None:
    if result.returncode != 0:
        raise DnsError(f"{' '.join(argv)} failed: {(result.stderr or '').strip() or result.returncode}")


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DnsError(f"cannot read {path}: {e.strerror}") from e


def _decode(encoded: str | None) -> bytes | None:
    return base64.b64decode(encoded) if encoded is not None else None


def _snapshot(path: Path) -> dict[str, Any]:
    """The journal data for resolv.conf as it is now; its `original` is never our own file (original_of)."""
    target = os.readlink(path) if path.is_symlink() else None
    try:
        current: bytes | None = path.read_bytes()
        mode: int | None = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        if target is not None:
            raise DnsError(f"{path} is a dangling symlink to {target}: fix it or use --vpn-dns off") from None
        current, mode = None, None
    except OSError as e:
        raise DnsError(f"cannot read {path}: {e.strerror}") from e
    original = original_of(current).content
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
    except OSError as e:
        raise DnsError(f"cannot write {path}: {e.strerror}") from e
    finally:
        os.close(fd)
