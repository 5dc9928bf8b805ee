r"""The server's operating system, and the command lines that start the agent on a Windows server.

Pure functions returning strings (and one small async loop over an injected runner), so every command line
is unit-tested without a server. Nothing here imports asyncssh.

OS detection (`detect_remote_os`): `uname -s`, else `cmd /c ver`, else PowerShell asked for
`[Environment]::OSVersion.Platform` through -EncodedCommand (base64 of UTF-16LE text: no quoting at all).

Command lines that cmd and PowerShell parse alike. Win32-OpenSSH hands an exec request to its default
shell, cmd.exe or PowerShell, which quote differently. `neutral_command` writes each argument either bare
(only characters neither shell treats specially) or in double quotes with none of `"`, `$`, backtick, `%`
and `!` inside: in double quotes cmd expands only %VAR% (and !VAR! with delayed expansion) and PowerShell
only $variables and backtick escapes, so the program gets the same argv from either shell. Anything else
is refused rather than guessed. Bare words start with a letter, `/` or `\`, or are plain `-flags`:
PowerShell reads a bare word that starts with a digit as a number (`1kb`, `60.0`) and splits a bare
`-name.value` at the dot, so those go in quotes. Only printable ASCII (PowerShell also takes typographic
quotes and dashes as syntax). The first word is never quoted: PowerShell reads a line that starts with a
quoted string as an expression, not a command (it would need `& "..."`, which cmd does not know).

How Win32-OpenSSH hands the command over (contrib/win32/win32compat/w32-doexec.c): to cmd.exe as
`cmd.exe /c "COMMAND"` (cmd strips those outer quotes again), to PowerShell as the single argument after
`-c`; so each shell parses COMMAND exactly as written.

The agent on Windows (`windows_start_command`): one exec channel runs the chosen python with a bootstrap
program (compressed and base64-encoded into a neutral argument) that
1. resolves %TEMP% itself (tempfile.gettempdir(): no %TEMP% vs $env:TEMP in the command line) and creates
   `%TEMP%\.x2ssh-agent-<random>` with os.mkdir (fails rather than reuse anything);
2. gives it an ACL for this user only: `icacls DIR /inheritance:r /grant:r *<user SID>:(OI)(CI)F`, the SID
   from `whoami /user` (argv lists through subprocess, no shell);
3. reads exactly the zipapp's size from stdin (binary mode) into `agent.pyz` (exclusive create);
4. runs `python -I agent.pyz --dir DIR ...` as a child that gets stdin/stdout/stderr passed explicitly
   (without them, subprocess on Windows turns handle inheritance off and relies on the console's
   implicit copy of standard handles, which an sshd session need not offer), waits for it (Windows has
   no exec: os.execv would start a new process and end this one, and the SSH channel with it), and
   then deletes the directory (the agent's own cleanup cannot delete agent.pyz while Python has it open);
5. removes stale agent directories of earlier runs: a live run holds `lock` open, which Windows refuses to
   delete, so only directories whose bootstrap is gone are removed.
The client then talks to the agent over the exec channel's stdin/stdout (Win32-OpenSSH cannot forward to
named pipes: PowerShell/Win32-OpenSSH issue 435).
"""

from __future__ import annotations

import base64
import enum
import re
import zlib
from collections.abc import Awaitable, Callable, Sequence

WINDOWS_AGENT_PREFIX = ".x2ssh-agent-"
WINDOWS_PYTHONS = ("python", "py -3")
ICACLS_FLAGS = ("/inheritance:r", "/grant:r")
ICACLS_RIGHTS = "(OI)(CI)F"  # full control, inherited by files (OI) and subdirectories (CI)


class RemoteOS(enum.Enum):
    POSIX = "posix"
    WINDOWS = "windows"
    UNKNOWN = "unknown"


class NotNeutral(ValueError):
    """An argument that cmd and PowerShell would not pass through alike."""


# ---- OS detection ---------------------------------------------------------------------------------------

