"""The command line entry point: exit codes, error output, and the order of checks (session mocked)."""

import asyncio
import gc
import logging
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

import x2ssh
import x2ssh.frontends
from x2ssh import cli
from x2ssh.errors import AlreadyRunning, NotPrivileged, SshHostKeyRejected, TunNameTaken
from x2ssh.host.helper_client import HelperClient

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def restore_logging():
    """main() configures the root logger; put it back so other tests see pytest's own handlers."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def restore_gc():
    """The runs below call settle_heap(); the collector's settings are process-wide."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class FakeHelper:
    """Stands in for the privileged helper client: records the requests main() makes, in order."""

    def __init__(self, calls, refuse=None):
        self.calls = calls
        self.refuse = refuse or {}

    def _record(self, name, *args):
        self.calls.append((name, *args))
        if name in self.refuse:
            raise self.refuse[name]

    def start(self, tun, mtu, excludes, kill_switch):
        self._record("start", tun)
        return {"undone": []}

    def cleanup(self):
        self._record("cleanup")
        return []

    def down(self):
        self._record("down")
        return []


class Fake:
    """Records the calls main() makes to the privileged helper and the (mocked) session."""

    def __init__(self, monkeypatch, run_vpn=None, refuse=None):
        self.calls: list[tuple] = []
        self.settings = None
        self.helper = FakeHelper(self.calls, refuse)

        async def default_run_vpn(settings, host, notifier=None):
            self.settings = settings
            self.calls.append(("run_vpn",))

        fake_vpn = types.ModuleType("x2ssh.frontends.vpn")
        fake_vpn.run_vpn = run_vpn or default_run_vpn
        monkeypatch.setitem(sys.modules, "x2ssh.frontends.vpn", fake_vpn)
        monkeypatch.setattr(x2ssh.frontends, "vpn", fake_vpn, raising=False)

        def spawn(state_dir, verbose=0):
            self.calls.append(("spawn", state_dir))
            if "spawn" in self.helper.refuse:
                raise self.helper.refuse["spawn"]
            return self.helper

        monkeypatch.setattr(HelperClient, "spawn", staticmethod(spawn))  # what x2ssh.host.platform picks here
        monkeypatch.setattr(cli, "sudo_user", lambda: None)


