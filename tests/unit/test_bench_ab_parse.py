"""The harness reads ApacheBench's report: the figures it keeps, and a clear error when one is missing."""

from __future__ import annotations

import pytest

from benchmarks.scenarios import parse_ab

AB_REPORT = """\
Server Software:
Server Hostname:        198.19.0.2
Server Port:            80

Document Path:          /1k.bin
Document Length:        1024 bytes

Concurrency Level:      50
Time taken for tests:   5.000 seconds
Complete requests:      14412
Failed requests:        3
Total transferred:      16679604 bytes
Requests per second:    2882.35 [#/sec] (mean)
Time per request:       17.347 [ms] (mean)

Connection Times (ms)
              min  mean[+/-sd] median   max
Connect:        0    3   2.1      3      21
Processing:     2   14   6.0     13      60
Waiting:        1    7   4.2      7      41
Total:          3   17   6.3     16      63

Percentage of the requests served within a certain time (ms)
  50%     16
  66%     18
  75%     20
  80%     21
  90%     25
  95%     28
  98%     33
  99%     37
 100%     63 (longest request)
"""


def test_the_figures_the_harness_keeps() -> None:
    assert parse_ab(AB_REPORT) == {
        "complete": 14412,
        "failed": 3,
        "rate": 2882.35,
        "p50": 16,
        "p99": 37,
        "wait_median": 7,
    }


def test_a_truncated_report_says_what_is_missing() -> None:
    with pytest.raises(KeyError, match="rate"):
        parse_ab(AB_REPORT.replace("Requests per second", "Requests"))
