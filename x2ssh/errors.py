"""Typed errors of x2ssh: each says whose fault it was and carries the process exit code.

Exit codes follow sysexits(3) where one fits, so scripts can tell the cases apart.
"""

from __future__ import annotations


class X2sshError(Exception):
    """Base of every error x2ssh reports to the user (message on stderr, no traceback)."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(X2sshError):
    """The command line or the config file is wrong (the user's input)."""

    exit_code = 2


class NotPrivileged(X2sshError):
    """x2ssh lacks root / CAP_NET_ADMIN (how it was started)."""

    exit_code = 77  # EX_NOPERM


class TunUnavailable(X2sshError):
    """/dev/net/tun is missing or unusable on this machine."""

    exit_code = 69  # EX_UNAVAILABLE


class TunNameTaken(X2sshError):
    """A network interface with the requested TUN name already exists."""

    exit_code = 73  # EX_CANTCREAT


class AlreadyRunning(X2sshError):
    """Another live x2ssh owns the state of this network namespace."""

    exit_code = 75  # EX_TEMPFAIL


class SshConnectError(X2sshError):
    """The SSH connection could not be set up (server, network or credentials)."""

    exit_code = 255  # what OpenSSH's ssh returns for connection errors


class SshHostUnreachable(SshConnectError):
    """The SSH server (or a ProxyJump hop) cannot be reached or resolved."""


class SshAuthFailed(SshConnectError):
    """The server rejected every offered credential."""


class SshHostKeyRejected(SshConnectError):
    """The server's host key is unknown or does not match known_hosts (never accepted silently)."""


class RoutingError(X2sshError):
    """Routes could not be read or changed."""

    exit_code = 71  # EX_OSERR


class DnsError(X2sshError):
    """DNS settings could not be applied or restored."""

    exit_code = 71  # EX_OSERR


class StateError(X2sshError):
    """The state journal could not be written, read, or fully undone."""

    exit_code = 74  # EX_IOERR
