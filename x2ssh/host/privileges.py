"""Who x2ssh runs for: the user behind `sudo`, and giving up root once the privileged helper is started.

Started with `sudo`, x2ssh is root but works for `SUDO_USER`: that user's ssh config, identities,
known_hosts and agent. The privileged helper keeps root; the rest of the process (SSH and the data plane,
which parse the server's bytes and untrusted packets) drops to that user before it touches any of them.
There is no sudo on Windows (the VPN needs an elevated console there), so there nobody is "behind sudo".
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from x2ssh.errors import X2sshError

if TYPE_CHECKING and sys.platform != "win32":
    from pwd import struct_passwd as Account
else:
    Account = Any

log = logging.getLogger(__name__)


class PrivilegeDropFailed(X2sshError):
    """Could not become the invoking user after starting the privileged helper."""

    exit_code = 77


def sudo_user(env: Mapping[str, str] | None = None, euid: int | None = None) -> Account | None:
    """The account that ran `sudo x2ssh`, or None (not root, not via sudo, or sudo from root itself)."""
    if sys.platform == "win32":
        return None
    env = os.environ if env is None else env
    if (os.geteuid() if euid is None else euid) != 0:
        return None
    name, uid = env.get("SUDO_USER"), env.get("SUDO_UID")
    if not name or not uid or not uid.isdigit() or int(uid) == 0:
        return None
    import pwd  # not on Windows

    try:
        user = pwd.getpwnam(name)
    except KeyError:
        return None
    return user if user.pw_uid == int(uid) else None


def drop_to(user: Account) -> None:
    """Become `user` for good (groups, gid, uid), with its HOME, USER and LOGNAME; verify root is gone."""
    if sys.platform == "win32":
        raise PrivilegeDropFailed("there is no sudo user to become on Windows")
    try:
        os.initgroups(user.pw_name, user.pw_gid)
        if sys.platform == "linux":
            os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
            os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
        else:  # BSDs and macOS: setuid as root sets the real, effective and saved ids alike
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
    except OSError as e:
        raise PrivilegeDropFailed(f"cannot become {user.pw_name}: {e.strerror}") from e
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise PrivilegeDropFailed(f"dropping root for {user.pw_name} did not stick")
    os.environ.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    log.debug("running the SSH side as %s (uid %d)", user.pw_name, user.pw_uid)


def agent_hint(env: Mapping[str, str] | None = None) -> str | None:
    """Why authentication may have failed under sudo: sudo strips SSH_AUTH_SOCK. None if that is not it.

    Reads the environment sudo left (SUDO_USER stays after x2ssh dropped to that user)."""
    env = os.environ if env is None else env
    if not env.get("SUDO_USER") or env.get("SUDO_UID") in (None, "0") or env.get("SSH_AUTH_SOCK"):
        return None
    return (
        "x2ssh was started with sudo, which removes SSH_AUTH_SOCK, so your ssh-agent is out of reach: "
        "run x2ssh without sudo (it asks sudo for root itself), or keep the agent with "
        "`sudo --preserve-env=SSH_AUTH_SOCK x2ssh ...` or `sudo -E x2ssh ...`"
    )
