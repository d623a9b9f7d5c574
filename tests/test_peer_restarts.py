"""Peer restarts under load (issue 14, item 7), local target with the real supervisor and builtin
router and stand-in engines: a decode, then a prefill, is killed (SIGKILL) while requests flow.
The router stops sending to it, its partners keep serving, the supervisor brings it back, and
the failed requests are counted and printed (not hidden)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from disaggctl.health import metric_sum
from tests.test_local_backend import cli, standin_vllm  # noqa: F401 - fixture
from tests.test_local_rolling import Load, _router_url, write_spec

pytestmark = pytest.mark.timeout(300)


def _states(tmp: Path) -> dict[str, dict[str, object]]:
    procs: dict[str, dict[str, object]] = json.loads((tmp / "state" / "run" / "supervisor.json").read_text())[
        "processes"
    ]
    return procs


def _kill_and_recover(tmp: Path, name: str, load: Load) -> tuple[int, int]:
    """SIGKILL `name`; wait until the supervisor restarted it and it is healthy; (ok, failed) meanwhile."""
    before = _states(tmp)[name]
    ok0, failed0 = load.ok, len(load.failed)
    os.kill(int(str(before["pid"])), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = _states(tmp)[name]
        if int(str(st.get("restarts") or 0)) > int(str(before.get("restarts") or 0)) and st.get("state") == "running":
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the supervisor did not bring {name} back: {_states(tmp)[name]}")
    time.sleep(2)  # the router's health poll takes it back
    return load.ok - ok0, len(load.failed) - failed0


def test_killed_decode_then_prefill_under_load(
    tmp_path: Path,
    standin_vllm: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = write_spec(tmp_path, standin_vllm, 2)
    try:
        r = cli("apply", str(spec), "-y")
        assert r.returncode == 0, r.stdout + r.stderr
        url = _router_url(tmp_path)
        with Load(url) as load:
            time.sleep(1)
            d_ok, d_failed = _kill_and_recover(tmp_path, "decode-1", load)
            p_ok, p_failed = _kill_and_recover(tmp_path, "prefill-1", load)
            time.sleep(1)
        with capsys.disabled():
            print(f"\npeer restarts: decode-1 killed: {d_ok} served, {d_failed} failed; "
                  f"prefill-1 killed: {p_ok} served, {p_failed} failed; failures: {load.failed[:3]}")  # fmt: skip
        assert d_ok > 10 and p_ok > 10  # the partners kept serving
        # the router noticed: failed upstream calls to the killed instances, retried elsewhere
        import urllib.request

        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        failures = metric_sum(text, "disaggctl_router_upstream_failures_total", upstream="decode-1")
        failures += metric_sum(text, "disaggctl_router_upstream_failures_total", upstream="prefill-1")
        assert failures >= 1, text
        # both are back and healthy, and the deployment passes status --check
        r = cli("status", str(spec), "--check", "--output", "json")
        report = json.loads(r.stdout)
        rows = {p["name"]: p for p in report["processes"]}
        assert rows["decode-1"]["restarts"] == 1 and rows["decode-1"]["healthy"]
        assert rows["prefill-1"]["restarts"] == 1 and rows["prefill-1"]["healthy"]
        assert r.returncode == 0, r.stdout
    finally:
        cli("destroy", str(spec), "-y")
