"""The command line entry point: exit codes, error output, and the order of checks (session mocked)."""

import asyncio
import logging
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

import x2ssh
from x2ssh import cli
from x2ssh.errors import AlreadyRunning, NotPrivileged, SshHostKeyRejected, TunNameTaken

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_logging():
    """main() configures the root logger; put it back so other tests see pytest's own handlers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class Fake:
    """Records the calls main() makes to preflight, cleanup and the (mocked) session."""

    def __init__(self, monkeypatch, run_vpn=None):
        self.calls: list[tuple] = []
        self.settings = None

        async def default_run_vpn(settings):
            self.settings = settings
            self.calls.append(("run_vpn",))

        fake_session = types.ModuleType("x2ssh.session")
        fake_session.run_vpn = run_vpn or default_run_vpn
        monkeypatch.setitem(sys.modules, "x2ssh.session", fake_session)
        monkeypatch.setattr(x2ssh, "session", fake_session, raising=False)
        for name in ("check_privileges", "check_tun_device"):
            monkeypatch.setattr(cli, name, self._recorder(name))
        monkeypatch.setattr(cli, "check_tun_name_free", self._recorder("check_tun_name_free"))
        monkeypatch.setattr(cli, "cleanup", self._recorder("cleanup", result=[]))

    def _recorder(self, name, result=None):
        def record(*args, **kwargs):
            self.calls.append((name, *args, *sorted(kwargs.items())))
            return result

        return record


def test_no_arguments_prints_usage(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: x2ssh --vpn [options] DESTINATION")
    assert "--vpn is required" in err


def test_usage_error_exit_2(capsys):
    assert cli.main(["--vpn", "--vpn-exclude", "198.18.0.0/33", "host"]) == 2
    assert "not a CIDR" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--vpn-exclude CIDR" in out and "TOML" in out


def test_vpn_runs_checks_cleanup_then_session(monkeypatch, tmp_path):
    fake = Fake(monkeypatch)
    assert cli.main(["--vpn", "--state-dir", str(tmp_path), "--vpn-tun", "x2t1", "alice@host"]) == 0
    assert fake.calls == [
        ("check_privileges",),
        ("check_tun_device",),
        ("cleanup", tmp_path),
        ("check_tun_name_free", "x2t1"),
        ("run_vpn",),
        ("cleanup", tmp_path, ("own_pid", os.getpid())),
    ]
    assert (fake.settings.user, fake.settings.host, fake.settings.vpn_tun) == ("alice", "host", "x2t1")


def test_not_privileged_changes_nothing(monkeypatch, capsys):
    fake = Fake(monkeypatch)

    def refuse():
        raise NotPrivileged("run it as root")

    monkeypatch.setattr(cli, "check_privileges", refuse)
    assert cli.main(["--vpn", "host"]) == NotPrivileged.exit_code == 77
    assert fake.calls == []
    assert capsys.readouterr().err == "x2ssh: run it as root\n"


def test_another_instance_refused(monkeypatch, capsys):
    fake = Fake(monkeypatch)

    def busy(*args, **kwargs):
        raise AlreadyRunning("another x2ssh (pid 42) is running")

    monkeypatch.setattr(cli, "cleanup", busy)
    assert cli.main(["--vpn", "host"]) == 75
    assert ("run_vpn",) not in fake.calls
    assert "pid 42" in capsys.readouterr().err


def test_tun_name_taken(monkeypatch, capsys):
    Fake(monkeypatch)

    def taken(name):
        raise TunNameTaken(f"a network interface named {name} already exists")

    monkeypatch.setattr(cli, "check_tun_name_free", taken)
    assert cli.main(["--vpn", "host"]) == 73
    assert "x2ssh0 already exists" in capsys.readouterr().err


def failing_session(exc):
    async def run_vpn(settings):
        raise exc

    return run_vpn


def test_session_error_message_without_traceback(monkeypatch, capsys, tmp_path):
    fake = Fake(monkeypatch, failing_session(SshHostKeyRejected("host key of host changed")))
    assert cli.main(["--vpn", "--state-dir", str(tmp_path), "host"]) == 255
    err = capsys.readouterr().err
    assert err == "x2ssh: host key of host changed\n"
    assert fake.calls[-1] == ("cleanup", tmp_path, ("own_pid", os.getpid()))  # safety net ran


def test_session_error_traceback_with_verbose(monkeypatch, capsys):
    Fake(monkeypatch, failing_session(SshHostKeyRejected("host key of host changed")))
    assert cli.main(["--vpn", "-v", "host"]) == 255
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("x2ssh: host key of host changed\n")


def test_ctrl_c_exits_130_after_cleanup(monkeypatch, tmp_path):
    fake = Fake(monkeypatch, failing_session(KeyboardInterrupt()))
    assert cli.main(["--vpn", "--state-dir", str(tmp_path), "host"]) == 130
    assert fake.calls[-1] == ("cleanup", tmp_path, ("own_pid", os.getpid()))


def test_sigterm_exits_143_after_cleanup(monkeypatch, tmp_path):
    async def run_vpn(settings):
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(10)  # interrupted at once; if not, the exit code below is wrong

    fake = Fake(monkeypatch, run_vpn)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["--vpn", "--state-dir", str(tmp_path), "host"]) == 143
    assert fake.calls[-1] == ("cleanup", tmp_path, ("own_pid", os.getpid()))
    assert signal.getsignal(signal.SIGTERM) == before


def test_internal_error_exit_70(monkeypatch, capsys):
    Fake(monkeypatch, failing_session(ZeroDivisionError("bug")))
    assert cli.main(["--vpn", "host"]) == 70
    err = capsys.readouterr().err
    assert "internal error" in err and "ZeroDivisionError" in err


def test_vpn_cleanup_only(monkeypatch, tmp_path):
    fake = Fake(monkeypatch)
    assert cli.main(["--vpn-cleanup", "--state-dir", str(tmp_path)]) == 0
    assert fake.calls == [("check_privileges",), ("cleanup", tmp_path)]


def test_python_dash_m_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "x2ssh", "--version"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"x2ssh {x2ssh.__version__}"
    bad = subprocess.run(
        [sys.executable, "-m", "x2ssh"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "usage:" in bad.stderr
