"""Command line and config file parsing into one immutable `Settings`.

Every option is read from the command line and, optionally, a TOML file (`--config`); a value given on the
command line wins over the file, the file wins over the built-in default. Both sources go through the same
validators, so an error names the option whatever its source.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import re
import sys
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path, PureWindowsPath
from typing import Any, Literal, NoReturn

from x2ssh import __version__
from x2ssh.errors import UsageError

log = logging.getLogger(__name__)

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network
DnsSetting = Literal["remote", "off"] | IPv4Address | IPv6Address

DEFAULT_MTU = 65535  # largest the TUN takes: fewer, larger segments (benchmarks/netstack_bench.py)
MIN_MTU = 1280  # the IPv6 minimum: below it the TUN could not carry IPv6 at all
MAX_MTU = 65535
DEFAULT_TUN = "x2ssh0"


def default_state_dir(platform: str = sys.platform, environ: Mapping[str, str] = os.environ) -> Path:
    """Where the run lock and the journals live; it survives a reboot, so a crashed run is undone after it.

    Linux: /var/lib/x2ssh. Windows: %ProgramData%\\x2ssh, machine-wide as /var/lib is (the Windows host
    control makes it Administrators-only: x2ssh.host.windows.statedir).
    """
    if platform == "win32":
        base = environ.get("ProgramData") or environ.get("ALLUSERSPROFILE") or r"C:\ProgramData"
        return Path(str(PureWindowsPath(base, "x2ssh")))  # str: Windows separators wherever it is built
    return Path("/var/lib/x2ssh")


DEFAULT_STATE_DIR = default_state_dir()
DEFAULT_KEEPALIVE_INTERVAL = 15.0
DEFAULT_KEEPALIVE_COUNT_MAX = 3
DEFAULT_RETRY_INITIAL = 1.0
DEFAULT_RETRY_MAX_DELAY = 30.0
DEFAULT_REATTACH_GRACE = 60.0
DEFAULT_BUFFER_BUDGET_MIB = 128

_TUN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")

# -o options we understand. Port/User/IdentityFile/ProxyJump/ServerAlive* are folded into the matching
# Settings fields; the others stay in Settings.ssh_options for the SSH layer.
_FOLDED_SSH_OPTIONS = (
    "Port",
    "User",
    "IdentityFile",
    "ProxyJump",
    "ServerAliveInterval",
    "ServerAliveCountMax",
)
_PASSED_SSH_OPTIONS = (
    "UserKnownHostsFile",
    "GlobalKnownHostsFile",
    "StrictHostKeyChecking",
    "ConnectTimeout",
    "IdentitiesOnly",
)
_SSH_OPTION_NAMES = {name.lower(): name for name in _FOLDED_SSH_OPTIONS + _PASSED_SSH_OPTIONS}
_YES_NO = ("yes", "no")
_STRICT_HOST_KEY_VALUES = ("yes", "no", "accept-new", "ask", "off")


@dataclass(frozen=True)
class Settings:
    """Everything one x2ssh run needs to know, validated. Sequences are tuples (the object is immutable)."""

    vpn: bool = False
    destination: str | None = None
    host: str | None = None
    port: int | None = None  # None: from ssh_config, else 22
    user: str | None = None  # None: from ssh_config, else the local user
    identities: tuple[str, ...] = ()
    ssh_config: Path | None = None
    jump: tuple[str, ...] = ()
    ssh_options: tuple[tuple[str, str], ...] = ()  # canonical OpenSSH names, e.g. ("ConnectTimeout", "5")
    vpn_dns: DnsSetting = "remote"
    vpn_exclude: tuple[IPNetwork, ...] = ()
    vpn_mtu: int = DEFAULT_MTU
    vpn_tun: str = DEFAULT_TUN
    vpn_cleanup: bool = False
    vpn_kill_switch: bool = False
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL  # seconds; 0 disables keepalives
    keepalive_count_max: int = DEFAULT_KEEPALIVE_COUNT_MAX
    retry_max: int | None = None  # None: retry forever
    retry_initial: float = DEFAULT_RETRY_INITIAL
    retry_max_delay: float = DEFAULT_RETRY_MAX_DELAY
    ssh_connections: int | None = None  # None: auto (as many as flows need, up to AUTO_MAX_CONNECTIONS)
    agent_reattach_grace: float = DEFAULT_REATTACH_GRACE  # seconds the agent keeps flows of a lost link
    vpn_buffer_budget: int = DEFAULT_BUFFER_BUDGET_MIB  # MiB buffered across all TCP flows before pausing
    dynamic: tuple[str, int] | None = None  # -D: the SOCKS5/HTTP CONNECT proxy's (bind address, port),
    # alone (vpn False) or beside the VPN on the same SSH session
    socks_username: str | None = None  # proxy credentials (config file): required beyond loopback
    socks_password: str | None = None
    allow_lan: bool = False  # -D on a non-loopback address without credentials, explicitly allowed
    config: Path | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    verbose: int = 0
    quiet: bool = False

    def ssh_option(self, name: str) -> str | None:
        """The value of an `-o` option by its OpenSSH name (case-insensitive), or None if not given."""
        wanted = name.lower()
        for key, value in self.ssh_options:
            if key.lower() == wanted:
                return value
        return None


_EPILOG = (
    """\