def test_no_arguments_prints_usage(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: x2ssh --vpn [options] DESTINATION")
    assert "--vpn or -D is required" in err


def test_usage_error_exit_2(capsys):
    assert cli.main(["--vpn", "--vpn-exclude", "198.18.0.0/33", "host"]) == 2
    assert "not a CIDR" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--vpn-exclude CIDR" in out and "TOML" in out


def test_vpn_starts_helper_then_session_then_down(monkeypatch, tmp_path):
    fake = Fake(monkeypatch)
    assert cli.main(["--vpn", "--state-dir", str(tmp_path), "--vpn-tun", "x2t1", "alice@host"]) == 0
    assert fake.calls == [("spawn", tmp_path), ("start", "x2t1"), ("run_vpn",), ("down",)]
    assert (fake.settings.user, fake.settings.host, fake.settings.vpn_tun) == ("alice", "host", "x2t1")


def test_vpn_with_dynamic_runs_the_vpn(monkeypatch, tmp_path):
    """--vpn -D: one run, the VPN's (its session starts the proxy beside the TUN), not the proxy-only run."""
    fake = Fake(monkeypatch)
    monkeypatch.setattr(cli, "_run_proxy", lambda settings: pytest.fail("the proxy-only run was started"))
    assert cli.main(["--vpn", "-D", "127.0.0.1:1080", "--state-dir", str(tmp_path), "host"]) == 0
    assert fake.calls == [("spawn", tmp_path), ("start", "x2ssh0"), ("run_vpn",), ("down",)]
    assert fake.settings.dynamic == ("127.0.0.1", 1080)


def test_vpn_with_a_lan_proxy_without_credentials_asks_nothing_of_sudo(monkeypatch, capsys):
    """The bind rule of -D holds beside the VPN too, and it is checked before the helper (sudo) starts."""
    fake = Fake(monkeypatch)
    assert cli.main(["--vpn", "-D", "0.0.0.0:1081", "host"]) == 2
    assert fake.calls == []
    err = capsys.readouterr().err
    assert "--allow-lan" in err and "username and password" in err
    assert cli.main(["--vpn", "-D", "0.0.0.0:1081", "--allow-lan", "host"]) == 0
    assert [c[0] for c in fake.calls] == ["spawn", "start", "run_vpn", "down"]


def test_not_privileged_changes_nothing(monkeypatch, capsys):
    fake = Fake(monkeypatch, refuse={"spawn": NotPrivileged("install sudo, or run x2ssh as root")})
    assert cli.main(["--vpn", "host"]) == NotPrivileged.exit_code == 77
    assert fake.calls == [("spawn", cli.Settings().state_dir)]
    assert capsys.readouterr().err == "x2ssh: install sudo, or run x2ssh as root\n"


def test_another_instance_refused(monkeypatch, capsys):
    fake = Fake(monkeypatch, refuse={"start": AlreadyRunning("another x2ssh (pid 42) is running")})
    assert cli.main(["--vpn", "host"]) == 75
    assert ("run_vpn",) not in fake.calls and fake.calls[-1] == ("down",)
    assert "pid 42" in capsys.readouterr().err


def test_tun_name_taken(monkeypatch, capsys):
    Fake(monkeypatch, refuse={"start": TunNameTaken("a network interface named x2ssh0 already exists")})
    assert cli.main(["--vpn", "host"]) == 73
    assert "x2ssh0 already exists" in capsys.readouterr().err


def test_sudo_user_is_dropped_to_after_the_helper_starts(monkeypatch, tmp_path):
    fake = Fake(monkeypatch)
    alice = object()
    monkeypatch.setattr(cli, "sudo_user", lambda: alice)
    monkeypatch.setattr(cli, "drop_to", lambda user: fake.calls.append(("drop_to", user)))
    assert cli.main(["--vpn", "--state-dir", str(tmp_path), "host"]) == 0
    assert fake.calls[:3] == [("spawn", tmp_path), ("drop_to", alice), ("start", "x2ssh0")]


def failing_session(exc):
    async def run_vpn(settings, host, notifier=None):
        raise exc

    return run_vpn


def test_session_error_message_without_traceback(monkeypatch, capsys, tmp_path):
    fake = Fake(monkeypatch, failing_session(SshHostKeyRejected("host key of host changed")))
    assert cli.main(["--vpn", "--state-dir", str(tmp_path), "host"]) == 255
    err = capsys.readouterr().err
    assert err == "x2ssh: host key of host changed\n"
    assert fake.calls[-1] == ("down",)  # the helper undoes everything


def test_session_error_traceback_with_verbose(monkeypatch, capsys):
    Fake(monkeypatch, failing_session(SshHostKeyRejected("host key of host changed")))
    assert cli.main(["--vpn", "-v", "host"]) == 255
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("x2ssh: host key of host changed\n")


def test_ctrl_c_exits_130_after_cleanup(monkeypatch, tmp_path):
    fake = Fake(monkeypatch, failing_session(KeyboardInterrupt()))
    assert cli.main(["--vpn", "--state-dir", str(tmp_path), "host"]) == 130
    assert fake.calls[-1] == ("down",)


def test_sigterm_exits_143_after_cleanup(monkeypatch, tmp_path):
    async def run_vpn(settings, host, notifier=None):
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(10)  # interrupted at once; if not, the exit code below is wrong

    fake = Fake(monkeypatch, run_vpn)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["--vpn", "--state-dir", str(tmp_path), "host"]) == 143
    assert fake.calls[-1] == ("down",)
    assert signal.getsignal(signal.SIGTERM) == before


def test_sighup_is_an_orderly_shutdown(monkeypatch, tmp_path):
    async def run_vpn(settings, host, notifier=None):
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(10)

    fake = Fake(monkeypatch, run_vpn)
    before = signal.getsignal(signal.SIGHUP)
    assert cli.main(["--vpn", "--state-dir", str(tmp_path), "host"]) == 129
    assert fake.calls[-1] == ("down",)
    assert signal.getsignal(signal.SIGHUP) == before


def test_internal_error_exit_70(monkeypatch, capsys):
    Fake(monkeypatch, failing_session(ZeroDivisionError("bug")))
    assert cli.main(["--vpn", "host"]) == 70
    err = capsys.readouterr().err
    assert "internal error" in err and "ZeroDivisionError" in err


def test_vpn_cleanup_only(monkeypatch, tmp_path):
    fake = Fake(monkeypatch)
    assert cli.main(["--vpn-cleanup", "--state-dir", str(tmp_path)]) == 0
    assert fake.calls == [("spawn", tmp_path), ("cleanup",), ("down",)]


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


def test_settle_heap_raises_the_young_threshold_and_freezes_the_start_up_heap() -> None:
    before = gc.get_threshold()
    gc.unfreeze()
    cli.settle_heap()
    assert gc.get_threshold() == (cli.YOUNG_GENERATION_THRESHOLD, *before[1:])
    assert gc.get_freeze_count() > 0
