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
    assert lines[0].startswith("engines: stand-in engines") and lines[1].startswith("target: the local target")
    assert "rolling order (decode-first)" in r.stdout
    assert n >= 20 and failed == 0, r.stdout


@pytest.mark.infra
def test_small_rolling_bench_on_systemd_hosts_fails_no_request() -> None:
    """The same on the systemd target: stand-ins and the router as units on nspawn hosts, the
    rollout drained through the admin API over the router host's SSH; 1P1D (aggregated fallback)."""
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "rolling_change" / "run.py"), "--target", "systemd",
         "--prefill", "1", "--decode", "1", "--rate", "10", "--steady-s", "2", "--start-s", "0.5",
         "--latency-ms", "10"],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines, r.stdout + r.stderr
    assert lines[0].startswith("engines: stand-in engines") and lines[1].startswith("target: the systemd target")
    m = LAST.match(lines[-1])
    assert m, lines[-1]
    assert "rolling order (decode-first)" in r.stdout and "drained through the router's admin API" in r.stdout
    steps = [line for line in lines if line.startswith("steps (end")]
    assert int(m.group(1)) >= 20 and int(m.group(2)) == 0, r.stdout
    assert "apply: rc 0" in r.stdout and ", 6 rollout steps" in r.stdout, r.stdout
    assert not steps  # no --trace here