Config file (--config FILE, TOML): top-level keys are the long option names without the leading dashes,
written with dashes or underscores (vpn-exclude or vpn_exclude), plus "destination". Repeatable options take
a list; "option" takes a table of OpenSSH options or a list of "KEY=VALUE" strings; flags take true/false.
A value on the command line wins over the file (lists are replaced, not merged). Example:

  destination = "alice@vpn.example"
  identity = ["~/.ssh/id_ed25519"]
  jump = ["bastion"]
  vpn-exclude = ["198.18.0.0/15", "fd00::/8"]
  vpn-dns = "remote"
  option = { StrictHostKeyChecking = "yes", ConnectTimeout = "10" }

-o accepts: """
    + ", ".join(_FOLDED_SSH_OPTIONS + _PASSED_SSH_OPTIONS)
    + "\n"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser; every default is None so that 'not given' can be told from 'given'."""
    p = _Parser(
        prog="x2ssh",
        usage=(
            "x2ssh --vpn [options] DESTINATION\n       x2ssh -D [bind_address:]port [options] DESTINATION"
            "\n       x2ssh --vpn-cleanup\n       x2ssh status [--json] | down"
        ),
        description="A full-tunnel VPN over plain SSH: every TCP connection and UDP datagram (IPv4 and IPv6) "
        "of this machine leaves from the SSH server. Needs root or CAP_NET_ADMIN.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        argument_default=None,
    )
    p.add_argument("destination", nargs="?", metavar="DESTINATION", help="[user@]host[:port] or a Host alias")
    p.add_argument("--vpn", action="store_true", default=None, help="run the VPN")
    p.add_argument(
        "-D",
        "--dynamic",
        metavar="[BIND_ADDRESS:]PORT",
        help="run a SOCKS5 and HTTP CONNECT proxy on this port (alone: no root needed; or beside --vpn)",
    )
    p.add_argument(
        "--allow-lan",
        action="store_true",
        default=None,
        help="let -D listen beyond loopback without credentials (socks-username/password in the config)",
    )
    p.add_argument("--version", action="version", version=f"x2ssh {__version__}")
    ssh = p.add_argument_group("SSH")
    ssh.add_argument("-p", "--port", metavar="PORT", help="port of the SSH server")
    ssh.add_argument("-l", "--user", metavar="USER", help="user to log in as")
    ssh.add_argument("-i", "--identity", action="append", metavar="FILE", help="identity file (repeatable)")
    ssh.add_argument("-F", "--ssh-config", metavar="FILE", help="ssh_config file [default: ~/.ssh/config]")
    ssh.add_argument("-J", "--jump", action="append", metavar="JUMP[,JUMP...]", help="ProxyJump hosts")
    ssh.add_argument("-o", "--option", action="append", metavar="KEY=VALUE", help="OpenSSH option")
    ssh.add_argument("--keepalive-interval", metavar="SECONDS", help="keepalive interval, 0: off [15]")
    ssh.add_argument("--keepalive-count-max", metavar="N", help="unanswered keepalives before reconnect [3]")
    ssh.add_argument("--retry-max", metavar="N|forever", help="reconnect attempts before giving up [forever]")
    ssh.add_argument("--retry-initial", metavar="SECONDS", help="first reconnect delay [1]")
    ssh.add_argument("--retry-max-delay", metavar="SECONDS", help="cap of the reconnect delay [30]")
    ssh.add_argument(
        "--agent-reattach-grace",
        metavar="SECONDS",
        help="how long the UDP agent keeps flows for a reconnect [60]",
    )
    ssh.add_argument(
        "--ssh-connections", metavar="N|auto", help="SSH connections to spread flows over, at most [auto]"
    )
    vpn = p.add_argument_group("VPN")
    vpn.add_argument("--vpn-dns", metavar="ADDR|remote|off", help="DNS server in VPN mode [remote]")
    vpn.add_argument("--vpn-exclude", action="append", metavar="CIDR", help="keep CIDR off the tunnel")
    vpn.add_argument("--vpn-mtu", metavar="N", help=f"MTU of the TUN device [{DEFAULT_MTU}]")
    vpn.add_argument("--vpn-tun", metavar="NAME", help=f"name of the TUN device [{DEFAULT_TUN}]")
    vpn.add_argument(
        "--vpn-buffer-budget",
        metavar="MIB",
        help=f"bytes buffered across all TCP flows before they pause [{DEFAULT_BUFFER_BUDGET_MIB} MiB]",
    )
    vpn.add_argument(
        "--vpn-kill-switch",
        action=argparse.BooleanOptionalAction,
        help="block traffic outside the tunnel while x2ssh runs",
    )
    vpn.add_argument("--vpn-cleanup", action="store_true", default=None, help="undo a crashed run, then exit")
    vpn.add_argument("--state-dir", metavar="DIR", help=f"state journal dir [{DEFAULT_STATE_DIR}]")
    gen = p.add_argument_group("general")
    gen.add_argument("--config", metavar="FILE", help="TOML file with the same settings")
    gen.add_argument("-v", "--verbose", action="count", help="more output (repeatable)")
    gen.add_argument("-q", "--quiet", action="store_true", default=None, help="warnings and errors only")
    return p


