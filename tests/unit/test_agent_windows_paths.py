"""The agent's Windows code paths, run on Linux with the OS-specific calls faked or swapped in.

On Windows the agent has no Unix socket (stdio only), bridges stdin/stdout to a socket because select()
waits only on sockets there, reads/writes/closes that socket through `fd_read`/`fd_writev`/`fd_close`, and
trusts the directory's ACL (set by the bootstrap) instead of uid and mode bits.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import types
from pathlib import Path

import pytest

from agent import agent_main as A
from agent import protocol as p

TOKEN = bytes(range(32))


def test_windows_directory_check_trusts_the_acl_not_mode_bits(tmp_path: Path) -> None:
    d = tmp_path / "agent"
    d.mkdir(mode=0o755)
    with pytest.raises(RuntimeError, match="accessible by others"):
        A.check_private_directory(str(d), windows=False)
    A.check_private_directory(str(d), windows=True)  # mode bits mean nothing on Windows


def test_windows_directory_check_refuses_links_files_and_reparse_points(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "file").write_text("")
    for name in ("link", "file"):
        with pytest.raises(RuntimeError, match="not a directory"):
            A.check_private_directory(str(tmp_path / name), windows=True)
    real = os.lstat(target)
    junction = types.SimpleNamespace(st_mode=real.st_mode, st_file_attributes=A.FILE_ATTRIBUTE_REPARSE_POINT)
    monkeypatch.setattr(A.os, "lstat", lambda path: junction)
    with pytest.raises(RuntimeError, match="junction or symbolic link"):
        A.check_private_directory(str(target), windows=True)


def test_stop_signals_skip_what_the_platform_lacks() -> None:
    import signal

    assert signal.SIGTERM in A.STOP_SIGNALS and signal.SIGINT in A.STOP_SIGNALS
    assert all(isinstance(s, int) for s in A.STOP_SIGNALS)


def _read_exactly(fd: int, n: int, timeout: float = 10.0) -> bytes:
    out = b""
    while len(out) < n:
        if not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError(f"got {len(out)} of {n} bytes")
        chunk = os.read(fd, n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def test_stdio_bridge_carries_bytes_and_eof_both_ways() -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    sock = A.stdio_bridge(in_r, out_w)
    try:
        os.write(in_w, b"from the client")
        assert sock.recv(100) == b"from the client"
        sock.sendall(b"to the client")
        assert _read_exactly(out_r, 13) == b"to the client"
        os.close(in_w)  # the SSH channel's stdin ended
        assert sock.recv(100) == b""
        A._socket_close(sock.fileno())  # the agent closes its side
        assert _read_exactly(out_r, 1) == b""  # and the client sees the end of the output
    finally:
        for fd in (in_r, out_r):
            os.close(fd)


class _Client:
    """The x2ssh side of the exec channel: writes the agent's stdin pipe, reads its stdout pipe."""

    def __init__(self, w: int, r: int) -> None:
        self.w, self.r = w, r
        self.decoder = p.Decoder()
        self.frames: list[p.Frame] = []

    def send(self, frame: p.Frame) -> None:
        os.write(self.w, p.encode(frame))

    def expect(self, kind: type) -> p.Frame:
        while True:
            while self.frames:
                frame = self.frames.pop(0)
                if isinstance(frame, kind):
                    return frame
            if not select.select([self.r], [], [], 10)[0]:
                raise TimeoutError(f"no {kind.__name__}")
            data = os.read(self.r, 65536)
            assert data, f"stdout ended before {kind.__name__}"
            self.frames.extend(self.decoder.feed(data))


