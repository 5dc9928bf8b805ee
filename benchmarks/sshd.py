"""A real OpenSSH sshd for tests and benchmarks: generated config, host key and client key (ed25519).

The server runs by absolute path (`/usr/sbin/sshd -D -e -f CONFIG`), optionally inside a network namespace
(`ip netns exec NAME`), logs at VERBOSE to `WORKDIR/sshd.log`, and accepts only the generated client key for
`root`. Everything it needs lives in its work directory; nothing outside it is changed except creating
`/run/sshd` (sshd's privilege-separation directory) when missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from benchmarks.procstat import descendants

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0

# Directories searched for python interpreters that `hide_python3` masks.
_PYTHON_DIRS = ("/usr/bin", "/usr/local/bin", "/bin", "/usr/sbin", "/usr/local/sbin", "/sbin")


class SshServerError(RuntimeError):
    """sshd could not be set up or did not come up: a fault of the lab machine, not of the code under test."""


class SshServer:
    """A real OpenSSH sshd started with a generated config, host key and user key (ed25519).

    `port=0` picks a free port (inside the namespace when `netns` is given). `also_listen` adds more listen
    addresses on the same port (e.g. the server's IPv6 address); known_hosts covers all of them.

    `extra_config` lines are placed *before* the generated defaults, because sshd keeps the first value it
    reads for a keyword, so they override; if they contain a `Match` block they are appended instead.

    `nofile` starts sshd with that open-files limit (soft and hard), as systemd's default 1024 would: each
    SSH connection's process then holds about a thousand channels.

    A server without python3, for the agent's degraded mode: pass `hide_python3=True`. sshd then runs in a
    private mount namespace where every bin directory holding a `python*` (the standard ones and each
    directory on the caller's PATH, since root's ~/.bashrc may put e.g. pyenv shims on the sessions' PATH)
    is shadowed by a directory of symlinks to everything except `python*`: `command -v python3` finds
    nothing and `/usr/bin/python3` does not exist, while every other tool works. Only sshd and its sessions
    see this. (`SetEnv PATH=/nonexistent` alone is not enough here: root's ~/.bashrc resets PATH for
    non-interactive ssh commands, and absolute paths would still work.)
    """

    def __init__(
        self,
        workdir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        netns: str | None = None,
        extra_config: str = "",
        also_listen: Sequence[str] = (),
        hide_python3: bool = False,
        nofile: int | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.host = host
        self.port = port
        self.netns = netns
        self.user = "root"
        self.extra_config = extra_config
        self.also_listen = tuple(also_listen)
        self.hide_python3 = hide_python3
        self.nofile = nofile  # open-files limit of sshd and each connection's process (systemd: 1024)
        self.config_path = self.workdir / "sshd_config"
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.client_key = self.workdir / "client_ed25519"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.session_home = self.workdir / "home"  # HOME of the sessions (see _write_files)
        self.known_hosts = self.workdir / "known_hosts"
        self.ssh_config = self.workdir / "ssh_config"
        self.log_path = self.workdir / "sshd.log"
        self.pid_path = self.workdir / "sshd.pid"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Generate keys and config, start sshd and wait (bounded) until it listens on every address."""
        if self._proc is not None:
            raise SshServerError("sshd already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self._generate_keys()
        if self.port == 0:
            self.port = self._free_port()
        self._write_files()
        self.log_path.write_bytes(b"")
        argv = [SSHD, "-D", "-e", "-f", str(self.config_path)]
        if self.nofile is not None:
            argv = ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--", *argv]
        if self.hide_python3:
            argv = self._masking_wrapper(argv)
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        log.debug("starting sshd: %s", argv)
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
            )
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop sshd and every session process it spawned (bounded; escalates to SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        victims = [proc.pid, *descendants(proc.pid)]
        for pid in reversed(victims):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("sshd pid %d ignored SIGTERM; killing", proc.pid)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> SshServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what clients need ---------------------------------------------------------------------------------

    @property
    def destination(self) -> str:
        """`root@HOST` (IPv6 hosts are fine: ssh takes the port from -p / the config)."""
        return f"{self.user}@{self.host}"

    def ssh_options(self) -> list[str]:
        """ssh options (no destination) that authenticate with the generated key and verify the host key."""
        return [
            "-F",
            str(self.ssh_config),
            "-i",
            str(self.client_key),
            "-p",
            str(self.port),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
        ]

    def ssh_command(self, *args: str) -> list[str]:
        """An `ssh` argv: options, then `root@HOST`, then `args` (ssh also parses options given after the
        destination, so `ssh_command("-N", "-L", spec)` works as well as a remote command)."""
        return ["ssh", *self.ssh_options(), self.destination, *args]

    def asyncssh_options(self) -> dict:
        """kwargs for `asyncssh.connect(host, **opts)`: port, username, client_keys, known_hosts."""
        return {
            "port": self.port,
            "username": self.user,
            "client_keys": [str(self.client_key)],
            "known_hosts": str(self.known_hosts),
        }

    def log_text(self) -> str:
        """sshd's log so far (for assertions and failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- internals -----------------------------------------------------------------------------------------

    def _generate_keys(self) -> None:
        for key in (self.host_key, self.client_key):
            if key.exists():
                continue
            _run_checked(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)])
        self.authorized_keys.write_text(self.client_key.with_suffix(".pub").read_text())

    def _addresses(self) -> list[str]:
        return [self.host, *self.also_listen]

    def _write_files(self) -> None:
        listen = "\n".join(f"ListenAddress {addr}" for addr in self._addresses())
        # Sessions get a home of their own: this machine's root dotfiles (pyenv init in ~/.bashrc) are not
        # the lab server's, and a session killed in the middle of `pyenv rehash` leaves a lock that stalls
        # every later session of the machine for 60 s.
        self.session_home.mkdir(parents=True, exist_ok=True)
        defaults = f"""\
Port {self.port}
{listen}
HostKey {self.host_key}
PidFile {self.pid_path}
AuthorizedKeysFile {self.authorized_keys}
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
PermitTunnel yes
LogLevel VERBOSE
UseDNS no
PrintMotd no
X11Forwarding no
MaxSessions 1000
MaxStartups 1000:30:2000
Subsystem sftp internal-sftp
SetEnv HOME={self.session_home}
"""
        extra = self.extra_config.strip()
        if extra and any(line.strip().lower().startswith("match ") for line in extra.splitlines()):
            text = f"{defaults}{extra}\n"
        else:
            text = f"{extra}\n{defaults}" if extra else defaults
        self.config_path.write_text(text)
        host_pub = self.host_key.with_suffix(".pub").read_text().split()
        patterns = ",".join(_known_hosts_pattern(addr, self.port) for addr in self._addresses())
        self.known_hosts.write_text(f"{patterns} {host_pub[0]} {host_pub[1]}\n")
        self.ssh_config.write_text(
            f"""\
Host lab-server
    HostName {self.host}

Host *
    Port {self.port}
    User {self.user}
    IdentityFile {self.client_key}
    IdentitiesOnly yes
    UserKnownHostsFile {self.known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 10
"""
        )

    def _masking_wrapper(self, argv: list[str]) -> list[str]:
        """Wrap argv so it runs in a private mount namespace where no bin directory holds a python.

        Each directory that holds `python*` is first bind-mounted to `mask/realN` (so the originals stay
        reachable), then shadowed by `mask/shadowN`: symlinks to `realN/<name>` for every other entry.
        """
        mask = self.workdir / "mask"
        shutil.rmtree(mask, ignore_errors=True)
        mask.mkdir()
        path_dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
        candidates = (Path(d) for d in (*_PYTHON_DIRS, *path_dirs))
        directories = sorted({str(d.resolve()) for d in candidates if d.is_dir()})
        steps = ["set -e"]
        for index, directory in enumerate(directories):
            names = os.listdir(directory)
            if not any(name.startswith("python") for name in names):
                continue
            real, shadow = mask / f"real{index}", mask / f"shadow{index}"
            real.mkdir()
            shadow.mkdir()
            for name in names:
                if not name.startswith("python"):
                    (shadow / name).symlink_to(real / name)
            # Read-only, because `pyenv init` in root's ~/.bashrc would otherwise re-create its shims.
            steps += [
                f"mount --bind {directory} {real}",
                f"mount --bind {shadow} {directory}",
                f"mount -o remount,bind,ro {directory}",
            ]
        steps.append('exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "; ".join(steps), "sh", *argv]

    def _free_port(self) -> int:
        if not self.netns:
            return _bind_free_port(self.host)
        code = (
            "import socket,sys;h=sys.argv[1];"
            "s=socket.socket(socket.AF_INET6 if ':' in h else socket.AF_INET);"
            "s.bind((h,0));print(s.getsockname()[1])"
        )
        out = _run_checked(["ip", "netns", "exec", self.netns, sys.executable, "-c", code, self.host])
        return int(out.strip())

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        expected = len(self._addresses())
        while time.monotonic() < deadline:
            text = self.log_text()
            if text.count("Server listening on") >= expected:
                return
            if self._proc is not None and self._proc.poll() is not None:
                raise SshServerError(f"sshd exited with {self._proc.returncode}; log:\n{text[-2000:]}")
            time.sleep(0.05)
        raise SshServerError(f"sshd did not listen within {START_TIMEOUT}s; log:\n{self.log_text()[-2000:]}")


def _known_hosts_pattern(addr: str, port: int) -> str:
    return addr if port == 22 else f"[{addr}]:{port}"


def _bind_free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _run_checked(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SshServerError(f"{argv[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise SshServerError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def sshd_version() -> str:
    """OpenSSH's version string as the server binary reports it (e.g. "OpenSSH_9.2p1 ...")."""
    if not shutil.which(SSHD) and not Path(SSHD).exists():
        return "missing"
    done = subprocess.run([SSHD, "-V"], capture_output=True, text=True, timeout=10, check=False)
    return (done.stderr or done.stdout).strip().splitlines()[0] if (done.stderr or done.stdout) else "unknown"
