"""RateMeter: bits per second from growing byte counters, measured over at least its interval."""

from __future__ import annotations

from x2ssh.status import RateMeter


def test_rates_are_bits_per_second_over_the_interval() -> None:
    meter = RateMeter(interval=1.0, now=100.0)
    assert meter.sample(0, 0, now=100.5) == (0.0, 0.0)  # too soon: nothing measured yet
    assert meter.sample(1000, 250_000, now=102.0) == (4000.0, 1_000_000.0)  # 2 s since the start


def test_calls_within_the_interval_keep_the_last_rates() -> None:
    meter = RateMeter(interval=1.0, now=0.0)
    meter.sample(125, 125, now=1.0)
    assert meter.sample(10_000, 10_000, now=1.5) == (1000.0, 1000.0)  # unchanged until 1 s has passed
    assert meter.sample(10_125, 10_125, now=2.0) == (80_000.0, 80_000.0)


def test_idle_counters_give_zero() -> None:
    meter = RateMeter(interval=1.0, now=0.0)
    meter.sample(500, 500, now=1.0)
    assert meter.sample(500, 500, now=2.0) == (0.0, 0.0)
