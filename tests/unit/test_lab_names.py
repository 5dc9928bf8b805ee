"""Lab namespace names: unique within a process, and still owned by the process's pid."""

from pathlib import Path

from benchmarks.lab import PREFIX, Lab, _owner_alive


def test_labs_of_one_process_never_share_a_name(tmp_path: Path) -> None:
    labs = [Lab(workdir=tmp_path) for _ in range(2000)]
    names = [lab.client for lab in labs]
    assert len(set(names)) == len(names)
    assert all(name.startswith(PREFIX) and _owner_alive(name) for name in names)