# Options that make sense in a config file, by their Settings-style (underscore) name.
_CONFIG_KEYS = {
    "destination",
    "port",
    "user",
    "identity",
    "ssh_config",
    "jump",
    "option",
    "keepalive_interval",
    "keepalive_count_max",
    "retry_max",
    "retry_initial",
    "retry_max_delay",
    "ssh_connections",
    "dynamic",
    "socks_username",
    "socks_password",
    "allow_lan",
    "agent_reattach_grace",
    "vpn_buffer_budget",
    "vpn_dns",
    "vpn_exclude",
    "vpn_mtu",
    "vpn_tun",
    "vpn_kill_switch",
    "state_dir",
    "verbose",
    "quiet",
}
_CONFIG_LIST_KEYS = {"identity", "jump", "vpn_exclude"}


def parse_args(argv: list[str] | None) -> Settings:
    """Parse a command line (without the program name; None means sys.argv[1:]) into Settings.

    Raises UsageError with a message that names the offending option.
    """
    cli = vars(build_parser().parse_args(argv))
    file_values: dict[str, Any] = {}
    config_path = Path(cli["config"]).expanduser() if cli["config"] else None
    if config_path is not None:
        file_values = load_config(config_path)

    def pick(key: str) -> Any:
        return cli[key] if cli.get(key) is not None else file_values.get(key)

    vpn = bool(cli["vpn"])
    cleanup = bool(cli["vpn_cleanup"])
    if vpn and cleanup:
        raise UsageError("--vpn and --vpn-cleanup exclude each other")
    dynamic_raw = pick("dynamic")
    dynamic = parse_listen(str(dynamic_raw)) if dynamic_raw is not None else None
    if dynamic is not None and cleanup:
        raise UsageError("-D and --vpn-cleanup exclude each other")
    if not vpn and not cleanup and dynamic is None:
        raise UsageError("--vpn or -D is required")
    socks_username, socks_password = pick("socks_username"), pick("socks_password")
    if (socks_username is None) != (socks_password is None):
        raise UsageError("socks-username and socks-password go together")
    verbose = _int_option("--verbose", _or(pick("verbose"), 0), minimum=0)
    quiet = bool(pick("quiet"))
    if cli["verbose"] and cli["quiet"]:
        raise UsageError("-v/--verbose and -q/--quiet exclude each other")
    if cli["verbose"]:
        quiet = False
    elif cli["quiet"]:
        verbose = 0

    destination = pick("destination")
    if destination is not None and not isinstance(destination, str):
        raise UsageError("destination must be a string")
    host = port = user = None
    if destination is not None:
        user, host, port = parse_destination(destination)
    elif vpn:
        raise UsageError("DESTINATION is required with --vpn")

    ssh_options = _parse_ssh_options(file_values.get("option"), cli["option"])
    if cli["port"] is not None:
        port = _port("-p/--port", cli["port"])
    elif "Port" in ssh_options:
        port = _port("-o Port", ssh_options["Port"])
    elif port is None and file_values.get("port") is not None:
        port = _port("port", file_values["port"])
    if cli["user"] is not None:
        user = _nonempty("-l/--user", cli["user"])
    elif "User" in ssh_options:
        user = _nonempty("-o User", ssh_options["User"])
    elif user is None and file_values.get("user") is not None:
        user = _nonempty("user", file_values["user"])

    identities = tuple(_nonempty("-i/--identity", i) for i in (pick("identity") or []))
    if "IdentityFile" in ssh_options:
        identities += (ssh_options["IdentityFile"],)
    jump_values = pick("jump") or ([ssh_options["ProxyJump"]] if "ProxyJump" in ssh_options else [])
    jump = parse_jump(jump_values)

    interval_raw = pick("keepalive_interval")
    keepalive_interval = _number("--keepalive-interval", interval_raw, DEFAULT_KEEPALIVE_INTERVAL)
    if cli["keepalive_interval"] is None and "ServerAliveInterval" in ssh_options:
        keepalive_interval = _number("-o ServerAliveInterval", ssh_options["ServerAliveInterval"], 0.0)
    count_raw = pick("keepalive_count_max")
    if cli["keepalive_count_max"] is None and "ServerAliveCountMax" in ssh_options:
        count_raw = ssh_options["ServerAliveCountMax"]
    count_raw = _or(count_raw, DEFAULT_KEEPALIVE_COUNT_MAX)
    keepalive_count_max = _int_option("--keepalive-count-max", count_raw, minimum=1)
    retry_initial = _number("--retry-initial", pick("retry_initial"), DEFAULT_RETRY_INITIAL, positive=True)
    retry_max_delay = _number(
        "--retry-max-delay", pick("retry_max_delay"), DEFAULT_RETRY_MAX_DELAY, positive=True
    )
    if retry_max_delay < retry_initial:
        raise UsageError(
            f"--retry-max-delay ({retry_max_delay:g}) is below --retry-initial ({retry_initial:g})"
        )

    ssh_config = pick("ssh_config")
    state_dir = pick("state_dir")
    return Settings(
        vpn=vpn,
        destination=destination,
        host=host,
        port=port,
        user=user,
        identities=identities,
        ssh_config=Path(_nonempty("-F/--ssh-config", ssh_config)).expanduser() if ssh_config else None,
        jump=jump,
        ssh_options=tuple((k, v) for k, v in ssh_options.items() if k in _PASSED_SSH_OPTIONS),
        vpn_dns=parse_dns(_or(pick("vpn_dns"), "remote")),
        vpn_exclude=tuple(parse_exclude(c) for c in (pick("vpn_exclude") or [])),
        vpn_mtu=_int_option("--vpn-mtu", _or(pick("vpn_mtu"), DEFAULT_MTU), minimum=MIN_MTU, maximum=MAX_MTU),
        vpn_tun=parse_tun_name(_or(pick("vpn_tun"), DEFAULT_TUN)),
        vpn_cleanup=cleanup,
        vpn_kill_switch=bool(pick("vpn_kill_switch")),
        keepalive_interval=keepalive_interval,
        keepalive_count_max=keepalive_count_max,
        retry_max=parse_retry_max(pick("retry_max")),
        retry_initial=retry_initial,
        retry_max_delay=retry_max_delay,
        ssh_connections=parse_ssh_connections(pick("ssh_connections")),
        dynamic=dynamic,
        socks_username=_nonempty("socks-username", socks_username) if socks_username is not None else None,
        socks_password=_nonempty("socks-password", socks_password) if socks_password is not None else None,
        allow_lan=bool(pick("allow_lan")),
        agent_reattach_grace=_number(
            "--agent-reattach-grace", pick("agent_reattach_grace"), DEFAULT_REATTACH_GRACE
        ),
        vpn_buffer_budget=_int_option(
            "--vpn-buffer-budget",
            _or(pick("vpn_buffer_budget"), DEFAULT_BUFFER_BUDGET_MIB),
            minimum=4,
            maximum=65536,
        ),
        config=config_path,
        state_dir=Path(state_dir).expanduser() if state_dir else DEFAULT_STATE_DIR,
        verbose=verbose,
        quiet=quiet,
    )


