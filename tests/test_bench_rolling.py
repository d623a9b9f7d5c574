"""A small run of bench/rolling_change/run.py (stand-in engines, the real supervisor and router):
the last line's format, and no failed request while every instance of a 2P2D deployment restarts."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.plugins.paths import REPO

pytestmark = pytest.mark.timeout(300)
LAST = re.compile(r"^rolling: (\d+) requests, (\d+) failed, p50 (\d+) ms, p99 (\d+) ms \(steady p99 (\d+) ms\)$")


def test_small_rolling_bench_fails_no_request() -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "rolling_change" / "run.py"), "--rate", "10", "--steady-s", "2",
         "--start-s", "0.5", "--latency-ms", "10"],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines, r.stdout + r.stderr
    m = LAST.match(lines[-1])
    assert m, lines[-1]
    n, failed = int(m.group(1)), int(m.group(2))
    assert "stand-in engines" in r.stdout and "rolling order (decode-first)" in r.stdout
    assert n >= 20 and failed == 0, r.stdout
