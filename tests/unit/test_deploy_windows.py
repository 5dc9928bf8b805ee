"""deploy_agent against a fake Win32-OpenSSH (cmd.exe or PowerShell as the default shell): the exact
commands sent, that both shells parse them alike, the clear errors, the per-server cache, and the real
Windows bootstrap and agent (run here on Linux) reached over the exec channel's stdio, UDP echo byte-exact.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import tempfile
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.zipapp import build_zipapp
from x2ssh.agent_client import remote_os as R
from x2ssh.agent_client.deploy import (
    AgentSettings,
    AgentUnavailable,
    ServerFacts,
    ServerFactsCache,
    ServerPython,
    deploy_agent,
    reattach_agent,
)
from x2ssh.agent_client.probe import server_key

from .win32_openssh import (
    SID,
    STORE_ALIAS,
    FakeWin32OpenSSH,
    ShellSyntax,
    cmd_argv,
    neutral_argv,
    ps_argv,
)

WAIT = 30.0
SETTINGS = AgentSettings(start_timeout=20.0, close_timeout=10.0, probe_timeout=5.0)
SHELLS = ["cmd", "powershell"]


class Receiver:
    """Collects what the agent sends (the UdpRelay's side of AgentHandle)."""

    def __init__(self) -> None:
        self.datagrams: asyncio.Queue[tuple[int, tuple[str, int], bytes]] = asyncio.Queue()
        self.lost: list[str] = []

    def datagram_from_agent(self, flow_id: int, source: tuple[str, int], payload: bytes) -> None:
        self.datagrams.put_nowait((flow_id, source, payload))

    def echo_from_agent(self, flow_id: int, seq: int, payload: bytes) -> None:
        raise AssertionError("no echo expected")

    def unreachable_from_agent(self, flow_id: int, code: int, info: int, reporter: str | None) -> None:
        raise AssertionError("no unreachable expected")

    def flow_closed_by_agent(self, flow_id: int, reason: int) -> None:
        raise AssertionError(f"flow {flow_id} closed by the agent: {reason}")

    def agent_lost(self, reason: str) -> None:
        self.lost.append(reason)


class UdpEcho:
    """A UDP echo server on 127.0.0.1 (a thread), sending every datagram back unchanged."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self.sock.close()


def expected_probes() -> list[str]:
    return ["uname -s", "cmd /c ver", R.python_probe_command("python"), R.python_probe_command("py -3")]


def check_start_command(command: str, python_argv: list[str]) -> str:
    """The start command carries the bootstrap, a random name, the zipapp's size and the agent's options."""
    argv = neutral_argv(command)
    assert argv[: len(python_argv) + 2] == [*python_argv, "-I", "-c"]
    rest = argv[len(python_argv) + 2 :]
    assert rest[0] == R._packed(R.windows_bootstrap_code())
    assert re.fullmatch(r"[0-9a-f]{16}", rest[1])
    assert rest[2] == str(len(build_zipapp()))
    assert rest[3:] == SETTINGS.agent_args()
    assert command == R.windows_start_command(" ".join(python_argv), rest[1], int(rest[2]), rest[3:])
    return rest[1]


# ---- the two shell models agree with what remote_os writes ---------------------------------------------


def test_every_command_deploy_sends_parses_alike_in_cmd_and_powershell() -> None:
    commands = [
        *R.OS_PROBES[1:],
        R.python_probe_command("python"),
        R.python_probe_command("py -3"),
        R.windows_start_command("python", "ab12", 12345, SETTINGS.agent_args()),
        R.windows_start_command("py -3", "ab12", 12345, SETTINGS.agent_args()),
    ]
    for command in commands:
        assert cmd_argv(command) == ps_argv(command)
    start = neutral_argv(commands[-2])
    assert start[5:] == ["12345", *SETTINGS.agent_args()]  # numbers arrive as written ("60.0", not 60)


@pytest.mark.parametrize(
    "line",
    [
        "python -c print(1)",  # parentheses: cmd syntax outside quotes
        'python "%TEMP%"',  # cmd expands it
        'python "$env:TEMP"',  # PowerShell expands it
        "python 60.0",  # PowerShell reads a number
        "java -Dx.y=1",  # PowerShell splits at the dot
        '"C:\\Program Files\\python.exe" -V',  # PowerShell: a string expression, then a stray -V
        "python a;b",  # PowerShell statement separator
    ],
)
def test_the_shell_models_refuse_what_a_shell_would_rewrite(line: str) -> None:
    with pytest.raises(ShellSyntax):
        neutral_argv(line)


def test_neutral_writer_quotes_what_powershell_would_rewrite() -> None:
    assert R.neutral_command(["python", "60.0", "-3", "--log-level", "-Dx.y"]) == (
        'python "60.0" -3 --log-level "-Dx.y"'
    )
    with pytest.raises(R.NotNeutral, match="bare word"):
        R.neutral_command(["C:\\Program Files\\Python\\python.exe", "-V"])
    with pytest.raises(R.NotNeutral):
        R.neutral_command(["python", "caf\u00e9 \u201cquoted\u201d"])


# ---- deployment end to end over the fake Win32-OpenSSH --------------------------------------------------


@pytest.fixture
def temp() -> Iterator[Path]:
    """Stands in for %TEMP%: short, since the agent (on Linux) binds a Unix socket in its directory."""
    path = Path(tempfile.mkdtemp(prefix="x2w"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _deploy_and_echo(conn: FakeWin32OpenSSH, cache: ServerFactsCache) -> str:
    echo = UdpEcho()
    try:
        handle = await asyncio.wait_for(deploy_agent(conn, SETTINGS, cache), WAIT)
        assert (handle.transport, handle.socket_path) == ("stdio", "stdio")
        assert handle.directory.startswith("%TEMP%\\.x2ssh-agent-")
        assert handle.version == 2
        receiver = Receiver()
        handle.set_receiver(receiver)
        handle.open_flow(1, echo.address)
        payloads = [bytes(range(256)) * 4, b"\x00", os.urandom(1400), os.urandom(60000), b"\r\n\n\r\x1a"]
        for payload in payloads:
            assert handle.send_datagram(1, payload)
            flow_id, source, reply = await asyncio.wait_for(receiver.datagrams.get(), WAIT)
            assert (flow_id, source, reply) == (1, echo.address, payload)  # byte-exact, no newline mangling
        await handle.close()
        assert not receiver.lost
        process = conn.processes[-1]
        assert await asyncio.wait_for(process.wait(), WAIT) == 0  # bootstrap and agent exited cleanly
    finally:
        echo.close()
        await conn.reap()
    return handle.directory


@pytest.mark.parametrize("shell", SHELLS)
def test_deploy_on_windows_sends_exactly_these_commands_and_echoes_udp(
    shell: str, tmp_path: Path, temp: Path
) -> None:
    conn = FakeWin32OpenSSH(shell, tmp_path, temp=temp)
    directory = asyncio.run(_deploy_and_echo(conn, ServerFactsCache()))
    assert conn.commands[:4] == expected_probes()
    name = check_start_command(conn.commands[4], ["python"])
    assert len(conn.commands) == 5
    assert directory == f"%TEMP%\\.x2ssh-agent-{name}"
    local = conn.temp / f".x2ssh-agent-{name}"
    assert conn.icacls_record.read_text().splitlines() == R.icacls_argv(str(local), SID)[1:]
    assert os.listdir(conn.temp) == []  # the agent's files are gone once it exits


def test_deploy_falls_back_to_the_py_launcher_and_powershell_detection(tmp_path: Path, temp: Path) -> None:
    conn = FakeWin32OpenSSH(
        "powershell",
        tmp_path,
        pythons={"python": "store", "py": (3, 12, "win32")},
        cmd_works=False,
        temp=temp,
    )
    asyncio.run(_deploy_and_echo(conn, ServerFactsCache()))
    probes = ["uname -s", "cmd /c ver", R.OS_PROBES[2], *expected_probes()[2:]]
    assert conn.commands[:5] == probes
    check_start_command(conn.commands[5], ["py", "-3"])


def test_a_reconnect_skips_the_probes_and_a_stale_cache_entry_is_probed_again(
    tmp_path: Path, temp: Path
) -> None:
    cache = ServerFactsCache()
    conn = FakeWin32OpenSSH("cmd", tmp_path, temp=temp)
    asyncio.run(_deploy_and_echo(conn, cache))
    assert len(conn.commands) == 5
    asyncio.run(_deploy_and_echo(conn, cache))  # the same server again: start command only
    assert len(conn.commands) == 6
    check_start_command(conn.commands[5], ["python"])
    # python uninstalled since: the cached start fails, deploy probes afresh and takes the launcher
    conn.pythons = {"python": None, "py": (3, 12, "win32")}
    asyncio.run(_deploy_and_echo(conn, cache))
    check_start_command(conn.commands[6], ["python"])
    assert conn.commands[7:11] == expected_probes()
    check_start_command(conn.commands[11], ["py", "-3"])
    assert cache.get(server_key(conn)) == ServerFacts(
        R.RemoteOS.WINDOWS, ServerPython("py -3", (3, 12), "win32", "C:\\Python\\python.exe")
    )


# ---- clear errors ---------------------------------------------------------------------------------------


def _deploy_error(conn: object) -> str:
    async def main() -> str:
        with pytest.raises(AgentUnavailable) as info:
            await deploy_agent(conn, SETTINGS, ServerFactsCache())  # type: ignore[arg-type]
        return info.value.reason

    return asyncio.run(asyncio.wait_for(main(), WAIT))


@pytest.mark.parametrize("shell", SHELLS)
def test_no_python_on_a_windows_server(shell: str, tmp_path: Path) -> None:
    conn = FakeWin32OpenSSH(shell, tmp_path, pythons={"python": "store", "py": None})
    reason = _deploy_error(conn)
    assert reason.startswith("no Python >= 3.8 on the Windows server (")
    assert f"python: not found ({STORE_ALIAS})" in reason
    assert "py -3: not found" in reason
    assert "install Python from python.org" in reason and "TCP still works" in reason
    assert conn.commands == expected_probes()  # nothing started


def test_old_or_non_native_pythons_on_windows_are_named(tmp_path: Path) -> None:
    conn = FakeWin32OpenSSH("cmd", tmp_path, pythons={"python": (3, 7, "win32"), "py": (3, 11, "cygwin")})
    reason = _deploy_error(conn)
    assert "python: Python 3.7 is too old" in reason
    assert "py -3: a cygwin python, not a native Windows one" in reason


def test_unknown_os_says_what_each_probe_answered(tmp_path: Path) -> None:
    conn = FakeWin32OpenSSH("cmd", tmp_path, cmd_works=False, powershell_works=False)
    reason = _deploy_error(conn)
    assert reason.startswith("cannot tell the server's operating system (uname -s: exit status 9009 (")
    assert "; cmd /c ver: exit status 9009 (" in reason and "; powershell: exit status 9009 (" in reason
    assert reason.endswith("TCP still works, DNS falls back to DNS over TCP")
    assert conn.commands == list(R.OS_PROBES)


class FakePosixServer:
    """sshd on Linux without any python: uname answers, every python is 'not found' (127)."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def get_server_host_key(self) -> None:
        return None

    def get_extra_info(self, name: str) -> None:
        return None

    async def run(self, command: str, timeout: float | None = None) -> object:
        self.commands.append(command)
        if command == "uname -s":
            return types.SimpleNamespace(exit_status=0, stdout="Linux\n", stderr="")
        program = command.split()[0]
        return types.SimpleNamespace(exit_status=127, stdout="", stderr=f"sh: 1: {program}: not found\n")


def test_no_python_on_a_posix_server() -> None:
    conn = FakePosixServer()
    reason = _deploy_error(conn)
    assert reason.startswith(
        "no Python >= 3.8 on the server (python3: not found; /usr/bin/python3: not found"
    )
    assert "TCP still works" in reason and "Windows" not in reason
    assert conn.commands[0] == "uname -s"
    assert conn.commands[1].startswith("python3 -I -c 'import sys;")  # POSIX quoting on POSIX servers


def test_a_windows_agent_is_not_re_attached() -> None:
    previous = types.SimpleNamespace(socket_path="stdio", settings=SETTINGS)

    async def main() -> str:
        with pytest.raises(AgentUnavailable) as info:
            await reattach_agent(object(), previous)  # type: ignore[arg-type]
        return info.value.reason

    assert "cannot be re-attached" in asyncio.run(main())
