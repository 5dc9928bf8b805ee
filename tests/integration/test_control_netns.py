"""The control socket is per network namespace: a run inside a namespace answers `x2ssh status` and
`x2ssh down` there, under run_dir/ns-NAME/, and is invisible from the host namespace (exit 3 there)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from x2ssh.host.journal import INITIAL_NETNS_KEY
from x2ssh.status_command import main_status

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for the session: the control server with a down() that ends the process, in its namespace.
RUN = """
import asyncio, sys
from pathlib import Path
from x2ssh.control import ControlServer, control_dir, control_socket_path
from x2ssh.host.journal import current_netns_identity

async def main(run_dir):
    control_dir(run_dir).mkdir(mode=0o700, parents=True)
    stop = asyncio.Event()
    status = lambda: {"state": "up", "netns": current_netns_identity().key}
    async with ControlServer(control_socket_path(run_dir), status, stop.set, set()):
        print("listening", flush=True)
        await stop.wait()

asyncio.run(main(Path(sys.argv[1])))
"""


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"x2ctl-{os.getpid()}-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="x2ssh-run-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def in_netns(name: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", name, sys.executable, *argv]


def test_status_and_down_reach_the_run_of_their_own_namespace(
    netns: str, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with subprocess.Popen(
        in_netns(netns, "-c", RUN, str(run_dir)), stdout=subprocess.PIPE, text=True, cwd=ROOT
    ) as server:
        try:
            assert server.stdout is not None
            assert server.stdout.readline() == "listening\n"
            assert (run_dir / f"ns-{netns}" / "control.sock").exists()

            # the host namespace has its own (empty) place: nothing runs there
            assert main_status(["--run-dir", str(run_dir)]) == 3
            assert "no x2ssh is running in this network namespace" in capsys.readouterr().err
            assert not (run_dir / INITIAL_NETNS_KEY).exists()

            command = "-m", "x2ssh.status_command"
            status = subprocess.run(
                in_netns(netns, *command, "status", "--json", "--run-dir", str(run_dir)),
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=60,
            )
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout) == {"state": "up", "netns": f"ns-{netns}"}

            down = subprocess.run(
                in_netns(netns, *command, "down", "--run-dir", str(run_dir)),
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=60,
            )
            assert down.returncode == 0, down.stderr
            assert "stopped" in down.stderr
            assert server.wait(timeout=30) == 0
            assert not (run_dir / f"ns-{netns}" / "control.sock").exists()

            again = subprocess.run(
                in_netns(netns, *command, "status", "--run-dir", str(run_dir)),
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=60,
            )
            assert again.returncode == 3
        finally:
            if server.poll() is None:
                server.kill()
            server.wait()