def parse_ssh_connections(value: Any) -> int | None:
    """`--ssh-connections`: a count from 1 to 64, or "auto" (None)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    return _int_option("--ssh-connections", value, minimum=1, maximum=64)


def parse_listen(spec: str) -> tuple[str, int]:
    """`[bind_address:]port` as OpenSSH's -D spells it. No address: "localhost"; "" or "*": all interfaces
    (returned as ""). IPv6 addresses in brackets: `[::1]:1080`."""
    text = spec.strip()
    host = "localhost"
    if text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UsageError(f"bad -D {spec!r}: expected [bind_address:]port")
        host, text = inside, rest[1:]
    elif ":" in text:
        host, _, text = text.rpartition(":")
        if ":" in host:
            raise UsageError(f"bad -D {spec!r}: put an IPv6 bind address in brackets, e.g. [::1]:1080")
        host = "" if host == "*" else host
    if not text.isdigit() or not 0 < int(text) <= 0xFFFF:
        raise UsageError(f"bad -D {spec!r}: the port must be 1 to 65535")
    return host, int(text)


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML config file into underscore-named keys; unknown keys and bad syntax are UsageErrors."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from e
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _CONFIG_KEYS:
            raise UsageError(f"config file {path}: unknown setting {key!r}")
        if name in _CONFIG_LIST_KEYS and isinstance(value, str):
            value = [value]
        if name in _CONFIG_LIST_KEYS and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise UsageError(f"config file {path}: {key!r} must be a string or a list of strings")
        if name in ("vpn_kill_switch", "quiet") and not isinstance(value, bool):
            raise UsageError(f"config file {path}: {key!r} must be true or false")
        if isinstance(value, dict) and name != "option":
            raise UsageError(f"config file {path}: {key!r} must not be a table")
        values[name] = value
    return values


def parse_destination(text: str) -> tuple[str | None, str, int | None]:
    """Split `[user@]host[:port]`, `[user@][v6addr]:port`, a bare IPv6 literal or `ssh://...` into parts."""
    rest = text.strip()
    if rest.startswith("ssh://"):
        rest = rest.removeprefix("ssh://").rstrip("/")
    user, at, hostport = rest.rpartition("@")
    if not at:
        user = None
    elif not user:
        raise UsageError(f"destination {text!r}: empty user name before '@'")
    port_text = None
    if hostport.startswith("["):
        host, bracket, after = hostport[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise UsageError(f"destination {text!r}: expected [IPv6-address] or [IPv6-address]:port")
        port_text = after[1:] if after else None
    elif hostport.count(":") == 1:
        host, _, port_text = hostport.partition(":")
    else:
        host = hostport  # a name, an IPv4 address or a bare IPv6 literal (several colons, no port)
    if not host or any(c.isspace() for c in host) or host.startswith("-"):
        raise UsageError(f"destination {text!r}: missing or invalid host")
    port = _port("destination port", port_text) if port_text is not None else None
    return user, host, port


def parse_jump(values: Iterable[str]) -> tuple[str, ...]:
    """`-J a,b -J c` → ("a", "b", "c"); each hop is [user@]host[:port] (validated like a destination)."""
    hops: list[str] = []
    for value in values:
        for hop in value.split(","):
            hop = hop.strip()
            if not hop:
                raise UsageError(f"-J/--jump {value!r}: empty hop")
            parse_destination(hop)
            hops.append(hop)
    if [h.lower() for h in hops] == ["none"]:
        return ()  # OpenSSH's "-J none" disables a ProxyJump from ssh_config
    return tuple(hops)


def parse_dns(value: Any) -> DnsSetting:
    """`remote`, `off` or an IP address of a DNS server (reached through the tunnel)."""
    if not isinstance(value, str):
        raise UsageError("--vpn-dns must be remote, off or an IP address")
    lowered = value.strip().lower()
    if lowered == "remote":
        return "remote"
    if lowered == "off":
        return "off"
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise UsageError(f"--vpn-dns {value!r}: expected remote, off or an IP address") from None


def parse_exclude(value: Any) -> IPNetwork:
    """A v4/v6 CIDR to keep off the tunnel. Host bits are cleared (with a warning); an address is a host."""
    network = _parse_cidr(value)
    if network.prefixlen == 0:
        raise UsageError(f"--vpn-exclude {value!r} would exclude everything from the tunnel")
    return network


def _parse_cidr(value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise UsageError(f"--vpn-exclude {value!r}: expected a CIDR such as 198.18.0.0/15")
    try:
        strict = ipaddress.ip_network(value.strip())
    except ValueError:
        try:
            network = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise UsageError(
                f"--vpn-exclude {value!r}: not a CIDR (expected e.g. 198.18.0.0/15 or fd00::/8)"
            ) from None
        log.warning("--vpn-exclude %s has host bits set; excluding the network %s", value, network)
        return network
    return strict


def parse_tun_name(value: Any) -> str:
    """A Linux interface name: 1..15 characters of letters, digits, '_', '.', '-'."""
    if not isinstance(value, str) or not _TUN_NAME.fullmatch(value) or value in (".", ".."):
        raise UsageError(
            f"--vpn-tun {value!r}: expected 1 to 15 characters of letters, digits, '_', '.' or '-'"
        )
    return value


def parse_retry_max(value: Any) -> int | None:
    """A number of reconnect attempts (0 = never reconnect) or `forever`/None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("forever", "inf", "infinite")):
        return None
    return _int_option("--retry-max", value, minimum=0)


