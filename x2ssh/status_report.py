"""The status document of a running x2ssh: its stable JSON schema, a checker, a table and a one-line summary.

`x2ssh status --json` prints this document as the running x2ssh returned it over the control socket.
Schema version 1. Keys are never renamed or removed within a version; new keys may be added, so readers
must ignore keys they do not know. Counts are integers, durations seconds, sizes bytes.

- `schema` (int): 1.
- `state` (str): "connecting", "up", "reconnecting" or "stopping".
- `state_detail` (str or null): free text about the state, e.g. "attempt 3, next in 8 s".
- `server` (object): `name` (str, as given: host or ssh_config alias), `address` (str: the IP in use, or
  null), `port` (int or null).
- `ssh_connections` (list of objects): the SSH connection pool, one object per open connection: `label`
  (str), `channels` (int, open now), `up_s` (number, seconds since it connected).
- `tun` (object or null before the TUN exists): `name` (str), `mtu` (int).
- `routing` (str): how traffic reaches the TUN, e.g. "policy (fwmark)".
- `dns` (object): `mode` (str: "remote", "off" or a server address), `backend` (str: how DNS is set, e.g.
  "resolved" or "resolv.conf"; null when off).
- `kill_switch` (bool): whether the kill switch is on.
- `tcp` (object): `open` (int, now), `total` (int, opened since start), `refused` (int), `failed` (int).
- `udp` (object): `flows` (int, now).
- `agent` (object): `transport` (str: "socket" or "stdio"; null: no agent, so no UDP, DNS over TCP).
- `bytes` (object): `up`, `down` (int): bytes since start.
- `rates` (object): `up_bps`, `down_bps` (number): bits per second over the last few seconds.
- `reconnects` (int): SSH reconnections since start.
- `proxy` (str or null; absent from runs older than it): the -D proxy's listening addresses, e.g.
  "127.0.0.1:1080"; null when none runs. Its clients and bytes are counted in `tcp` and `bytes`.
- `pid` (int): the x2ssh process, in its own PID namespace.
- `version` (str): x2ssh's version.

Example:
    {"schema": 1, "state": "up", "state_detail": null,
     "server": {"name": "vpn", "address": "198.18.0.1", "port": 22},
     "ssh_connections": [{"label": "ssh#1", "channels": 12, "up_s": 3605.2}],
     "tun": {"name": "x2ssh0", "mtu": 65000}, "routing": "policy (fwmark)",
     "dns": {"mode": "remote", "backend": "resolv.conf"}, "kill_switch": false,
     "tcp": {"open": 12, "total": 340, "refused": 2, "failed": 0}, "udp": {"flows": 3},
     "agent": {"transport": "socket"}, "bytes": {"up": 1048576, "down": 73400320},
     "rates": {"up_bps": 12000.0, "down_bps": 880000.0}, "reconnects": 1, "pid": 4242, "version": "0.1.0"}
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from x2ssh.status import human_bytes

SCHEMA_VERSION = 1
STATES = ("connecting", "up", "reconnecting", "stopping")

# key -> expected type, or for objects: sub-key -> expected type(s). `None` in a tuple allows null.
_INT = (int,)
_NUM = (int, float)
_OBJECTS: dict[str, dict[str, tuple[type | None, ...]]] = {
    "server": {"name": (str,), "address": (str, None), "port": (int, None)},
    "dns": {"mode": (str,), "backend": (str, None)},
    "tcp": {"open": _INT, "total": _INT, "refused": _INT, "failed": _INT},
    "udp": {"flows": _INT},
    "agent": {"transport": (str, None)},
    "bytes": {"up": _INT, "down": _INT},
    "rates": {"up_bps": _NUM, "down_bps": _NUM},
}
_SCALARS: dict[str, tuple[type | None, ...]] = {
    "schema": _INT,
    "state": (str,),
    "state_detail": (str, None),
    "routing": (str,),
    "kill_switch": (bool,),
    "reconnects": _INT,
    "pid": _INT,
    "version": (str,),
}
_CONNECTION = {"label": (str,), "channels": _INT, "up_s": _NUM}
_TUN = {"name": (str,), "mtu": _INT}


def split_state(text: str) -> tuple[str, str | None]:
    """The session's state text as (`state`, `state_detail`): "reconnecting (attempt 3, next in 8 s)" ->
    ("reconnecting", "attempt 3, next in 8 s"); "up" -> ("up", None)."""
    head, sep, rest = text.partition(" (")
    head = head.strip()
    detail = rest[:-1] if sep and rest.endswith(")") else rest if sep else ""
    return head, detail.strip() or None


def check_status(data: Any) -> list[str]:
    """What is wrong with a status document (missing keys, wrong types); empty when it fits schema 1."""
    if not isinstance(data, dict):
        return ["the status is not a JSON object"]
    problems = []
    for key, types in _SCALARS.items():
        problems += _check(data, key, types, key)
    if data.get("state") not in STATES:
        problems.append(f"state must be one of {', '.join(STATES)}")
    for key, fields in _OBJECTS.items():
        problems += _check_object(data.get(key), fields, key)
    if "tun" not in data:
        problems.append("tun is missing")
    elif data["tun"] is not None:
        problems += _check_object(data["tun"], _TUN, "tun")
    connections = data.get("ssh_connections")
    if not isinstance(connections, list):
        problems.append("ssh_connections must be a list")
    else:
        for i, conn in enumerate(connections):
            problems += _check_object(conn, _CONNECTION, f"ssh_connections[{i}]")
    return problems


def _check_object(value: Any, fields: dict[str, tuple[type | None, ...]], where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where} must be an object"]
    problems = []
    for key, types in fields.items():
        problems += _check(value, key, types, f"{where}.{key}")
    return problems


def _check(obj: dict[str, Any], key: str, types: tuple[type | None, ...], where: str) -> list[str]:
    if key not in obj:
        return [f"{where} is missing"]
    value = obj[key]
    if value is None:
        return [] if None in types else [f"{where} must not be null"]
    wanted = tuple(t for t in types if t is not None)
    if isinstance(value, bool) and bool not in wanted:  # bool is an int subclass: true is not a count
        return [f"{where} must be {' or '.join(t.__name__ for t in wanted)}"]
    if not isinstance(value, wanted):
        return [f"{where} must be {' or '.join(t.__name__ for t in wanted)}"]
    return []


def human_bits(bps: float) -> str:
    """Bits per second, in Mbit/s."""
    return f"{bps / 1e6:.1f} Mbit/s"


def human_duration(seconds: float) -> str:
    """3725 -> '1h 2m'; 42 -> '42s'."""
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{s}s"


def _obj(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def server_text(data: dict[str, Any]) -> str:
    """'name (address port N)' from the `server` object."""
    server = _obj(data, "server")
    text = str(server.get("name") or "?")
    where = " ".join(
        part
        for part in (
            str(server["address"]) if server.get("address") else "",
            f"port {server['port']}" if server.get("port") else "",
        )
        if part
    )
    return f"{text} ({where})" if where else text


def render_status(data: dict[str, Any]) -> Table:
    """A rich table of a status document; tolerant of missing keys (a newer or older x2ssh)."""
    state = str(data.get("state", "?"))
    detail = data.get("state_detail")
    colour = "green" if state == "up" else "red" if state == "stopping" else "yellow"
    table = Table(title=f"x2ssh — {server_text(data)}", show_header=False, expand=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("state", f"[{colour}]{state}[/{colour}]" + (f" ({detail})" if detail else ""))
    connections = data.get("ssh_connections") or []
    lines = [
        f"{c.get('label', '?')}: {c.get('channels', 0)} channels, up {human_duration(c.get('up_s') or 0)}"
        for c in connections
        if isinstance(c, dict)
    ]
    table.add_row("SSH connections", "\n".join(lines) or "none")
    tun = _obj(data, "tun")
    table.add_row("TUN", f"{tun.get('name')}, MTU {tun.get('mtu')}" if tun else "not up")
    table.add_row("routing", str(data.get("routing", "?")))
    dns = _obj(data, "dns")
    backend = dns.get("backend")
    table.add_row("DNS", f"{dns.get('mode', '?')}" + (f" (via {backend})" if backend else ""))
    table.add_row("kill switch", "on" if data.get("kill_switch") else "off")
    proxy = data.get("proxy")
    if proxy:
        table.add_row("proxy", f"SOCKS5 and HTTP CONNECT on {proxy}")
    tcp = _obj(data, "tcp")
    table.add_row(
        "TCP flows",
        f"{tcp.get('open', 0)} open, {tcp.get('total', 0)} total, {tcp.get('refused', 0)} refused, "
        f"{tcp.get('failed', 0)} failed",
    )
    table.add_row("UDP flows", str(_obj(data, "udp").get("flows", 0)))
    transport = _obj(data, "agent").get("transport")
    table.add_row("agent", f"running ({transport})" if transport else "not running (UDP off, DNS over TCP)")
    total, rates = _obj(data, "bytes"), _obj(data, "rates")
    table.add_row("upload", f"{human_bytes(total.get('up', 0))}  {human_bits(rates.get('up_bps', 0))}")
    table.add_row("download", f"{human_bytes(total.get('down', 0))}  {human_bits(rates.get('down_bps', 0))}")
    table.add_row("reconnects", str(data.get("reconnects", 0)))
    table.add_row("process", f"pid {data.get('pid', '?')}, x2ssh {data.get('version', '?')}")
    return table


def status_line(data: dict[str, Any]) -> str:
    """One line for systemd's STATUS= (state, server, flows, reconnects)."""
    state = str(data.get("state", "?"))
    detail = data.get("state_detail")
    tcp, udp = _obj(data, "tcp"), _obj(data, "udp")
    return (
        f"{state}{f' ({detail})' if detail else ''}, server {server_text(data)}, "
        f"TCP {tcp.get('open', 0)} open / {tcp.get('total', 0)} total, UDP {udp.get('flows', 0)} flows, "
        f"{data.get('reconnects', 0)} reconnects"
    )