def test_agent_runs_stdio_only_over_the_bridge_with_socket_io(tmp_path: Path, monkeypatch) -> None:
    """The Windows main path: no listener, stdin/stdout bridged, the loop doing socket I/O."""
    monkeypatch.setattr(A, "fd_read", A._socket_read)
    monkeypatch.setattr(A, "fd_writev", A._socket_writev)
    monkeypatch.setattr(A, "fd_close", A._socket_close)
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(10)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    fd = A.stdio_bridge(in_r, out_w).fileno()
    os.write(in_w, TOKEN.hex().encode() + b"\n")
    assert A.read_token(fd, 10) == TOKEN  # select() on the bridge socket, as on Windows
    A.set_nonblocking(fd)
    config = A.AgentConfig(directory=str(tmp_path), resolv_conf=str(tmp_path / "none"))
    agent = A.Agent(config, TOKEN, None, fd, None, stdout_fd=fd)
    result: list[str] = []
    runner = threading.Thread(target=lambda: result.append(agent.run()))
    runner.start()
    client = _Client(in_w, out_r)
    try:
        client.send(p.Hello(1, 2, TOKEN))
        welcome = client.expect(p.Welcome)
        assert welcome.version == 2
        client.send(p.OpenFlow(7, echo.getsockname()))
        client.send(p.Datagram(7, None, b"ping over stdio"))
        payload, peer = echo.recvfrom(100)
        assert payload == b"ping over stdio"
        echo.sendto(b"pong", peer)
        reply = client.expect(p.Datagram)
        assert (reply.flow_id, reply.payload) == (7, b"pong")
        client.send(p.Goodbye())
    finally:
        os.close(in_w)  # stdin EOF: the SSH session is gone
        runner.join(10)
        agent.close()
        echo.close()
        for x in (in_r, out_r):
            os.close(x)
    assert not runner.is_alive() and result, "the agent did not stop when its stdio ended"
    assert fd not in A._SOCKETS  # the bridge socket was closed through fd_close


class _WindowsAgent:
    """An agent as main() starts it on Windows: no listener, stdio bridged to a socket, socket I/O."""

    def __init__(self, tmp_path: Path, monkeypatch, reattach_grace: float = 60.0) -> None:
        monkeypatch.setattr(A, "fd_read", A._socket_read)
        monkeypatch.setattr(A, "fd_writev", A._socket_writev)
        monkeypatch.setattr(A, "fd_close", A._socket_close)
        monkeypatch.setattr(A, "PING_SOCKETS", False)
        monkeypatch.setattr(A, "ERROR_QUEUE", False)
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        fd = A.stdio_bridge(self.in_r, self.out_w).fileno()
        A.set_nonblocking(fd)
        config = A.AgentConfig(
            directory=str(tmp_path), resolv_conf=str(tmp_path / "none"), reattach_grace=reattach_grace
        )
        self.agent = A.Agent(config, TOKEN, None, fd, None, stdout_fd=fd)
        self.result: list[str] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.agent.run()))
        self.thread.start()
        self.client = _Client(self.in_w, self.out_r)
        self.client.send(p.Hello(1, 2, TOKEN))
        assert self.client.expect(p.Welcome).version == 2

    def close_stdin(self) -> str:
        os.close(self.in_w)
        self.thread.join(10)
        assert not self.thread.is_alive(), "the agent did not stop when its stdin ended"
        self.agent.close()
        for fd in (self.in_r, self.out_r):
            os.close(fd)
        return self.result[0]


def test_without_a_listener_a_lost_client_ends_the_agent_at_once(tmp_path: Path, monkeypatch) -> None:
    """Windows: nobody can re-attach (stdio only), so a v2 client lost without GOODBYE does not keep the
    agent for the 60 s grace; it stops as soon as stdin ends."""
    win = _WindowsAgent(tmp_path, monkeypatch, reattach_grace=60.0)
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    try:
        win.client.send(p.OpenFlow(3, echo.getsockname()))
        win.client.send(p.Datagram(3, None, b"x"))
        echo.settimeout(10)
        assert echo.recvfrom(10)[0] == b"x"
        reason = win.close_stdin()  # no GOODBYE: the SSH session just went away
    finally:
        echo.close()
    assert "no re-attach without a listening socket" in reason
    assert win.agent.stats.flows_opened == 1 and not win.agent._orphans