def _parse_ssh_options(from_file: Any, from_cli: list[str] | None) -> dict[str, str]:
    options: dict[str, str] = {}
    if isinstance(from_file, dict):
        items = [(str(k), v) for k, v in from_file.items()]
    else:
        file_list = [from_file] if isinstance(from_file, str) else (from_file or [])
        items = [_split_ssh_option(text) for text in file_list]
    items += [_split_ssh_option(text) for text in (from_cli or [])]
    for key, value in items:
        name = _SSH_OPTION_NAMES.get(key.lower())
        if name is None:
            supported = ", ".join(_FOLDED_SSH_OPTIONS + _PASSED_SSH_OPTIONS)
            raise UsageError(f"-o {key}: unsupported option (supported: {supported})")
        if isinstance(value, bool):
            value = "yes" if value else "no"
        if not isinstance(value, (str, int, float)):
            raise UsageError(f"-o {name}: value must be a string")
        options[name] = _check_ssh_option(name, str(value).strip())
    return options


def _split_ssh_option(text: Any) -> tuple[str, str]:
    if not isinstance(text, str):
        raise UsageError(f"-o {text!r}: expected KEY=VALUE")
    key, sep, value = text.partition("=")
    if not sep:  # OpenSSH also accepts "Key Value"
        key, _, value = text.strip().partition(" ")
    if not key.strip() or not value.strip():
        raise UsageError(f"-o {text!r}: expected KEY=VALUE")
    return key.strip(), value


