"""Deploy, start, reach and stop the UDP agent on the SSH server (client side, asyncssh).

`deploy_agent(conn)` does, over the one SSH connection:

1. Probe (`probe.py`, once per server, cached for reconnects): the server's OS (`uname -s`, else
   `cmd /c ver`, else PowerShell), then each python candidate (`python3`, `/usr/bin/python3`, `python`;
   on Windows `python`, `py -3`) with `-I -c` to print its version, `sys.platform` and path, all at once
   (one exec channel each, no shell syntax beyond a plainly quoted argv, so any login shell runs it; `-I`
   ignores PYTHON* variables and user site).
2. POSIX servers: upload and start in one exec channel: a tiny bootstrap run by the chosen python creates
   `/tmp/.x2ssh-agent-<random>` (mode 0700, `mkdir` fails rather than reuse anything), reads exactly
   the zipapp's size from stdin into `agent.pyz` (O_EXCL|O_NOFOLLOW, 0600) and `exec`s
   `python -I agent.pyz --dir DIR ...`. The agent then reads the token line from the same stdin.
   Why not SFTP: the sftp subsystem is often disabled or chrooted (internal-sftp), so /tmp there may
   not be the /tmp the agent sees; why not `cat >`: it depends on the login shell's redirection syntax
   and cannot create the directory and file atomically with the right modes. Streaming into the same
   python that will run the agent needs nothing but that python, costs one round trip, and keeps the
   exec channel whose closing (stdin EOF) makes the agent clean up and exit.
   The bootstrap also removes stale agent directories of this user (socket present but refusing
   connections: the agent was SIGKILLed), so a new x2ssh never trips over them.
3. Read `X2SSH-AGENT READY <path>` from stdout, open a `direct-streamlocal` channel to that path and
   send HELLO with the token; WELCOME completes the handshake. Where the server refuses streamlocal
   forwarding (`AllowStreamLocalForwarding no`), the same frames go over the exec channel's
   stdin/stdout instead (the agent reads its stdin as a client connection), so any sshd works.

Windows servers (`remote_os.windows_start_command`): one command line that cmd and PowerShell parse alike
runs a bootstrap that creates `%TEMP%\\.x2ssh-agent-<random>` with an ACL for the user only (icacls),
reads the zipapp from stdin, runs the agent as its child and deletes the directory when it exits. The
frames always ride the exec channel's stdin/stdout: Win32-OpenSSH cannot forward to named pipes
(PowerShell/Win32-OpenSSH issue 435), so such an agent cannot be re-attached either; it exits with its
exec channel.

`reattach_agent(conn, previous)` reaches an agent that lost its SSH connection through a new one, with the
same token, and resumes its flows (their server-side ports stay): over streamlocal, or by running a small
connector (stdin/stdout <-> the agent's socket) where streamlocal is refused.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import secrets
import shlex
import zlib

import asyncssh

from agent import protocol as p
from agent.zipapp import build_zipapp
from x2ssh.agent_client import remote_os as ros
from x2ssh.agent_client.link import (
    AgentHandle,
    AgentReceiver,
    AgentSettings,
    AgentUnavailable,
    ServerPython,
)
from x2ssh.agent_client.probe import ServerFacts, ServerFactsCache, server_facts, server_key

__all__ = [
    "SERVER_FACTS",
    "AgentHandle",
    "AgentReceiver",
    "AgentSettings",
    "AgentUnavailable",
    "ServerFacts",
    "ServerFactsCache",
    "ServerPython",
    "deploy_agent",
    "reattach_agent",
]

log = logging.getLogger(__name__)

READY_PREFIX = b"X2SSH-AGENT READY "
ERROR_PREFIX = b"X2SSH-AGENT ERROR "
AGENT_DIR_PREFIX = "/tmp/.x2ssh-agent-"
STDIO_ONLY = "stdio"  # what a Windows agent's READY line names instead of a socket path

# What deployments learnt about each server; deploy_agent() uses it unless given a cache of its own. One per
# process: the session calls deploy_agent() afresh after every reconnect.
SERVER_FACTS = ServerFactsCache()

# Runs on the server under the chosen python (3.8+). argv: DIR SIZE AGENT-ARGS...
_BOOTSTRAP = r"""
import glob, os, socket, stat, sys, time
def say(msg):
    sys.stdout.write('X2SSH-AGENT ERROR ' + msg + '\n'); sys.stdout.flush(); sys.exit(3)
def remove(d):
    for name in ('agent.sock', 'agent.pyz'):
        try: os.unlink(os.path.join(d, name))
        except OSError: pass
    try: os.rmdir(d)
    except OSError: pass
def stale(d):
    info = os.lstat(d)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid(): return False
    path = os.path.join(d, 'agent.sock')
    if not os.path.exists(path): return time.time() - info.st_mtime > 600
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try: s.connect(path)
    except ConnectionRefusedError: return True
    except OSError: return False
    finally: s.close()
    return False
