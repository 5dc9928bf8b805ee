"""A fake SSH connection that answers like Win32-OpenSSH with cmd.exe or PowerShell as the default shell.

Every command line is parsed by models of both shells (cmd.exe `/c`, PowerShell's argument mode), each
followed by the C runtime's own argv split; the fake refuses any command the two would not turn into the
same argv. Known programs answer as on Windows (`uname` is not recognized, `cmd /c ver` prints the version,
PowerShell the platform, each python its version or "not recognized"); a python asked to run anything other
than the probe runs for real here, on Linux, with `icacls` and `whoami` faked on PATH and TMPDIR standing in
for %TEMP%. Its stdin/stdout/stderr are what deploy and AgentHandle see as the exec channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import types
from pathlib import Path
from typing import Any

from x2ssh.agent_client import remote_os as R

SID = "S-1-5-21-1111-2222-3333-1001"
NOT_RECOGNIZED_CMD = (
    "'{0}' is not recognized as an internal or external command,\r\noperable program or batch file."
)
NOT_RECOGNIZED_PS = (
    "{0} : The term '{0}' is not recognized as the name of a cmdlet, function, script file, or operable "
    "program."
)
STORE_ALIAS = (
    "Python was not found; run without arguments to install from the Microsoft Store, or disable this "
    "shortcut from Settings > Manage App Execution Aliases."
)


class ShellSyntax(AssertionError):
    """The command line means something else to this shell than the argv it was meant to carry."""


def crt_argv(line: str) -> list[str]:
    """Split a command line as the Microsoft C runtime (CommandLineToArgvW rules) does."""
    args: list[str] = []
    cur: list[str] = []
    quoted = have = False
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\":
            n = 0
            while i < len(line) and line[i] == "\\":
                n, i = n + 1, i + 1
            if i < len(line) and line[i] == '"':
                cur.append("\\" * (n // 2))
                if n % 2:
                    cur.append('"')
                    i += 1
            else:
                cur.append("\\" * n)
            have = True
            continue
        if c == '"':
            quoted, have = not quoted, True
        elif c in " \t" and not quoted:
            if have:
                args.append("".join(cur))
                cur, have = [], False
        else:
            cur.append(c)
            have = True
        i += 1
    if have:
        args.append("".join(cur))
    return args


def cmd_argv(line: str) -> list[str]:
    """What a program gets when Win32-OpenSSH runs `cmd.exe /c "LINE"`: cmd strips those outer quotes and
    leaves the line as it is unless it meets syntax (which this refuses); the program splits it."""
    wrapped = f'"{line}"'
    if len("cmd.exe /c ") + len(wrapped) > 8191:
        raise ShellSyntax("longer than cmd's 8191-character command line")
    line = wrapped[1:-1]  # more than one quoted word, or not an executable's name: cmd /c strips them
    quoted = False
    for c in line:
        if c in "%!":
            raise ShellSyntax(f"cmd expands {c}...{c} (environment, delayed expansion)")
        if c == '"':
            quoted = not quoted
        elif not quoted and c in "&|<>()^":
            raise ShellSyntax(f"cmd treats {c!r} outside quotes as syntax")
    if quoted:
        raise ShellSyntax("unbalanced quote")
    return crt_argv(line)


_PS_SPECIAL = set("$`;&|(){},'\"<>@#")


def ps_argv(line: str) -> list[str]:
    """What a native program gets when Win32-OpenSSH runs `powershell -c LINE`: PowerShell's argument mode
    (bare words and double-quoted strings), then its own re-quoting for the native command line."""
    words: list[str] = []
    if line.startswith('"'):
        raise ShellSyntax("PowerShell reads a line starting with a quoted string as an expression")
    i = 0
    while i < len(line):
        if line[i] in " \t":
            i += 1
            continue
        if line[i] == '"':
            end = line.find('"', i + 1)
            if end < 0:
                raise ShellSyntax("unbalanced quote")
            value = line[i + 1 : end]
            if set(value) & set("$`"):
                raise ShellSyntax("PowerShell expands $ and ` inside double quotes")
            i = end + 1
            if i < len(line) and line[i] not in " \t":
                raise ShellSyntax("a quoted string glued to more text")
        else:
            end = i
            while end < len(line) and line[end] not in " \t":
                end += 1
            value = line[i:end]
            if set(value) & _PS_SPECIAL:
                raise ShellSyntax(f"PowerShell treats part of {value!r} as syntax")
            if value == "--%":
                raise ShellSyntax("stop-parsing token")
            if value[0].isdigit():
                raise ShellSyntax(f"PowerShell reads {value!r} as a number")
            if value.startswith("-") and "." in value:
                raise ShellSyntax(f"PowerShell splits {value!r} at the dot")
            if not value.isascii():
                raise ShellSyntax("typographic quotes and dashes are syntax to PowerShell")
            i = end
        words.append(value)
    native = " ".join(f'"{w}"' if not w or set(w) & set(" \t") else w for w in words)
    return crt_argv(native)


def neutral_argv(line: str) -> list[str]:
    """The argv both shells give the program; ShellSyntax unless they agree."""
    by_cmd, by_ps = cmd_argv(line), ps_argv(line)
    if by_cmd != by_ps:
        raise ShellSyntax(f"cmd gives {by_cmd!r}, PowerShell {by_ps!r}")
    return by_cmd


def fake_tools(bin_dir: Path, record: Path) -> None:
    """`whoami /user /fo csv /nh` and an `icacls` that records its arguments."""
    bin_dir.mkdir(exist_ok=True)
    scripts = {
        "whoami": f'#!/bin/sh\necho \'"host\\\\user","{SID}"\'\n',
        "icacls": f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n',
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)


class _Channel:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._stdin = proc.stdin
        assert self._stdin is not None

    def write(self, data: bytes) -> None:
        self._stdin.write(data)

    def get_write_buffer_size(self) -> int:
        return self._stdin.transport.get_write_buffer_size()

    def write_eof(self) -> None:
        if not self._stdin.is_closing():
            self._stdin.write_eof()

    def close(self) -> None:
        self._stdin.close()


class FakeProcess:
    """The parts of asyncssh's SSHClientProcess that deploy and AgentHandle use, over a local process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.channel = _Channel(proc)

    def close(self) -> None:  # the channel closes: the remote side sees stdin end
        self.channel.close()

    async def reap(self) -> None:
        """Wait for the local process, killing it if it lingers (test hygiene only)."""
        try:
            await asyncio.wait_for(self._proc.wait(), 20)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()
        # A process that exited while deploy still wrote to it left a BrokenPipeError on its stdin: fetch
        # it, so asyncio does not report it as never retrieved.
        with contextlib.suppress(OSError):
            await self.stdin.wait_closed()

    async def wait(self) -> int:
        return await self._proc.wait()


