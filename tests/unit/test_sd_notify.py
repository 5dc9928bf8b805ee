"""sd_notify: exact datagrams received by a real AF_UNIX listener (path and abstract), the watchdog interval,
and that a missing or broken NOTIFY_SOCKET never raises."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from x2ssh.sd_notify import Notifier, notify_address, watchdog_loop


class Listener:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value
        sock.settimeout(5)

    def receive(self) -> bytes:
        return self.sock.recv(65536)

    def pending(self) -> list[bytes]:
        self.sock.setblocking(False)
        got = []
        try:
            while True:
                got.append(self.sock.recv(65536))
        except BlockingIOError:
            return got
        finally:
            self.sock.settimeout(5)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = tmp_path / "notify"
        sock.bind(str(path))
        env_value = str(path)
    else:
        name = f"x2ssh-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        env_value = "@" + name
    with sock:
        yield Listener(sock, env_value)


def test_messages_arrive_in_order_as_exact_datagrams(listener: Listener) -> None:
    with Notifier({"NOTIFY_SOCKET": listener.env_value}) as n:
        assert n.enabled
        assert n.ready()
        assert n.status("up, server vpn.example, 3 TCP flows, 0 reconnects")
        assert n.watchdog()
        assert n.stopping()
        got = [listener.receive() for _ in range(4)]
        assert got == [
            b"READY=1",
            b"STATUS=up, server vpn.example, 3 TCP flows, 0 reconnects",
            b"WATCHDOG=1",
            b"STOPPING=1",
        ]


def test_status_is_one_bounded_line(listener: Listener) -> None:
    with Notifier({"NOTIFY_SOCKET": listener.env_value}) as n:
        n.status("reconnecting\nREADY=1\n  to  vpn")  # a newline must not smuggle in another assignment
        assert listener.receive() == b"STATUS=reconnecting READY=1 to vpn"
        n.status("x" * 5000)
        assert listener.receive() == b"STATUS=" + b"x" * 1024


def test_several_assignments_in_one_datagram(listener: Listener) -> None:
    with Notifier({"NOTIFY_SOCKET": listener.env_value}) as n:
        n.send("READY=1", "STATUS=up")
        assert listener.receive() == b"READY=1\nSTATUS=up"


def test_unset_is_a_silent_no_op(caplog: pytest.LogCaptureFixture) -> None:
    with Notifier({}) as n:
        assert not n.enabled
        assert not n.ready() and not n.status("x") and not n.watchdog() and not n.stopping()
        assert n.watchdog_interval() is None
        assert caplog.records == []


def test_listener_gone_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) as n:
        with caplog.at_level(logging.DEBUG, logger="x2ssh.sd_notify"):
            assert not n.ready()
            assert not n.status("x")
            assert not n.stopping()
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1
        assert "cannot notify systemd" in warnings[0].getMessage()


def test_listener_that_comes_back_gets_later_messages(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with Notifier({"NOTIFY_SOCKET": str(path)}) as n:
        assert not n.ready()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            sock.settimeout(5)
            assert n.stopping()
            assert sock.recv(100) == b"STOPPING=1"


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234", "/" + "x" * 200])
def test_unusable_address_disables_with_a_warning(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with Notifier({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "1000000"}) as n:
        assert not n.enabled
        assert not n.ready()
        assert n.watchdog_interval() is None
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_notify_address_forms() -> None:
    assert notify_address(None) is None
    assert notify_address("") is None
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@x/y") == b"\0x/y"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "abc"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    with Notifier({"NOTIFY_SOCKET": "@x2ssh-test-unused", **env}) as n:
        assert n.watchdog_interval() == expected


def test_unset_environment_hides_the_socket_from_children(listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "1000000", "PATH": "/bin"}
    with Notifier(env, unset_environment=True) as n:
        assert env == {"PATH": "/bin"}
        assert n.watchdog_interval() == 1.0
        assert n.ready()
        assert listener.receive() == b"READY=1"


def test_watchdog_loop_pings_repeatedly(listener: Listener) -> None:
    n = Notifier({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "20000"})  # ping every 10 ms

    async def run() -> None:
        task = asyncio.create_task(watchdog_loop(n))
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(None, listener.receive)
        second = await loop.run_in_executor(None, listener.receive)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (first, second) == (b"WATCHDOG=1", b"WATCHDOG=1")

    with n:
        asyncio.run(run())


def test_watchdog_loop_returns_without_a_watchdog(listener: Listener) -> None:
    with Notifier({"NOTIFY_SOCKET": listener.env_value}) as n:
        asyncio.run(asyncio.wait_for(watchdog_loop(n), 5))
        assert listener.pending() == []
