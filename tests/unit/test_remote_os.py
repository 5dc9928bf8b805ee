"""Server OS detection and the Windows agent command lines (pure functions), plus the Windows bootstrap run
for real on Linux with `icacls` and `whoami` faked by scripts on PATH."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from x2ssh.agent_client import remote_os as R

from .win32_openssh import crt_argv as windows_argv  # the C runtime's split, shared with the fake sshd

# ---- detection ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("probe", "status", "stdout", "expected"),
    [
        (0, 0, "Linux\n", R.RemoteOS.POSIX),
        (0, 0, "Darwin\n", R.RemoteOS.POSIX),
        (0, 0, "MINGW64_NT-10.0-19045\n", R.RemoteOS.WINDOWS),
        (0, 0, "CYGWIN_NT-10.0\n", R.RemoteOS.WINDOWS),
        (0, 1, "'uname' is not recognized as an internal or external command", R.RemoteOS.UNKNOWN),
        (0, None, "", R.RemoteOS.UNKNOWN),
        (1, 0, "\r\nMicrosoft Windows [Version 10.0.20348.2113]\r\n", R.RemoteOS.WINDOWS),
        (1, 0, "something else", R.RemoteOS.UNKNOWN),
        (2, 0, "Win32NT\r\n", R.RemoteOS.WINDOWS),
        (2, 0, "Unix\n", R.RemoteOS.POSIX),
        (2, 127, "", R.RemoteOS.UNKNOWN),
    ],
)
def test_classify(probe: int, status: int | None, stdout: str, expected: R.RemoteOS) -> None:
    assert R.classify(probe, status, stdout) is expected


def _runner(answers: dict[str, tuple[int | None, str] | OSError], asked: list[str]):
    async def run(command: str) -> tuple[int | None, str]:
        asked.append(command)
        answer = answers.get(command, (127, ""))
        if isinstance(answer, OSError):
            raise answer
        return answer

    return run


def test_detect_stops_at_uname_on_posix() -> None:
    asked: list[str] = []
    got = asyncio.run(R.detect_remote_os(_runner({"uname -s": (0, "Linux\n")}, asked)))
    assert got is R.RemoteOS.POSIX and asked == ["uname -s"]


def test_detect_falls_back_to_cmd_then_powershell() -> None:
    asked: list[str] = []
    answers = {"cmd /c ver": OSError("channel refused"), R.OS_PROBES[2]: (0, "Win32NT\r\n")}
    got = asyncio.run(R.detect_remote_os(_runner(answers, asked)))  # type: ignore[arg-type]
    assert got is R.RemoteOS.WINDOWS and asked == list(R.OS_PROBES)
    assert asyncio.run(R.detect_remote_os(_runner({}, []))) is R.RemoteOS.UNKNOWN


def test_powershell_probe_is_encoded_and_neutral() -> None:
    import base64

    encoded = R.OS_PROBES[2].split()[-1]
    assert base64.b64decode(encoded).decode("utf-16-le") == "[Environment]::OSVersion.Platform"
    assert R.neutral_command(R.OS_PROBES[2].split()) == R.OS_PROBES[2]


# ---- neutral command lines ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg",
    [
        "python",
        "-I",
        r"C:\Program Files\Python311\python.exe",
        "import base64,zlib;exec(zlib.decompress(base64.b64decode('eJw+/=')))",
        "--log-level",
        "60.0",
        "a&b|c<d>e^f(g)h;i,j'k@l{m}",
    ],
)
def test_neutral_arguments_round_trip_through_the_c_runtime(arg: str) -> None:
    line = R.neutral_command(["prog", arg])
    assert windows_argv(line) == ["prog", arg]
    special = set("&|<>^(){};,'@ ")
    if special & set(arg):
        assert line.endswith(f'"{arg}"')  # cmd and PowerShell treat these as syntax outside quotes


@pytest.mark.parametrize(
    "arg", ["%TEMP%", "$env:TEMP", 'say "hi"', "a`b", "x!y", "", "a b\\", "--%", "two\nlines"]
)
def test_arguments_that_shells_would_rewrite_are_refused(arg: str) -> None:
    with pytest.raises(R.NotNeutral):
        R.neutral_command(["prog", arg])


def test_python_probe_command_runs_and_prints_the_marker() -> None:
    line = R.python_probe_command("python")
    argv = windows_argv(line)
    assert argv[:3] == ["python", "-I", "-c"]
    out = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, check=True).stdout
    fields = out.split(" ", 4)
    assert fields[0] == "X2SSH-PY" and (int(fields[1]), int(fields[2])) == sys.version_info[:2]
    assert windows_argv(R.python_probe_command("py -3"))[:2] == ["py", "-3"]


def test_python_candidates() -> None:
    assert R.python_candidates(R.RemoteOS.WINDOWS, ("python3",)) == ("python", "py -3")
    assert R.python_candidates(R.RemoteOS.POSIX, ("python3", "python")) == ("python3", "python")


def test_icacls_argv() -> None:
    assert R.icacls_argv(r"C:\Users\u\AppData\Local\Temp\.x2ssh-agent-ab12", "S-1-5-21-1-2-3-1001") == [
        "icacls",
        r"C:\Users\u\AppData\Local\Temp\.x2ssh-agent-ab12",
        "/inheritance:r",
        "/grant:r",
        "*S-1-5-21-1-2-3-1001:(OI)(CI)F",
    ]
    with pytest.raises(ValueError, match="not a SID"):
        R.icacls_argv("d", "Everyone")


def test_start_command_refuses_a_bad_name_and_bad_agent_args() -> None:
    with pytest.raises(ValueError, match="letters and digits"):
        R.windows_start_command("python", "../x", 10, [])
    with pytest.raises(R.NotNeutral):
        R.windows_start_command("python", "ab12", 10, ["--log-level", "%PATH%"])


# ---- the Windows bootstrap, run on Linux with icacls/whoami faked --------------------------------------

SID = "S-1-5-21-1111-2222-3333-1001"


def _fake_tools(bin_dir: Path, record: Path, icacls_status: int = 0) -> None:
    bin_dir.mkdir()
    scripts = {
        "whoami": f'#!/bin/sh\necho \'"host\\\\user","{SID}"\'\n',
        "icacls": f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\nexit {icacls_status}\n',
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)


def _fake_agent() -> bytes:
    """A zipapp that reports its argv and directory, reads the token line, and exits."""
    main = (
        "import os, sys\n"
        "d = sys.argv[sys.argv.index('--dir') + 1]\n"
        "token = sys.stdin.buffer.readline().strip().decode()\n"
        "print('X2SSH-AGENT READY stdio', flush=True)\n"
        "print('ARGS', ' '.join(sys.argv[1:]), flush=True)\n"
        "print('DIR', d, sorted(os.listdir(d)), flush=True)\n"
        "print('TOKEN', token, flush=True)\n"
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("__main__.py", main)
    return buf.getvalue()


def _run_bootstrap(tmp_path: Path, icacls_status: int = 0) -> tuple[subprocess.CompletedProcess[str], Path]:
    record = tmp_path / "icacls-args"
    _fake_tools(tmp_path / "bin", record, icacls_status)
    temp = tmp_path / "temp"
    temp.mkdir()
    zipapp = _fake_agent()
    line = R.windows_start_command("python", "ab12cd", len(zipapp), ["--log-level", "INFO"])
    argv = windows_argv(line)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", TMPDIR=str(temp))
    result = subprocess.run(
        [sys.executable, *argv[1:]],
        input=zipapp + b"00ff" * 16 + b"\n",
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    text = subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )
    return text, temp


def test_bootstrap_creates_restricts_uploads_runs_and_deletes(tmp_path: Path) -> None:
    result, temp = _run_bootstrap(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    d = str(temp / ".x2ssh-agent-ab12cd")
    lines = result.stdout.splitlines()
    assert lines[0] == "X2SSH-AGENT READY stdio"
    assert lines[1] == f"ARGS --dir {d} --log-level INFO"
    assert lines[2] == f"DIR {d} ['agent.pyz', 'lock']"
    assert lines[3] == "TOKEN " + "00ff" * 16  # the token line reached the agent, not the bootstrap
    assert (tmp_path / "icacls-args").read_text().splitlines() == R.icacls_argv(d, SID)[1:]
    assert os.listdir(temp) == []  # deleted on exit


def test_bootstrap_removes_stale_directories_but_not_live_ones(tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    stale = temp / ".x2ssh-agent-old1"
    stale.mkdir()
    (stale / "agent.pyz").write_bytes(b"x")
    (stale / "lock").write_bytes(b"")
    live = temp / ".x2ssh-agent-live1"
    live.mkdir()
    (live / "lock").mkdir()  # cannot be removed: stands in for a lock file Windows refuses to delete
    other = temp / "unrelated"
    other.mkdir()
    result, _ = _run_bootstrap_in(tmp_path, temp)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(os.listdir(temp)) == [".x2ssh-agent-live1", "unrelated"]


def _run_bootstrap_in(tmp_path: Path, temp: Path) -> tuple[subprocess.CompletedProcess[str], Path]:
    record = tmp_path / "icacls-args"
    _fake_tools(tmp_path / "bin", record)
    zipapp = _fake_agent()
    argv = windows_argv(R.windows_start_command("python", "new1", len(zipapp), []))
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", TMPDIR=str(temp))
    result = subprocess.run(
        [sys.executable, *argv[1:]], input=zipapp + b"\n", capture_output=True, env=env, timeout=60
    )
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), ""), temp


def test_bootstrap_reports_a_failed_acl_and_leaves_nothing(tmp_path: Path) -> None:
    result, temp = _run_bootstrap(tmp_path, icacls_status=5)
    assert result.returncode == 3
    assert result.stdout.startswith("X2SSH-AGENT ERROR cannot restrict ")
    assert os.listdir(temp) == []


def test_bootstrap_reports_a_short_upload(tmp_path: Path) -> None:
    _fake_tools(tmp_path / "bin", tmp_path / "rec")
    temp = tmp_path / "temp"
    temp.mkdir()
    argv = windows_argv(R.windows_start_command("python", "short1", 1000, []))
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", TMPDIR=str(temp))
    result = subprocess.run(
        [sys.executable, *argv[1:]], input=b"abc", capture_output=True, env=env, timeout=60
    )
    assert result.returncode == 3
    assert b"upload failed: upload ended after 3 of 1000 bytes" in result.stdout
    assert os.listdir(temp) == []