def test_icmp_echo_is_refused_with_a_clear_log_on_windows(tmp_path: Path, monkeypatch, caplog) -> None:
    def no_ping(_destination: str) -> None:
        raise AssertionError("no ping socket may be opened on Windows")

    monkeypatch.setattr(A.netio, "open_ping", no_ping)
    caplog.set_level("WARNING", logger="x2ssh.agent")
    win = _WindowsAgent(tmp_path, monkeypatch)
    try:
        for flow_id in (1, 2):
            win.client.send(p.OpenEcho(flow_id, "127.0.0.1"))
            closed = win.client.expect(p.CloseFlow)
            assert (closed.flow_id, closed.reason) == (flow_id, p.CLOSE_NOT_PERMITTED)
        win.client.send(p.Goodbye())
    finally:
        win.close_stdin()
    warnings = [r.getMessage() for r in caplog.records if "ICMP echo is not supported" in r.getMessage()]
    assert warnings == [A.NO_PING_SOCKETS]  # said once, not per ping


def test_unreachable_comes_from_the_errno_without_an_error_queue(tmp_path: Path, monkeypatch) -> None:
    """No recvmsg(MSG_ERRQUEUE) on Windows: the agent must not call it, and still reports a closed port."""

    def no_error_queue(_sock: socket.socket) -> list:
        raise AssertionError("read_errors needs recvmsg, which Windows sockets lack")

    monkeypatch.setattr(A.netio, "read_errors", no_error_queue)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: the kernel answers with ICMP port unreachable
    win = _WindowsAgent(tmp_path, monkeypatch)
    try:
        win.client.send(p.OpenFlow(9, ("127.0.0.1", port)))
        win.client.send(p.Datagram(9, None, b"anyone?"))
        report = win.client.expect(p.Unreachable)
        assert (report.flow_id, report.code, report.reporter) == (9, p.UNREACH_PORT, None)
        win.client.send(p.Goodbye())
    finally:
        win.close_stdin()


def test_windows_connreset_means_port_unreachable(monkeypatch) -> None:
    import errno

    monkeypatch.setattr(A, "CONNRESET_IS_PORT_UNREACHABLE", False)
    assert A.unreachable_from_errno(errno.ECONNRESET) is None
    monkeypatch.setattr(A, "CONNRESET_IS_PORT_UNREACHABLE", True)
    assert A.unreachable_from_errno(errno.ECONNRESET) == p.UNREACH_PORT
    assert A.unreachable_from_errno(errno.EHOSTUNREACH) == p.UNREACH_HOST
    assert A.unreachable_from_errno(None) is None


def test_windows_flow_cap_fits_select() -> None:
    assert A.effective_max_flows(1024, windows=True) == A.WINDOWS_MAX_FLOWS < 512
    assert A.effective_max_flows(100, windows=True) == 100
    assert A.effective_max_flows(1024, windows=False) == 1024


@pytest.mark.parametrize("bootstrap_waits", [False, True])
def test_cleanup_leaves_a_bootstrap_owned_directory_to_the_bootstrap(
    tmp_path: Path, bootstrap_waits: bool, caplog
) -> None:
    d = tmp_path / ".x2ssh-agent-ab12"
    d.mkdir(mode=0o700)
    for name in ("agent.pyz", "agent.sock", *(["lock"] if bootstrap_waits else [])):
        (d / name).write_bytes(b"")
    config = A.AgentConfig(directory=str(d), zipapp_path=str(d / "agent.pyz"))
    caplog.set_level("WARNING", logger="x2ssh.agent")
    A.cleanup(config)
    if bootstrap_waits:  # the Windows bootstrap removes the rest once the agent has exited
        assert sorted(os.listdir(d)) == ["agent.pyz", "lock"]
    else:
        assert not d.exists()
    assert not caplog.records
