"""`python -m benchmarks --cpus`: the CPU set is parsed and checked before any lab is built."""

from __future__ import annotations

import os

import pytest

from benchmarks.__main__ import parse_args


def test_cpus_are_parsed_into_a_set():
    cpu = min(os.sched_getaffinity(0))
    assert parse_args(["--cpus", f"{cpu}"]).cpus == {cpu}
    assert parse_args([]).cpus is None


@pytest.mark.parametrize("text", ["one", "", "100000"])
def test_cpus_that_are_not_available_are_refused(text, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--cpus", text])
    assert "--cpus" in capsys.readouterr().err


def test_server_cpus_are_parsed_and_need_the_client_side_s_cpus(capsys):
    cpu = min(os.sched_getaffinity(0))
    args = parse_args(["--cpus", f"{cpu}", "--server-cpus", f"{cpu}"])
    assert args.server_cpus == {cpu}
    assert parse_args([]).server_cpus is None
    with pytest.raises(SystemExit):
        parse_args(["--server-cpus", f"{cpu}"])
    assert "--server-cpus needs --cpus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--cpus", f"{cpu}", "--server-cpus", "100000"])