_PS_PLATFORM = "[Environment]::OSVersion.Platform"
OS_PROBES = (
    "uname -s",
    "cmd /c ver",
    "powershell -NoProfile -NonInteractive -EncodedCommand "
    + base64.b64encode(_PS_PLATFORM.encode("utf-16-le")).decode(),
)
_WINDOWS_UNAMES = ("CYGWIN", "MINGW", "MSYS")  # a POSIX layer on Windows: the agent runs as on Windows


def classify(probe: int, exit_status: int | None, stdout: str) -> RemoteOS:
    """What one probe's answer says; UNKNOWN means: ask the next probe."""
    text = stdout.strip()
    if exit_status != 0 or not text:
        return RemoteOS.UNKNOWN
    if probe == 0:
        return RemoteOS.WINDOWS if text.upper().startswith(_WINDOWS_UNAMES) else RemoteOS.POSIX
    if probe == 1:
        return RemoteOS.WINDOWS if "windows" in text.lower() else RemoteOS.UNKNOWN
    last = text.splitlines()[-1].strip()
    if last == "Win32NT":
        return RemoteOS.WINDOWS
    return RemoteOS.POSIX if last in ("Unix", "MacOSX") else RemoteOS.UNKNOWN


Runner = Callable[[str], Awaitable[tuple[int | None, str]]]


async def detect_remote_os(run: Runner) -> RemoteOS:
    """Ask the probes in order (`run(command)` -> (exit status, stdout)); the first clear answer wins."""
    for index, command in enumerate(OS_PROBES):
        try:
            status, stdout = await run(command)
        except OSError:
            continue
        answer = classify(index, status, stdout)
        if answer is not RemoteOS.UNKNOWN:
            return answer
    return RemoteOS.UNKNOWN


# ---- neutral command lines ------------------------------------------------------------------------------

_BARE = re.compile(r"[A-Za-z_/\\][A-Za-z0-9_.:/=+\\-]*|--?[A-Za-z0-9][A-Za-z0-9-]*")
_NEVER_IN_QUOTES = set('"$`%!')


def neutral_arg(arg: str) -> str:
    """One argument written so that cmd and PowerShell pass the same string to the program."""
    if arg == "--%":
        raise NotNeutral("--% is PowerShell's stop-parsing token")
    if _BARE.fullmatch(arg):
        return arg
    printable = all(" " <= c <= "~" for c in arg)
    if not arg or not printable or _NEVER_IN_QUOTES & set(arg) or arg.endswith("\\"):
        raise NotNeutral(f"cannot write {arg!r} so that cmd and PowerShell parse it alike")
    return f'"{arg}"'


def neutral_command(argv: Sequence[str]) -> str:
    """A command line that cmd.exe and PowerShell both turn into `argv` (raises NotNeutral otherwise)."""
    if not argv:
        raise NotNeutral("empty command")
    if not _BARE.fullmatch(argv[0]) or argv[0].startswith("-"):
        raise NotNeutral(f"the program name {argv[0]!r} must be a bare word (PowerShell would not run it)")
    return " ".join(neutral_arg(a) for a in argv)


def python_argv(python: str) -> list[str]:
    """A python candidate ('python', 'py -3') as argv."""
    return python.split()


def _packed(code: str) -> str:
    data = base64.b64encode(zlib.compress(code.encode(), 9)).decode()
    return f"import base64,zlib;exec(zlib.decompress(base64.b64decode('{data}')))"


PROBE_CODE = (
    "import sys;sys.stdout.write('X2SSH-PY %d %d %s %s\\n' % "
    "(sys.version_info[0], sys.version_info[1], sys.platform, sys.executable))"
)


def python_probe_command(python: str) -> str:
    """Run a python candidate to print 'X2SSH-PY MAJOR MINOR PLATFORM EXECUTABLE' (as deploy's probe)."""
    return neutral_command([*python_argv(python), "-I", "-c", _packed(PROBE_CODE)])


# ---- the agent on Windows -------------------------------------------------------------------------------


def icacls_argv(directory: str, sid: str) -> list[str]:
    """icacls arguments that leave `directory` to the user with this SID only (no inherited entries)."""
    if not re.fullmatch(r"S-1-[0-9-]+", sid):
        raise ValueError(f"not a SID: {sid!r}")
    return ["icacls", directory, ICACLS_FLAGS[0], ICACLS_FLAGS[1], f"*{sid}:{ICACLS_RIGHTS}"]