class FakeWin32OpenSSH:
    """See the module docstring. `pythons` maps 'python' / 'py' to (major, minor, platform), 'store' (the
    Microsoft Store alias) or None (not installed); `cmd_works=False` leaves only the PowerShell probe."""

    def __init__(
        self,
        shell: str,
        root: Path,
        pythons: dict[str, Any] | None = None,
        cmd_works: bool = True,
        powershell_works: bool = True,
        temp: Path | None = None,
    ) -> None:
        assert shell in ("cmd", "powershell")
        self.shell = shell
        self.pythons = {"python": (3, 11, "win32"), "py": (3, 12, "win32")} if pythons is None else pythons
        self.cmd_works = cmd_works
        self.powershell_works = powershell_works
        self.commands: list[str] = []
        self.processes: list[FakeProcess] = []
        self.bin = root / "bin"
        self.temp = temp or root / "temp"  # short: the agent's Unix socket path (on Linux) must fit
        self.icacls_record = root / "icacls-args"
        fake_tools(self.bin, self.icacls_record)
        self.temp.mkdir(exist_ok=True)

    async def reap(self) -> None:
        """Wait until every process this connection started has exited."""
        for process in self.processes:
            process.close()
            await process.reap()

    # the connection's identity, for the facts cache
    def get_server_host_key(self) -> Any:
        return types.SimpleNamespace(get_fingerprint=lambda: "SHA256:fake-windows-host-key")

    def get_extra_info(self, name: str) -> Any:
        return {"peername": ("198.18.0.1", 22), "username": "user"}.get(name)

    def _not_found(self, program: str) -> tuple[int, str, str]:
        if self.shell == "cmd":
            return 9009, "", NOT_RECOGNIZED_CMD.format(program)
        return 1, "", NOT_RECOGNIZED_PS.format(program)

    def _answer(self, argv: list[str]) -> tuple[int, str, str]:
        program = argv[0]
        if program == "cmd" and argv[1:] == ["/c", "ver"] and self.cmd_works:
            return 0, "\r\nMicrosoft Windows [Version 10.0.20348.2113]\r\n", ""
        encoded = argv[1:4] == ["-NoProfile", "-NonInteractive", "-EncodedCommand"]
        if program == "powershell" and encoded and self.powershell_works:
            return 0, "Win32NT\r\n", ""
        if program in ("python", "py"):
            code_at = 3 if program == "python" else 4
            assert argv[1:code_at] == (["-I", "-c"] if program == "python" else ["-3", "-I", "-c"]), argv
            version = self.pythons.get(program)
            if version == "store" and program == "python":
                return 9009, "", STORE_ALIAS
            if version is None:
                return self._not_found(program)
            major, minor, platform = version
            assert R.PROBE_CODE in _unpacked(argv[code_at]), "not the probe"
            return 0, f"X2SSH-PY {major} {minor} {platform} C:\\Python\\python.exe\r\n", ""
        return self._not_found(program)

    async def run(self, command: str, timeout: float | None = None) -> Any:
        self.commands.append(command)
        argv = neutral_argv(command)
        status, stdout, stderr = self._answer(argv)
        return types.SimpleNamespace(exit_status=status, stdout=stdout, stderr=stderr)

    async def create_process(self, command: str, encoding: str | None = None) -> FakeProcess:
        assert encoding is None
        self.commands.append(command)
        argv = neutral_argv(command)
        skip = {"python": 1, "py": 2}.get(argv[0])
        env = dict(os.environ, PATH=f"{self.bin}:{os.environ['PATH']}", TMPDIR=str(self.temp))
        if skip is None or self.pythons.get(argv[0]) in (None, "store"):
            status, _, stderr = self._not_found(argv[0])
            program = [
                sys.executable,
                "-c",
                f"import sys; sys.stderr.write({stderr!r}); sys.exit({status % 256})",
            ]
        else:
            program = [sys.executable, *argv[skip:]]
        proc = await asyncio.create_subprocess_exec(
            *program,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=lambda: os.umask(0o077),  # the directory is 0700 as the agent on Linux insists
        )
        process = FakeProcess(proc)
        self.processes.append(process)
        return process


def _unpacked(argument: str) -> str:
    """The source behind remote_os's `exec(zlib.decompress(base64.b64decode('...')))` argument."""
    import base64
    import zlib

    data = argument.split("b64decode('", 1)[1].split("')", 1)[0]
    return zlib.decompress(base64.b64decode(data)).decode()
