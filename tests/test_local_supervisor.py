"""The local supervisor as a real detached process supervising real (small) processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from disaggctl.render.local import ProcSpec, Table, paths
from disaggctl.targets.local.supervisor import pid_alive, read_state, supervisor_pid

PY = sys.executable


def wait_for(cond: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def proc(state: Path, name: str, code: str, order: int = 0, env: dict[str, str] | None = None) -> ProcSpec:
    pth = paths(str(state))
    return ProcSpec(
        name=name,
        role="decode",
        instance=name,
        argv=[PY, "-c", code],
        env=env or {},
        cwd=str(pth["work"] / name),
        log=str(pth["logs"] / f"{name}.log"),
        pid_file=str(pth["run"] / f"{name}.pid"),
        http_port=None,
        health_url=None,
        start_order=order,
    )


SLEEPER = "import os, time; print('up', os.getpid(), flush=True); time.sleep(600)"


def write_table(state: Path, procs: list[ProcSpec], max_restarts: int = 2) -> Table:
    t = Table(
        name="t",
        state_dir=str(state),
        restart_on_crash=True,
        max_restarts=max_restarts,
        processes=procs,
        restart_delay_s=0.05,
        stop_timeout_s=3,
    )
    state.mkdir(parents=True, exist_ok=True)
    paths(str(state))["table"].write_text(t.to_json())
    return t


def state_of(state: Path, name: str) -> dict[str, object]:
    s = read_state(str(state)) or {}
    procs = s.get("processes", {})
    assert isinstance(procs, dict)
    got: dict[str, object] = procs.get(name, {})
    return got


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    state = tmp_path / "state"

    def start() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            [PY, "-m", "disaggctl.targets.local.supervisor", str(state)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        started.append(p)
        wait_for(lambda: supervisor_pid(str(state)) == p.pid, "supervisor pid file")
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def pid_of(state: Path, name: str) -> int:
    return int((paths(str(state))["run"] / f"{name}.pid").read_text())


def test_starts_in_order_restarts_a_crash_and_stops_everything(tmp_path: Path, sup: Callable[[], object]) -> None:
    state = tmp_path / "state"
    write_table(state, [proc(state, "decode-0", SLEEPER, 0, {"X_MARK": "d"}), proc(state, "router", SLEEPER, 2)])
    p = sup()
    assert isinstance(p, subprocess.Popen)
    wait_for(lambda: state_of(state, "router").get("state") == "running", "router running")
    first = pid_of(state, "decode-0")
    assert pid_alive(first)
    wait_for(lambda: "up" in (paths(str(state))["logs"] / "decode-0.log").read_text(), "decode log")
    assert Path(f"/proc/{first}/environ").read_bytes().count(b"X_MARK=d") == 1
    # crash: SIGKILL the process; the supervisor restarts it with a new pid
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: state_of(state, "decode-0").get("restarts") == 1, "a restart")
    wait_for(lambda: state_of(state, "decode-0").get("state") == "running", "running again")
    second = pid_of(state, "decode-0")
    assert second != first and pid_alive(second)
    assert state_of(state, "decode-0")["last_exit"] == -signal.SIGKILL
    log = (paths(str(state))["logs"] / "decode-0.log").read_text()
    assert log.count("=== disaggctl") == 2  # appended, not truncated
    # stop: SIGTERM to the supervisor stops every child and removes the pid files
    router = pid_of(state, "router")
    p.send_signal(signal.SIGTERM)
    p.wait(15)
    assert not pid_alive(second) and not pid_alive(router)
    assert not list((paths(str(state))["run"]).glob("*.pid"))
    assert state_of(state, "router")["state"] == "stopped"


def test_gives_up_after_max_restarts(tmp_path: Path, sup: Callable[[], object]) -> None:
    state = tmp_path / "state"
    write_table(state, [proc(state, "prefill-0", "import sys; sys.exit(3)")], max_restarts=2)
    sup()
    wait_for(lambda: state_of(state, "prefill-0").get("state") == "failed", "failed state")
    st = state_of(state, "prefill-0")
    assert st["restarts"] == 2 and st["last_exit"] == 3
    assert (paths(str(state))["logs"] / "prefill-0.log").read_text().count("=== disaggctl") == 3


def test_missing_executable_fails_the_process_not_the_supervisor(tmp_path: Path, sup: Callable[[], object]) -> None:
    state = tmp_path / "state"
    bad = replace(proc(state, "decode-0", ""), argv=["/nonexistent/vllm", "serve"])
    write_table(state, [bad, proc(state, "router", SLEEPER, 2)], max_restarts=0)
    p = sup()
    assert isinstance(p, subprocess.Popen)
    wait_for(lambda: state_of(state, "router").get("state") == "running", "router running")
    assert state_of(state, "decode-0")["state"] == "failed"
    assert "cannot start /nonexistent/vllm" in (paths(str(state))["logs"] / "decode-0.log").read_text()
    assert p.poll() is None


def test_sighup_restarts_only_what_changed(tmp_path: Path, sup: Callable[[], object]) -> None:
    state = tmp_path / "state"
    a, b, c = (proc(state, n, SLEEPER, i) for i, n in enumerate(["decode-0", "prefill-0", "router"]))
    write_table(state, [a, b, c])
    p = sup()
    assert isinstance(p, subprocess.Popen)
    wait_for(lambda: state_of(state, "router").get("state") == "running", "all running")
    before = {n: pid_of(state, n) for n in ("decode-0", "prefill-0", "router")}
    b2 = replace(b, env={"CHANGED": "1"})
    write_table(state, [a, b2])  # prefill changed, router removed, decode untouched
    p.send_signal(signal.SIGHUP)
    wait_for(lambda: "router" not in (read_state(str(state)) or {}).get("processes", {}), "router removed")  # type: ignore[operator]
    wait_for(lambda: state_of(state, "prefill-0").get("pid") not in (None, before["prefill-0"]), "prefill restarted")
    assert pid_of(state, "decode-0") == before["decode-0"]
    assert not pid_alive(before["router"]) and not pid_alive(before["prefill-0"])


def test_second_supervisor_for_the_same_folder_is_refused(tmp_path: Path, sup: Callable[[], object]) -> None:
    state = tmp_path / "state"
    write_table(state, [proc(state, "decode-0", SLEEPER)])
    sup()
    r = subprocess.run(
        [PY, "-m", "disaggctl.targets.local.supervisor", str(state)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 1 and "already runs" in r.stderr
    data = json.loads(paths(str(state))["supervisor_state"].read_text())
    assert data["name"] == "t"