# Runs on the server under the chosen python (3.8+, stdlib only). argv: NAME SIZE AGENT-ARGS...
# ICACLS_FLAGS and ICACLS_RIGHTS are filled in from this module (one definition for the tests to compare).
WINDOWS_BOOTSTRAP = r"""
import csv, io, os, shutil, subprocess, sys, tempfile
PREFIX, FLAGS, RIGHTS = @PREFIX@, @FLAGS@, @RIGHTS@
def say(msg):
    sys.stdout.write('X2SSH-AGENT ERROR ' + msg + '\n'); sys.stdout.flush(); sys.exit(3)
def stale(base):
    for entry in os.listdir(base):
        d = os.path.join(base, entry)
        if not entry.startswith(PREFIX) or not os.path.isdir(d) or os.path.islink(d): continue
        try: os.remove(os.path.join(d, 'lock'))
        except FileNotFoundError: pass
        except OSError: continue
        shutil.rmtree(d, ignore_errors=True)
def user_sid():
    out = subprocess.run(['whoami', '/user', '/fo', 'csv', '/nh'], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, check=True).stdout.decode('utf-8', 'replace')
    return next(csv.reader(io.StringIO(out.strip())))[1]
name, size = sys.argv[1], int(sys.argv[2])
if not name.isalnum(): say('bad directory name %r' % name)
base = tempfile.gettempdir()
try: stale(base)
except OSError: pass
d = os.path.join(base, PREFIX + name)
try: os.mkdir(d)
except OSError as e: say('cannot create %s: %s' % (d, e))
lock = open(os.path.join(d, 'lock'), 'xb')
def remove():
    lock.close(); shutil.rmtree(d, ignore_errors=True)
try:
    subprocess.run(['icacls', d, FLAGS[0], FLAGS[1], '*%s:%s' % (user_sid(), RIGHTS)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
except (OSError, IndexError, StopIteration, subprocess.CalledProcessError) as e:
    remove(); say('cannot restrict %s to this user: %s' % (d, e))
try:
    import msvcrt
    msvcrt.setmode(0, os.O_BINARY); msvcrt.setmode(1, os.O_BINARY)
except ImportError: pass
path = os.path.join(d, 'agent.pyz')
try:
    with open(path, 'xb') as f:
        left = size
        while left:
            chunk = os.read(0, min(left, 65536))
            if not chunk: raise OSError('upload ended after %d of %d bytes' % (size - left, size))
            f.write(chunk); left -= len(chunk)
except OSError as e:
    remove(); say('upload failed: %s' % e)
argv = [sys.executable, '-I', path, '--dir', d] + sys.argv[3:]
try: rc = subprocess.call(argv, stdin=0, stdout=1, stderr=2)
except OSError as e: remove(); say('cannot start the agent: %s' % e)
remove()
sys.exit(rc)
"""


def windows_bootstrap_code() -> str:
    """The bootstrap program with this module's constants filled in."""
    return (
        WINDOWS_BOOTSTRAP.replace("@PREFIX@", repr(WINDOWS_AGENT_PREFIX))
        .replace("@FLAGS@", repr(ICACLS_FLAGS))
        .replace("@RIGHTS@", repr(ICACLS_RIGHTS))
    )


def windows_start_command(python: str, name: str, zipapp_size: int, agent_args: Sequence[str]) -> str:
    """The one command line that creates the directory, uploads the zipapp (from stdin) and runs it."""
    if not name.isalnum():
        raise ValueError(f"directory name must be letters and digits: {name!r}")
    argv = [*python_argv(python), "-I", "-c", _packed(windows_bootstrap_code()), name, str(zipapp_size)]
    return neutral_command([*argv, *agent_args])


def python_candidates(os_kind: RemoteOS, posix: Sequence[str]) -> tuple[str, ...]:
    """The pythons to probe: `posix` (the settings' list) on POSIX servers; `python`, `py -3` on Windows."""
    return WINDOWS_PYTHONS if os_kind is RemoteOS.WINDOWS else tuple(posix)
