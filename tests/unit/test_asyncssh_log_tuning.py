"""asyncssh's log calls skip formatting when their level is off, and still log when it is on."""

from __future__ import annotations

import logging

from asyncssh.logging import SSHLogger

from x2ssh.ssh import tuning as asyncssh_tuning


class Loud:
    def __str__(self) -> str:
        raise AssertionError("formatted although the level is off")


def test_log_calls_below_the_level_format_nothing(caplog) -> None:
    asyncssh_tuning.install()
    logger = SSHLogger(logging.getLogger("asyncssh")).get_child("conn")
    with caplog.at_level(logging.WARNING, logger="asyncssh"):
        logger.info("Opening direct TCP connection to %s", [Loud()])
        logger.info("Opening direct TCP connection to %s", ("198.19.0.2", 80))
    assert not caplog.records
    with caplog.at_level(logging.INFO, logger="asyncssh"):
        logger.info("Opening direct TCP connection to %s", ("198.19.0.2", 80))
    assert "198.19.0.2, port 80" in caplog.text


def test_debug1_below_the_level_formats_nothing_and_logs_when_on(caplog) -> None:
    asyncssh_tuning.install()
    logger = SSHLogger(logging.getLogger("asyncssh")).get_child(context="chan=7")
    with caplog.at_level(logging.INFO, logger="asyncssh"):
        logger.debug1("Set write buffer limits: %s", [Loud()])
    assert not caplog.records
    with caplog.at_level(logging.DEBUG, logger="asyncssh"):
        logger.debug1("Set write buffer limits: low-water=%d, high-water=%d", 16384, 65536)
    assert "[chan=7] Set write buffer limits: low-water=16384, high-water=65536" in caplog.text


def test_info_below_the_level_formats_nothing_and_logs_when_on(caplog) -> None:
    asyncssh_tuning.install()
    logger = SSHLogger(logging.getLogger("asyncssh")).get_child(context="chan=8")
    with caplog.at_level(logging.WARNING, logger="asyncssh"):
        logger.info("Closing channel %s", [Loud()])
    assert not caplog.records
    with caplog.at_level(logging.INFO, logger="asyncssh"):
        logger.info("Closing channel %s", ("198.19.0.2", 80))
    assert "[chan=8] Closing channel 198.19.0.2, port 80" in caplog.text
