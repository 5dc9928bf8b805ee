"""A real laptop user for the namespace lab: an account with a passphrase key in her own ssh-agent, her own
~/.ssh/config and known_hosts, and a sudoers entry; removed again afterwards (user, home, agent, sudoers).

`LaptopUser.argv(...)` builds the command line that starts x2ssh as she would: plainly (x2ssh asks sudo for
its privileged helper), with `sudo -E`, with `sudo --preserve-env=SSH_AUTH_SOCK`, or with plain `sudo`.
`setpriv` execs (no fork), so without sudo the test's process is x2ssh itself and signals reach it directly;
sudo relays the signals it gets to x2ssh.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.lab import Lab
from benchmarks.procstat import descendants
from benchmarks.sshd import SshServer
from tests.integration.vpn_runner import VpnProcess, state_dir_for

PASSPHRASE = "correct horse battery staple"
SUDOERS_DIR = Path("/etc/sudoers.d")
HOST_ALIAS = "lab"


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True, **kw)  # type: ignore[call-overload]


class LaptopUser:
    """Create with `LaptopUser.create(server)`; always `remove()` (the fixture does, or `with` it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sudoers = SUDOERS_DIR / f"x2ssh-test-{name}"
        self.agent_pid: int | None = None
        self.home = Path("/nonexistent")
        self.agent_sock = ""

    @classmethod
    def create(cls, server: SshServer, proxy_command: str | None = None, sudo: bool = True) -> LaptopUser:
        user = cls(f"x2u{secrets.token_hex(3)}")
        try:
            user._create(server, proxy_command, sudo)
        except BaseException:
            user.remove()
            raise
        return user

    def __enter__(self) -> LaptopUser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def _create(self, server: SshServer, proxy_command: str | None, sudo: bool) -> None:
        _run(["useradd", "--create-home", "--shell", "/bin/bash", self.name])
        entry = pwd.getpwnam(self.name)
        self.home = Path(entry.pw_dir)
        ssh = self.home / ".ssh"
        self.as_user(["mkdir", "-m", "700", str(ssh)])
        self.as_user(["ssh-keygen", "-q", "-t", "ed25519", "-N", PASSPHRASE, "-f", str(ssh / "id_ed25519")])
        config = (
            f"Host {HOST_ALIAS}\n"
            f"    HostName {server.host}\n"
            f"    Port {server.port}\n"
            f"    User {server.user}\n"
            "    StrictHostKeyChecking yes\n"
        )
        if proxy_command:
            config += f"    ProxyCommand {proxy_command}\n"
        self._write(ssh / "config", config)
        self._write(ssh / "known_hosts", server.known_hosts.read_text())
        with server.authorized_keys.open("a") as keys:
            keys.write((ssh / "id_ed25519.pub").read_text())
        self.agent_sock = str(ssh / "agent.sock")
        started = self.as_user(["ssh-agent", "-s", "-a", self.agent_sock])
        for part in started.stdout.replace("\n", ";").split(";"):
            if part.strip().startswith("SSH_AGENT_PID="):
                self.agent_pid = int(part.strip().split("=", 1)[1])
        askpass = ssh / "askpass"
        self._write(askpass, f"#!/bin/sh\necho '{PASSPHRASE}'\n", mode=0o700)
        self.as_user(
            ["env", f"SSH_AUTH_SOCK={self.agent_sock}", f"SSH_ASKPASS={askpass}", "SSH_ASKPASS_REQUIRE=force",
             "DISPLAY=:0", "setsid", "ssh-add", str(ssh / "id_ed25519")],
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        askpass.unlink()
        if sudo:
            self.sudoers.write_text(f"{self.name} ALL=(root) NOPASSWD: ALL\n")
            self.sudoers.chmod(0o440)

    def _write(self, path: Path, text: str, mode: int = 0o600) -> None:
        path.write_text(text)
        path.chmod(mode)
        shutil.chown(path, self.name, self.name)

    def as_user(self, argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return _run(self.setpriv() + argv, **kw)

    def setpriv(self) -> list[str]:
        """Become the user for good (uid, gid, groups, a login-like environment), exec'ing, not forking."""
        return ["setpriv", f"--reuid={self.name}", f"--regid={self.name}", "--init-groups", "--reset-env"]

    def argv(self, how: str, *x2ssh_args: str) -> list[str]:
        """x2ssh started by this user: how is "plain", "sudo -E", "sudo --preserve-env" or "sudo"."""
        x2ssh = [sys.executable, "-m", "x2ssh", *x2ssh_args]
        env = ["env", f"SSH_AUTH_SOCK={self.agent_sock}", "PYTHONUNBUFFERED=1"]
        sudo = {
            "plain": [],
            "sudo -E": ["sudo", "-n", "-E"],
            "sudo --preserve-env": ["sudo", "-n", "--preserve-env=SSH_AUTH_SOCK,PYTHONUNBUFFERED"],
            "sudo": ["sudo", "-n"],
        }[how]
        return [*self.setpriv(), *env, *sudo, *x2ssh]

    def remove(self) -> None:
        """Remove the sudoers entry first (it must never outlive the test), then the agent and the user."""
        self.sudoers.unlink(missing_ok=True)
        if self.agent_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.agent_pid, 15)
        with contextlib.suppress(KeyError):
            pwd.getpwnam(self.name)
            subprocess.run(["pkill", "-KILL", "-u", self.name], capture_output=True, timeout=30, check=False)
            subprocess.run(["userdel", "--remove", self.name], capture_output=True, timeout=60, check=False)


def vpn_as(lab: Lab, server: SshServer, user: LaptopUser, how: str = "plain", *extra: str) -> VpnProcess:
    """`x2ssh --vpn lab` as `user` started `how` (see LaptopUser.argv); not started yet."""
    state = state_dir_for(lab)
    argv = user.argv(how, "--vpn", HOST_ALIAS, "--state-dir", str(state), *extra)
    return VpnProcess(lab, server, argv=argv, state_dir=state)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def run_processes(vpn: VpnProcess) -> dict[str, list[int]]:
    """The run's x2ssh process(es) and privileged helper process(es), by role (sudo itself left out)."""
    tree = [p for p in (vpn.pid, *descendants(vpn.pid)) if not cmdline(p).startswith("sudo ")]
    return {
        "x2ssh": [p for p in tree if " -m x2ssh " in cmdline(p)],
        "helper": [p for p in tree if " -m x2ssh.host.helper " in cmdline(p)],
    }
