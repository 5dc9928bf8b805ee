"""The control socket with real Unix sockets in a temporary directory: status and down answered, bad requests
answered with errors, the socket file's mode and removal, peers of another user refused (a real process
running as `nobody` where we are root), and `x2ssh status` / `x2ssh down` exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from x2ssh import control
from x2ssh.control import (
    ControlDenied,
    ControlFailed,
    ControlNotRunning,
    ControlServer,
    ControlSocketBusy,
    RequestError,
    control_dir,
    control_socket_path,
    exchange_sync,
    parse_reply,
    parse_request,
    peer_allowed,
    request,
    request_sync,
    start_control,
)
from x2ssh.host.journal import current_netns_identity
from x2ssh.status_command import main_down, main_status, process_alive
from x2ssh.status_report import check_status, render_status, split_state, status_line

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534


def sample_status(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": 1,
        "state": "up",
        "state_detail": None,
        "server": {"name": "vpn.example", "address": "198.18.0.1", "port": 22},
        "ssh_connections": [{"label": "ssh#1", "channels": 12, "up_s": 3605.2, "bound": None}],
        "tun": {"name": "x2ssh0", "mtu": 65000},
        "routing": "policy (fwmark)",
        "dns": {"mode": "remote", "backend": "resolv.conf"},
        "kill_switch": False,
        "tcp": {"open": 12, "total": 340, "refused": 2, "failed": 0},
        "udp": {"flows": 3},
        "agent": {"transport": "socket"},
        "bytes": {"up": 1048576, "down": 73400320},
        "rates": {"up_bps": 12000.0, "down_bps": 880000.0},
        "reconnects": 1,
        "pid": os.getpid(),
        "version": "0.1.0",
    }
    doc.update(changes)
    return doc


class Calls:
    def __init__(self) -> None:
        self.down = 0

    def on_down(self) -> None:
        self.down += 1


@contextlib.asynccontextmanager
async def serving(
    path: Path,
    status: Callable[[], dict[str, Any]] = sample_status,
    allowed: set[int] | None = None,
    calls: Calls | None = None,
) -> AsyncIterator[ControlServer]:
    calls = calls or Calls()
    server = ControlServer(path, status, calls.on_down, {os.getuid()} if allowed is None else allowed)
    async with server:
        yield server


async def raw_exchange(path: Path, payload: bytes, *, shut: bool = False) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(payload)
    await writer.drain()
    if shut:
        writer.write_eof()
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    await writer.wait_closed()
    return json.loads(line)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


# -- the protocol ---------------------------------------------------------------------------------------


def test_status_request_is_answered(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def go() -> None:
        async with serving(path):
            got = await request(path, "status")
            assert got == sample_status()
            assert check_status(got) == []
            loop = asyncio.get_running_loop()
            exchange = await loop.run_in_executor(None, lambda: exchange_sync(path, "status"))
            assert exchange.result == sample_status()
            assert exchange.server_pid == os.getpid()  # SO_PEERCRED of the server, seen by the client

    run(go())


def test_down_request_calls_the_callback_once_per_request(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    calls = Calls()

    async def go() -> None:
        async with serving(path, calls=calls):
            assert await request(path, "down") == {"stopping": True}
            assert calls.down == 1
            assert await request(path, "status") == sample_status()  # status does not stop anything
            assert calls.down == 1

    run(go())


def test_socket_is_0600_and_removed_on_close(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def go() -> None:
        async with serving(path):
            st = os.lstat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert sorted(p.name for p in tmp_path.iterdir()) == ["control.sock"]  # no temporary left
        assert not path.exists()

    run(go())


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"hello\n", "request is not JSON"),
        (b"[1, 2]\n", 'request must be {"op": NAME}'),
        (b'{"op": "status", "x": 1}\n', 'request must be {"op": NAME}'),
        (b'{"op": "reboot"}\n', "unknown op 'reboot'"),
        (b'{"op": ["down"]}\n', "unknown op"),
        (b"\xff\xfe\n", "request is not JSON"),
        (b"\n", "empty request"),
        (b'{"op": "status"}' + b" " * 5000 + b"\n", "request longer than 1024 bytes"),
    ],
)
def test_malformed_requests_get_an_error_and_the_server_keeps_serving(
    tmp_path: Path, payload: bytes, error: str
) -> None:
    path = tmp_path / "control.sock"
    calls = Calls()

    async def go() -> None:
        async with serving(path, calls=calls):
            reply = await raw_exchange(path, payload)
            assert reply["ok"] is False
            assert error in reply["error"]
            assert await request(path, "status") == sample_status()
        assert calls.down == 0

    run(go())


@given(st.binary(max_size=300) | st.text(max_size=100).map(str.encode))
def test_any_request_bytes_give_an_op_or_a_request_error(line: bytes) -> None:
    with contextlib.suppress(RequestError):
        assert parse_request(line) in control.OPS


def test_clients_beyond_the_limit_are_dropped_and_service_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_CLIENTS", 3)
    path = tmp_path / "control.sock"

    async def go() -> None:
        async with serving(path):
            idle = [await asyncio.open_unix_connection(str(path)) for _ in range(3)]
            await asyncio.sleep(0.1)  # let the server accept them
            with pytest.raises(ControlFailed):  # closed at once: no answer, or a reset
                await request(path, "status")
            for _, writer in idle:
                writer.close()
                await writer.wait_closed()
            for _ in range(100):  # the idle ones are served (an "empty request" error) and gone
                try:
                    assert await request(path, "status") == sample_status()
                    break
                except ControlFailed:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the server did not resume serving")

    run(go())


def test_request_without_newline_at_eof_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def go() -> None:
        async with serving(path):
            assert await raw_exchange(path, b'{"op":"status"}', shut=True) == {
                "ok": True,
                "result": sample_status(),
            }

    run(go())


def test_silent_client_is_dropped_with_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.2)
    path = tmp_path / "control.sock"

    async def go() -> None:
        async with serving(path):
            reply = await raw_exchange(path, b"")
            assert reply == {"ok": False, "error": "no request within 0.2 s"}

    run(go())


def test_failing_callbacks_become_error_replies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "control.sock"

    def broken_status() -> dict[str, Any]:
        raise RuntimeError("pool not ready")

    class BrokenDown(Calls):
        def on_down(self) -> None:
            raise RuntimeError("already stopping")

    async def go() -> None:
        async with serving(path, status=broken_status, calls=BrokenDown()):
            with pytest.raises(ControlFailed, match="status unavailable: pool not ready"):
                await request(path, "status")
            with pytest.raises(ControlFailed, match="cannot stop: already stopping"):
                await request(path, "down")

    run(go())


def test_unserialisable_status_is_an_error_reply(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def go() -> None:
        async with serving(path, status=lambda: {"bytes": b"raw"}):
            with pytest.raises(ControlFailed, match="status unavailable"):
                await request(path, "status")
        async with serving(path, status=lambda: {"rate": float("nan")}):
            with pytest.raises(ControlFailed, match="status unavailable"):
                await request(path, "status")

    run(go())


def test_stale_socket_of_a_dead_run_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: what a killed run leaves behind

    async def go() -> None:
        async with serving(path):
            assert await request(path, "status") == sample_status()

    run(go())


def test_second_server_on_a_live_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def go() -> None:
        async with serving(path):
            with pytest.raises(ControlSocketBusy, match="another x2ssh already answers"):
                await ControlServer(path, sample_status, lambda: None, set()).start()
            assert await request(path, "status") == sample_status()  # the first one is untouched

    run(go())


def test_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("precious")

    async def go() -> None:
        with pytest.raises(ControlSocketBusy, match="not a socket"):
            await ControlServer(path, sample_status, lambda: None, set()).start()

    run(go())
    assert path.read_text() == "precious"


def test_close_leaves_a_successors_socket(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def go() -> None:
        server = ControlServer(path, sample_status, lambda: None, set())
        await server.start()
        path.unlink()
        successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        successor.bind(str(path))
        await server.close()
        assert path.exists()
        successor.close()

    run(go())


def test_missing_directory_is_an_os_error(tmp_path: Path) -> None:
    async def go() -> None:
        with pytest.raises(FileNotFoundError):
            await ControlServer(
                tmp_path / "nope" / "control.sock", sample_status, lambda: None, set()
            ).start()

    run(go())


# -- start_control: how every front end starts its socket ----------------------------------------------


def test_start_control_serves_in_the_directory_given(tmp_path: Path) -> None:
    calls = Calls()

    async def directory() -> Path:
        return tmp_path

    async def go() -> None:
        server = await start_control(directory, sample_status, calls.on_down)
        assert server is not None and server.path == tmp_path / control.SOCKET_NAME
        try:
            assert await request(server.path, "status") == sample_status()
            assert (await request(server.path, "down")) == {"stopping": True}
            assert calls.down == 1
        finally:
            await server.close()
        assert not server.path.exists()

    run(go())


def test_start_control_without_a_directory_goes_on_without_a_socket(tmp_path: Path) -> None:
    async def no_directory() -> Path:
        raise OSError("no run directory here")

    async def missing() -> Path:
        return tmp_path / "nope"

    assert run(start_control(no_directory, sample_status, lambda: None)) is None
    assert run(start_control(missing, sample_status, lambda: None)) is None


def test_start_control_attempts_nothing_on_windows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Windows has no AF_UNIX with peer uids: the directory is not even asked for (os.getuid is missing
    there). The static side (no unguarded os.getuid on a front end's import path for win32) is
    tests/unit/test_windows_typecheck.py."""
    asked: list[str] = []

    async def directory() -> Path:
        asked.append("directory")
        return tmp_path

    monkeypatch.setattr(control.sys, "platform", "win32")
    assert run(start_control(directory, sample_status, lambda: None)) is None
    assert asked == [] and list(tmp_path.iterdir()) == []


