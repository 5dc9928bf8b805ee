"""The privileged helper's wire protocol: a closed list of requests, each validated before it is acted on.

The user side (SSH, asyncssh, lwIP parsing untrusted packets) asks; the root helper acts. They share one
AF_UNIX SOCK_SEQPACKET socketpair: one JSON object per datagram (the socket keeps message boundaries, so there
is no framing to get wrong), at most MAX_MESSAGE bytes. A reply may carry one file descriptor (SCM_RIGHTS):
the TUN device, or a socket that carries x2ssh's firewall mark.

Request:  {"op": NAME, "args": {...}}
Reply:    {"ok": true, "result": {...}}  or  {"ok": false, "error": "what went wrong", "code": EXIT_CODE}

`validate()` is pure and shared by both sides: the user side fails fast on its own mistakes, the helper never
trusts that it did. Anything not in `REQUESTS`, an unknown or missing argument, a wrong type, a value out of
range: refused with a reason, nothing changed.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from typing import Any

from x2ssh.errors import X2sshError

PROTOCOL_VERSION = 1
MAX_MESSAGE = 16384
MAX_EXCLUDES = 256
MAX_ADDRESSES = 16
TUN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


class RequestRejected(X2sshError):
    """The privileged helper refused a request: not in its closed list, malformed, or out of order."""

    exit_code = 77  # EX_NOPERM


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise RequestRejected(f"{name} must be true or false")
    return value


def _int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestRejected(f"{name} must be an integer from {low} to {high}")
    return value


def _tun(value: Any, name: str) -> str:
    if not isinstance(value, str) or not TUN_NAME.fullmatch(value):
        raise RequestRejected(f"{name} must be an interface name ([A-Za-z0-9_.-], 1 to 15 characters)")
    return value


def _choice(*allowed: Any) -> Callable[[Any, str], Any]:
    def check(value: Any, name: str) -> Any:
        if isinstance(value, bool) or value not in allowed:
            raise RequestRejected(f"{name} must be one of {', '.join(map(str, allowed))}")
        return value

    return check


def _list_of(item: Callable[[str], Any], limit: int, what: str) -> Callable[[Any, str], list[str]]:
    def check(value: Any, name: str) -> list[str]:
        if not isinstance(value, list) or len(value) > limit:
            raise RequestRejected(f"{name} must be a list of at most {limit} {what}")
        out = []
        for entry in value:
            if not isinstance(entry, str) or len(entry) > 64:
                raise RequestRejected(f"{name}: not {what}: {str(entry)[:64]!r}")
            try:
                out.append(str(item(entry)))
            except ValueError:
                raise RequestRejected(f"{name}: not {what}: {entry!r}") from None
        return out

    return check


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=True)


_NETWORKS = _list_of(_network, MAX_EXCLUDES, "CIDR networks")
_ADDRESSES = _list_of(ipaddress.ip_address, MAX_ADDRESSES, "IP addresses")

REQUESTS: dict[str, dict[str, Callable[[Any, str], Any]]] = {
    # The run's fixed parameters; takes the lock, undoes what crashed runs left, checks the kill switch.
    "start": {
        "version": lambda v, n: _int(v, n, PROTOCOL_VERSION, PROTOCOL_VERSION),
        "tun": _tun,
        "mtu": lambda v, n: _int(v, n, 1280, 65535),
        "excludes": _NETWORKS,
        "kill_switch": _bool,
    },
    "open_tun": {},  # -> the TUN fd; name and MTU come from "start"
    "marked_socket": {"family": _choice(4, 6), "type": _choice("stream", "dgram")},  # -> a socket fd
    "routes": {"bypass": _ADDRESSES},  # bypass is used only by the split-route fallback
    "dns": {"servers": _list_of(ipaddress.ip_address, 3, "IP addresses")},
    "kill_switch": {},
    "run_dir": {"uid": lambda v, n: _int(v, n, 0, 2**31 - 1)},  # -> the run's directory, owned by uid
    "status": {},
    "cleanup": {},  # undo what crashed runs left behind (for --vpn-cleanup), then nothing else
    "down": {},  # undo everything, answer, exit
}


def validate(message: Any) -> tuple[str, dict[str, Any]]:
    """Check a decoded request against the closed list; returns (op, normalised args) or raises."""
    if not isinstance(message, dict) or set(message) - {"op", "args"}:
        raise RequestRejected("a request is an object with 'op' and 'args'")
    op = message.get("op")
    if not isinstance(op, str) or op not in REQUESTS:
        raise RequestRejected(f"unknown request {str(op)[:40]!r}")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise RequestRejected(f"{op}: 'args' must be an object")
    spec = REQUESTS[op]
    unknown = set(args) - set(spec)
    if unknown:
        raise RequestRejected(f"{op}: unknown argument {sorted(map(str, unknown))[0][:40]!r}")
    missing = set(spec) - set(args)
    if missing:
        raise RequestRejected(f"{op}: missing argument {sorted(missing)[0]!r}")
    return op, {name: check(args[name], f"{op}.{name}") for name, check in spec.items()}


def encode(message: dict[str, Any]) -> bytes:
    """One message as bytes; raises ValueError if it would not fit one datagram."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> Any:
    """Bytes of one datagram to a JSON value; raises RequestRejected if it is not JSON."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise RequestRejected("a message must be one JSON object") from None