d, size = sys.argv[1], int(sys.argv[2])
for old in glob.glob(os.path.join(os.path.dirname(d), '.x2ssh-agent-*')):
    try:
        if stale(old): remove(old)
    except OSError: pass
if not sys.executable: say('python has no sys.executable')
try:
    os.mkdir(d, 0o700); os.chmod(d, 0o700)
except OSError as e:
    say('cannot create %s: %s' % (d, e))
path = os.path.join(d, 'agent.pyz')
try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0), 0o600)
    left = size
    while left:
        chunk = os.read(0, min(left, 65536))
        if not chunk: raise OSError('upload ended after %d of %d bytes' % (size - left, size))
        view = memoryview(chunk)
        while view: view = view[os.write(fd, view):]
        left -= len(chunk)
    os.close(fd)
    os.execv(sys.executable, [sys.executable, '-I', path, '--dir', d] + sys.argv[3:])
except OSError as e:
    remove(d)
    say('upload failed: %s' % e)
"""
_BOOTSTRAP_PACKED = base64.b64encode(zlib.compress(_BOOTSTRAP.encode(), 9)).decode()
_BOOTSTRAP_COMMAND = f"import base64,zlib;exec(zlib.decompress(base64.b64decode('{_BOOTSTRAP_PACKED}')))"


# Runs on the server for a re-attach where streamlocal forwarding is refused: pipes stdin/stdout to the
# agent's socket. argv: SOCKET-PATH.
_CONNECTOR = r"""
import os, select, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try: s.connect(sys.argv[1])
except OSError as e:
    sys.stdout.write('X2SSH-AGENT ERROR cannot reach the agent: %s\n' % e); sys.stdout.flush(); sys.exit(3)
sys.stdout.write('X2SSH-AGENT READY %s\n' % sys.argv[1]); sys.stdout.flush()
ins = [0, s]
while s in ins:
    for r in select.select(ins, [], [])[0]:
        data = os.read(r, 262144) if r == 0 else s.recv(262144)
        if r == 0:
            if data: s.sendall(data)
            else: ins.remove(0); s.shutdown(socket.SHUT_WR)
        elif data:
            view = memoryview(data)
            while view: view = view[os.write(1, view):]
        else: ins.remove(s)
