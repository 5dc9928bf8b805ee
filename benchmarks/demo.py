"""`make demo`: x2ssh --vpn end to end, in a namespace lab it builds and removes (needs root).

A client namespace whose only way to the target network is the SSH server (IP forwarding off there) runs
`x2ssh --vpn`; then real clients in it fetch a file over IPv4 and IPv6, resolve a name through the server's
resolver, hit a closed port, and finally x2ssh is stopped with Ctrl-C and the routes are shown restored.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rich.console import Console

from benchmarks.lab import Lab
from benchmarks.services import start_target_services

console = Console()
TOP = Path(__file__).resolve().parent.parent


def _show(lab: Lab, title: str, argv: list[str]) -> subprocess.CompletedProcess:
    console.rule(f"[bold]{title}")
    console.print(f"client$ {' '.join(argv)}", style="dim", markup=False)
    done = lab.run(lab.client, argv, capture_output=True, text=True, timeout=120)
    console.print((done.stdout + done.stderr).rstrip() or f"(exit {done.returncode})", markup=False)
    return done


def main() -> int:
    with Lab() as lab:
        sshd = lab.sshd()
        services = start_target_services(lab, big_file_size=50 * 1024 * 1024)
        target = lab.target_addr
        _show(
            lab,
            "Before: the target is unreachable from the client",
            ["curl", "-sS", "-m", "3", f"http://{target.v4}/1k.bin"],
        )
        routes_before = lab.run(lab.client, ["ip", "route"], capture_output=True, text=True).stdout
        argv = [
            sys.executable, "-m", "x2ssh", "--vpn", f"root@{sshd.host}", "-p", str(sshd.port),
            "-i", str(sshd.client_key), "-o", f"UserKnownHostsFile={sshd.known_hosts}",
            "-o", "StrictHostKeyChecking=yes",
        ]  # fmt: skip
        console.rule("[bold]Starting x2ssh --vpn in the client namespace")
        console.print(f"client$ {' '.join(argv)}", style="dim", markup=False)
        vpn = lab.popen(
            lab.client, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=TOP
        )
        lines: list[str] = []

        def pump() -> None:
            assert vpn.stdout is not None
            for line in vpn.stdout:
                lines.append(line)
                console.print(f"x2ssh | {line.rstrip()}", style="cyan", markup=False)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + 30
        while not any("VPN up" in line for line in lines):
            if vpn.poll() is not None or time.monotonic() > deadline:
                console.print("[red]x2ssh did not come up")
                return 1
            time.sleep(0.1)
        _show(lab, "Routes with the VPN up", ["ip", "route"])
        big = services.http.files["big.bin"]
        done = _show(
            lab,
            "A 50 MiB download through the tunnel",
            ["sh", "-c", f"curl -sS -w '%{{speed_download}} B/s\\n' -o /tmp/x2ssh-demo.bin http://{target.v4}/big.bin"
             f" && sha256sum /tmp/x2ssh-demo.bin && rm -f /tmp/x2ssh-demo.bin"],
        )  # fmt: skip
        ok = big.sha256 in done.stdout
        console.print(
            f"sha256 {'[green]matches' if ok else '[red]differs from'} the served file ({big.sha256[:16]}…)"
        )
        _show(
            lab,
            "IPv6 through the tunnel",
            [
                "curl",
                "-sS",
                "-g",
                f"http://[{target.v6}]/1k.bin",
                "-o",
                "/dev/null",
                "-w",
                "HTTP %{http_code}\\n",
            ],
        )
        _show(lab, "DNS through the tunnel (the server's resolver)", ["dig", "+short", "lab.test"])
        _show(
            lab,
            "A closed port is refused at once",
            ["curl", "-sS", "-m", "5", f"http://{target.v4}:{services.closed_port}/"],
        )
        console.rule("[bold]Ctrl-C: x2ssh restores everything")
        vpn.send_signal(signal.SIGINT)
        vpn.wait(30)
        time.sleep(0.2)
        routes_after = lab.run(lab.client, ["ip", "route"], capture_output=True, text=True).stdout
        same = routes_after == routes_before
        verdict = "[green]restored exactly" if same else "[red]differ"
        console.print(f"x2ssh exited with {vpn.returncode}; routes {verdict}")
        return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