def _check_ssh_option(name: str, value: str) -> str:
    if name == "StrictHostKeyChecking" and value.lower() not in _STRICT_HOST_KEY_VALUES:
        allowed = ", ".join(_STRICT_HOST_KEY_VALUES)
        raise UsageError(f"-o StrictHostKeyChecking={value}: expected one of {allowed}")
    if name == "IdentitiesOnly" and value.lower() not in _YES_NO:
        raise UsageError(f"-o IdentitiesOnly={value}: expected yes or no")
    if name in ("ConnectTimeout", "ServerAliveInterval"):
        _number(f"-o {name}", value, 0.0)
    if name == "ServerAliveCountMax":
        _int_option(f"-o {name}", value, minimum=1)
    if name == "Port":
        _port("-o Port", value)
    return value.lower() if name in ("StrictHostKeyChecking", "IdentitiesOnly") else value


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _port(option: str, value: Any) -> int:
    return _int_option(option, value, minimum=1, maximum=65535)


def _nonempty(option: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{option}: expected a non-empty string")
    return value.strip()


def _int_option(option: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise UsageError(f"{option} {value!r}: expected a whole number")
    try:
        number = int(str(value).strip(), 10) if not isinstance(value, int) else value
    except ValueError:
        raise UsageError(f"{option} {value!r}: expected a whole number") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        bounds = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise UsageError(f"{option} {number}: out of range ({bounds})")
    return number


def _number(option: str, value: Any, default: float, positive: bool = False) -> float:
    if value is None:
        return default
    if isinstance(value, bool):
        raise UsageError(f"{option} {value!r}: expected a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{option} {value!r}: expected a number of seconds") from None
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        kind = "positive" if positive else "non-negative"
        raise UsageError(f"{option} {value!r}: expected a {kind} number of seconds")
    return number