# -- credentials --------------------------------------------------------------------------------------


def test_peer_allowed() -> None:
    assert peer_allowed(0, frozenset())
    assert peer_allowed(1000, {1000})
    assert not peer_allowed(1001, {1000})
    assert not peer_allowed(NOBODY, set())


def test_permission_denied_reply_is_a_typed_error() -> None:
    with pytest.raises(ControlDenied):
        parse_reply(b'{"ok": false, "error": "permission denied"}\n')
    with pytest.raises(ControlFailed):
        parse_reply(b'{"ok": false, "error": "other"}\n')
    for bad in (b"", b"nope", b"[]", b'{"ok": "yes"}', b'{"ok": true, "result": 3}'):
        with pytest.raises(ControlFailed):
            parse_reply(bad)
    assert parse_request(b'{"op": "down"}') == "down"


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv(1) to run a client as another user",
)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory `nobody` can enter (pytest's tmp_path is 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="x2ssh-control-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def client_as_nobody(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        sys.executable,
        "-m",
        "x2ssh.status_command",
        *args,
        cwd="/",
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@needs_root
def test_other_user_is_refused_by_peer_credentials(
    shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The socket is reachable and writable for everyone here, so only SO_PEERCRED stands in the way."""
    path = shared_dir / "control.sock"
    calls = Calls()

    async def go() -> None:
        async with serving(path, allowed={1000}, calls=calls):
            path.chmod(0o666)
            code, out, err = await client_as_nobody("status", "--json", "--socket", str(path))
            assert (code, out) == (77, "")
            assert "permission denied: this x2ssh was started by another user" in err  # the server's reply
            code, _, err = await client_as_nobody("down", "--socket", str(path))
            assert code == 77
            assert "permission denied" in err
            assert await request(path, "status") == sample_status()  # root is always allowed

    run(go())
    assert calls.down == 0
    assert sum(f"refused uid {NOBODY}" in r.getMessage() for r in caplog.records) == 2


@needs_root
def test_allowed_user_gets_the_status(shared_dir: Path) -> None:
    path = shared_dir / "control.sock"

    async def go() -> None:
        async with serving(path, allowed={NOBODY}):
            path.chmod(0o666)
            code, out, err = await client_as_nobody("status", "--json", "--socket", str(path))
            assert (code, err) == (0, "")
            assert json.loads(out) == sample_status()

    run(go())


@needs_root
def test_other_user_cannot_reach_a_socket_in_a_private_directory(shared_dir: Path) -> None:
    """What /run/x2ssh/<key>/ (0700, owned by the run's user) does before any credential check."""
    private = shared_dir / "ns"
    private.mkdir(mode=0o700)
    path = private / "control.sock"

    async def go() -> None:
        async with serving(path, allowed={NOBODY}):
            code, out, err = await client_as_nobody("status", "--socket", str(path))
            assert (code, out) == (77, "")
            assert f"permission denied on {path}" in err  # EACCES at connect: the server never saw it

    run(go())


# -- x2ssh status / x2ssh down ------------------------------------------------------------------------


def test_status_without_a_running_x2ssh_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_status(["--socket", str(tmp_path / "control.sock")]) == 3
    assert "no x2ssh is running in this network namespace" in capsys.readouterr().err
    assert main_status(["--json", "--socket", str(tmp_path / "missing-dir" / "control.sock")]) == 3
    assert main_down(["--socket", str(tmp_path / "control.sock")]) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no x2ssh is running in this network namespace" in captured.err


def test_status_with_a_stale_socket_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert main_status(["--socket", str(path)]) == 3
    with pytest.raises(ControlNotRunning):
        request_sync(path, "status")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main_status(["--bogus"]) == 2
    assert main_down(["--timeout", "0"]) == 2
    assert main_status(["--help"]) == 0
    assert "--json" in capsys.readouterr().out


def test_status_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "control.sock"

    async def go() -> tuple[int, int]:
        async with serving(path):
            loop = asyncio.get_running_loop()
            as_json = await loop.run_in_executor(None, main_status, ["--json", "--socket", str(path)])
            out = capsys.readouterr().out
            assert json.loads(out) == sample_status()
            as_table = await loop.run_in_executor(None, main_status, ["--socket", str(path)])
            return as_json, as_table

    assert run(go()) == (0, 0)
    table = capsys.readouterr().out
    for text in ("vpn.example", "198.18.0.1", "x2ssh0", "12 open, 340 total, 2 refused", "socket"):
        assert text in table


SERVER_SCRIPT = """
import asyncio, os, sys
from pathlib import Path
from x2ssh.control import ControlServer

async def main(path, obey):
    stop = asyncio.Event()
    server = ControlServer(Path(path), lambda: {"state": "up"}, stop.set if obey else (lambda: None), set())
    await server.start()
    print("listening", flush=True)
    await stop.wait()
    await server.close()
    await asyncio.sleep(0.3)  # the rest of the teardown: the process outlives its socket a little

asyncio.run(main(sys.argv[1], sys.argv[2] == "obey"))
"""


@contextlib.contextmanager
def server_process(path: Path, obey: bool) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(path), "obey" if obey else "ignore"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "listening\n"
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_down_waits_until_the_run_has_exited(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "control.sock"
    with server_process(path, obey=True) as proc:
        assert main_down(["--socket", str(path)]) == 0
        assert not process_alive(proc.pid)  # exited (a zombie until we reap it: its work is done)
        assert not path.exists()
        assert proc.wait(timeout=10) == 0
    assert f"x2ssh (pid {proc.pid}) stopped" in capsys.readouterr().err


def test_down_reports_a_run_that_does_not_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "control.sock"
    with server_process(path, obey=False) as proc:
        assert main_down(["--socket", str(path), "--timeout", "0.5"]) == 1
        assert proc.poll() is None
    assert "was asked to stop but still runs" in capsys.readouterr().err


# -- where the socket lives ---------------------------------------------------------------------------


def test_control_paths_follow_the_namespace_key() -> None:
    key = current_netns_identity().key
    assert control_dir() == Path("/run/x2ssh") / key
    assert control_dir(Path("/tmp/r")) == Path("/tmp/r") / key
    assert control_socket_path(Path("/tmp/r")) == Path("/tmp/r") / key / "control.sock"


# -- the status document ------------------------------------------------------------------------------


def test_check_status_names_what_is_wrong() -> None:
    assert check_status(sample_status(tun=None, state="reconnecting", state_detail="attempt 2")) == []
    doc = sample_status(state="dancing", kill_switch="no", tcp={"open": True})
    del doc["pid"]
    doc["ssh_connections"] = [{"label": "ssh#1"}]
    problems = check_status(doc)
    for expected in (
        "state must be one of",
        "kill_switch must be bool",
        "tcp.open must be int",
        "tcp.total is missing",
        "pid is missing",
        "ssh_connections[0].channels is missing",
    ):
        assert any(expected in p for p in problems), (expected, problems)
    assert check_status([]) == ["the status is not a JSON object"]


def test_render_tolerates_a_partial_document() -> None:
    console = Console(file=io.StringIO(), width=120)
    console.print(render_status({"state": "connecting"}))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "connecting" in text
    assert "not up" in text


def test_render_shows_the_proxy_only_when_one_runs() -> None:
    def rendered(doc: dict) -> str:
        console = Console(file=io.StringIO(), width=120)
        console.print(render_status(doc))
        return console.file.getvalue()  # type: ignore[attr-defined]

    assert "SOCKS5 and HTTP CONNECT on 127.0.0.1:1080" in rendered(sample_status(proxy="127.0.0.1:1080"))
    assert "proxy" not in rendered(sample_status(proxy=None))
    assert "proxy" not in rendered(sample_status())


def test_status_line() -> None:
    assert status_line(sample_status()) == (
        "up, server vpn.example (198.18.0.1 port 22), TCP 12 open / 340 total, UDP 3 flows, 1 reconnects"
    )
    line = status_line(sample_status(state="reconnecting", state_detail="attempt 3", server={"name": "v"}))
    assert line.startswith("reconnecting (attempt 3), server v, ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("up", ("up", None)),
        ("reconnecting (attempt 3, next in 8 s)", ("reconnecting", "attempt 3, next in 8 s")),
        ("reconnecting (attempt 1)", ("reconnecting", "attempt 1")),
        ("stopping ()", ("stopping", None)),
    ],
)
def test_split_state(text: str, expected: tuple[str, str | None]) -> None:
    assert split_state(text) == expected