"""
_CONNECTOR_PACKED = base64.b64encode(zlib.compress(_CONNECTOR.encode(), 9)).decode()
_CONNECTOR_COMMAND = f"import base64,zlib;exec(zlib.decompress(base64.b64decode('{_CONNECTOR_PACKED}')))"


# --- deployment --------------------------------------------------------------------------------------


async def deploy_agent(
    conn: asyncssh.SSHClientConnection,
    settings: AgentSettings | None = None,
    cache: ServerFactsCache | None = None,
) -> AgentHandle:
    """Upload and start the UDP agent on the server of `conn` and connect to it.

    The server's OS and python come from `cache` (default: SERVER_FACTS) or are probed and stored there.
    Raises AgentUnavailable with a clear reason when the OS cannot be told, no python >= 3.8 is found
    (POSIX or Windows), the upload fails, or the agent does not come up within `settings.start_timeout`.
    """
    settings = settings or AgentSettings()
    cache = SERVER_FACTS if cache is None else cache
    key = server_key(conn)
    facts = cache.get(key)
    if facts is not None:
        try:
            return await _start(conn, facts, settings)
        except AgentUnavailable as exc:
            # The server may have changed (python removed or upgraded): probe again, once.
            log.info(
                "the agent did not start with what was known about the server (%s): probing again", exc.reason
            )
            cache.forget(key)
    facts = await server_facts(conn, settings.python_candidates, settings.probe_timeout)
    handle = await _start(conn, facts, settings)
    cache.put(key, facts)
    return handle


async def _start(
    conn: asyncssh.SSHClientConnection, facts: ServerFacts, settings: AgentSettings
) -> AgentHandle:
    python = facts.python
    name = secrets.token_hex(8)
    zipapp = build_zipapp()
    token = secrets.token_bytes(p.TOKEN_SIZE)
    windows = facts.os is ros.RemoteOS.WINDOWS
    if windows:
        directory = "%TEMP%\\" + ros.WINDOWS_AGENT_PREFIX + name  # the bootstrap resolves %TEMP% itself
        try:
            command = ros.windows_start_command(python.command, name, len(zipapp), settings.agent_args())
        except ros.NotNeutral as exc:
            raise AgentUnavailable(f"cannot write the agent's command line for Windows: {exc}") from exc
    else:
        directory = AGENT_DIR_PREFIX + name
        command = shlex.join(
            [
                python.command,
                "-I",
                "-c",
                _BOOTSTRAP_COMMAND,
                directory,
                str(len(zipapp)),
                *settings.agent_args(),
            ]
        )
    log.info(
        "starting the UDP agent with %s (Python %d.%d) in %s", python.command, *python.version, directory
    )
    if windows:
        log.info(
            "Windows server: the agent is reached over its exec channel (no re-attach after a reconnect), "
            "relays no ICMP echo and carries at most 500 UDP flows"
        )
    try:
        process = await conn.create_process(command, encoding=None)
    except (asyncssh.Error, OSError) as exc:
        raise AgentUnavailable(f"cannot start the agent: {exc}") from exc
    stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
    stderr_task = asyncio.create_task(_forward_stderr(process, stderr_tail))
    handle = None
    try:
        process.stdin.write(zipapp + token.hex().encode() + b"\n")
        socket_path = await asyncio.wait_for(_read_ready_line(process, stderr_tail), settings.start_timeout)
        if windows:
            socket_path = STDIO_ONLY
        handle = AgentHandle(
            process, directory, socket_path, python, token, settings, stderr_tail, stderr_task
        )
        if windows:
            # Win32-OpenSSH cannot forward to named pipes (PowerShell/Win32-OpenSSH issue 435).
            handle.use_stdio(process)
        else:
            try:
                await handle.open_socket(conn)
            except asyncssh.ChannelOpenError as exc:
                # AllowStreamLocalForwarding no (or a server without it): the exec channel carries the frames.
                log.info(
                    "streamlocal forwarding refused (%s): talking to the agent over its stdin/stdout",
                    exc.reason,
                )
                handle.use_stdio(process)
        await handle.handshake(settings.start_timeout)
    except (TimeoutError, AgentUnavailable, asyncssh.Error, OSError) as exc:
        process.close()  # stdin EOF: an agent that did start removes its files and exits
        if handle is not None:
            handle._shutdown("deployment failed")
        if isinstance(exc, AgentUnavailable):
            raise
        if isinstance(exc, TimeoutError):
            raise AgentUnavailable(
                f"the agent did not come up within {settings.start_timeout:g} s{_tail(stderr_tail)}"
            ) from None
        raise AgentUnavailable(f"agent deployment failed: {exc}{_tail(stderr_tail)}") from exc
    log.info(
        "UDP agent up: %s, protocol %d, over %s (%s)",
        handle.software,
        handle.version,
        handle.transport,
        socket_path,
    )
    return handle


async def reattach_agent(
    conn: asyncssh.SSHClientConnection, previous: AgentHandle, settings: AgentSettings | None = None
) -> AgentHandle:
    """Reach the agent `previous` talked to through the new connection `conn` and resume its flows.

    Same token, same socket; streamlocal first, else a connector run through an exec channel. Raises
    AgentUnavailable when the agent is gone (its grace period passed, or the server rebooted).
    """
    settings = settings or previous.settings
    if previous.socket_path == STDIO_ONLY:
        raise AgentUnavailable(
            "the agent on a Windows server is reached over its exec channel only, so it cannot be "
            "re-attached (it exits with that channel)"
        )
    handle = AgentHandle(
        None, previous.directory, previous.socket_path, previous.python, previous.token, settings,
        collections.deque(maxlen=20),
    )  # fmt: skip
    process = None
    try:
        try:
            await handle.open_socket(conn)
        except asyncssh.ChannelOpenError:
            # Refused, or the socket is gone: sshd says "open failed" for both. The connector tells apart.
            command = shlex.join(
                [previous.python.command, "-I", "-c", _CONNECTOR_COMMAND, previous.socket_path]
            )
            process = await conn.create_process(command, encoding=None)
            await asyncio.wait_for(_read_ready_line(process, handle._stderr_tail), settings.start_timeout)
            handle.use_stdio(process)
        await handle.handshake(settings.start_timeout, resume=True)
    except (TimeoutError, AgentUnavailable, asyncssh.Error, OSError) as exc:
        if process is not None:
            process.close()
        handle._shutdown("re-attach failed")
        if isinstance(exc, AgentUnavailable):
            raise
        raise AgentUnavailable(f"cannot re-attach to the agent: {exc}") from exc
    log.info(
        "re-attached to the UDP agent over %s: its flows and their server-side ports carry on",
        handle.transport,
    )
    return handle


async def _read_ready_line(process: asyncssh.SSHClientProcess, stderr_tail: collections.deque[str]) -> str:
    # Login shells may print banners first: look for our marker rather than trusting the first line.
    while True:
        line = await process.stdout.readline()
        if not line:
            await asyncio.sleep(0.05)  # let the stderr forwarder catch the agent's last words
            raise AgentUnavailable(f"the agent exited before it was ready{_tail(stderr_tail)}")
        if line.startswith(READY_PREFIX):
            return line[len(READY_PREFIX) :].decode("utf-8", "replace").strip()
        if line.startswith(ERROR_PREFIX):
            raise AgentUnavailable(line[len(ERROR_PREFIX) :].decode("utf-8", "replace").strip())


async def _forward_stderr(process: asyncssh.SSHClientProcess, tail: collections.deque[str]) -> None:
    try:
        async for raw in process.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                tail.append(line)
                log.info("agent: %s", line)
    except (asyncssh.Error, OSError):
        pass


def _tail(lines: collections.deque[str]) -> str:
    return (": " + " | ".join(list(lines)[-3:])) if lines else ""
