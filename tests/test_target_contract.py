"""The contract every target shares: one status JSON schema (docs/status.md), one saved-plan format,
one confirmation, one canary input set. Cheap paths of each real backend (no hosts, no cluster):
an unreachable systemd host, a scripted Slurm queue with a real HTTP /health, a local deployment
that is not there."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from disaggctl.compile import compile_spec
from disaggctl.errors import DisaggError
from disaggctl.loader import load_text
from disaggctl.targets import OpsContext, get_backend
from disaggctl.targets.base import (
    Action,
    SavedPlan,
    StalePlan,
    check_saved_plan,
    confirm,
    plan_meta,
    read_saved_plan,
    write_saved_plan,
)
from disaggctl.targets.gate import HealthGate, canary_inputs
from disaggctl.targets.slurm import cli
from disaggctl.targets.slurm.backend import Result, SlurmBackend
from disaggctl.targets.status import ProcessStatus, StatusReport, status_schema_markdown
from disaggctl.targets.systemd.backend import SystemdBackend

REPO = Path(__file__).resolve().parents[1]

COMMON = """
name: contract
model: {{path: /m, served_name: tiny}}
hosts: [{{name: h1, address: 127.0.0.1, gpus: 2}}]
prefill: {{hosts: {{names: [h1]}}}}
decode: {{hosts: {{names: [h1]}}}}
kv_transfer: {{kind: {kv}}}
router: {{host: h1, port: {port}}}
target: {target}
"""


def make_ctx(target: str, kv: str = "nixl", port: int = 8000, output: str = "json", yes: bool = True) -> OpsContext:
    text = COMMON.format(kv=kv, port=port, target=target)
    loaded = load_text(text, "contract.yaml")
    console = Console(file=io.StringIO(), width=200)
    return OpsContext(loaded=loaded, desired=compile_spec(loaded), console=console, output=output, yes=yes)


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def status_json(ctx: OpsContext, backend: object, capsys: pytest.CaptureFixture[str]) -> tuple[int, StatusReport]:
    rc = backend.status(ctx)  # type: ignore[attr-defined]
    out = capsys.readouterr().out
    return rc, StatusReport.model_validate_json(out)  # extra="forbid": any other shape fails


# --------------------------------------------------------------------------- status: one schema


def test_systemd_status_json_follows_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    def unreachable(target: object) -> object:
        raise DisaggError("h1: cannot connect (test: no host)")

    backend = SystemdBackend()
    backend.connector = unreachable  # type: ignore[method-assign,assignment]
    rc, report = status_json(make_ctx("{kind: systemd}"), backend, capsys)
    assert rc == 1 and report.target == "systemd" and not report.healthy
    assert {p.name for p in report.processes} == {"decode-0", "prefill-0", "router"}
    assert all(p.state == "unreachable" and "cannot connect" in p.drift[0] for p in report.processes)


def test_slurm_status_json_follows_the_schema(capsys: pytest.CaptureFixture[str], health_server: str) -> None:
    ctx = make_ctx("{kind: slurm, workdir: /w}")
    sep = cli.SEP
    script_hash = SlurmBackend()._script(ctx)[1]
    row = (f"7+0{sep}disaggctl-contract{sep}RUNNING{sep}None{sep}n1{sep}disaggctl:{script_hash}:ready:"
           f"{health_server}{sep}1:00{sep}x{sep}/w\n")  # fmt: skip
    urls = "".join(f"url.{n}={health_server}\n" for n in ("decode-0", "prefill-0", "router"))
    state = f"job=7\nstate=ready\nhash={script_hash}\nendpoint={health_server}\n{urls}"

    class Queue:
        where = "scripted"

        def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = 120) -> Result:
            if argv[0] == "squeue":
                return Result(0, row, "")
            if argv[0] == "cat" and argv[-1] == "/w/contract/state.7":
                return Result(0, state, "")
            return Result(1, "", "unexpected")

    backend = SlurmBackend(runner_factory=lambda spec: Queue(), sleep=lambda s: None, poll_s=0)
    rc, report = status_json(ctx, backend, capsys)
    assert rc == 0 and report.healthy and report.target == "slurm", report
    assert all(p.healthy and p.health == "ok" and p.unit == "7" for p in report.processes)
    assert report.detail["jobs"][0]["matches_spec"] is True


def test_local_status_json_follows_the_schema(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ctx = make_ctx(f"{{kind: local, cpu: true, state_dir: {tmp_path}}}")
    rc, report = status_json(ctx, get_backend("local"), capsys)
    assert rc == 1 and report.target == "local" and not report.deployed and report.processes == []


def test_docs_status_md_is_the_schema() -> None:
    text = (REPO / "docs" / "status.md").read_text()
    assert status_schema_markdown() in text, "docs/status.md is stale: paste status_schema_markdown() into it"
    for field in [*StatusReport.model_fields, *ProcessStatus.model_fields]:
        assert f"`{field}`" in text


# --------------------------------------------------------------------------- plan: one format


@pytest.mark.parametrize("target", ["{kind: slurm, workdir: /w}", "{kind: local, cpu: true, state_dir: /tmp/x}"])
def test_saved_plan_meta_holds_only_the_cli_profiles(target: str, tmp_path: Path) -> None:
    """The spec lists its own profiles; the plan records only --profile options (no second merge)."""
    ctx = make_ctx(target)
    ctx.options = {"profiles": ["extra"], "topology_file": None}
    saved = SavedPlan(meta=plan_meta(ctx, "local", "abc"), changed=False)
    path = tmp_path / "plan.json"
    write_saved_plan(str(path), saved)
    again = read_saved_plan(path)
    assert again.meta.profiles == ["extra"] and again.meta.spec_file == str(Path("contract.yaml").resolve())
    assert json.loads(path.read_text())["format"] == "disaggctl-plan"


def test_every_target_plans_in_the_same_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class EmptyQueue:
        where = "scripted"

        def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = 120) -> Result:
            return Result(0, "", "")

    slurm = SlurmBackend(runner_factory=lambda spec: EmptyQueue(), sleep=lambda s: None, poll_s=0)
    for backend, target in [(slurm, "{kind: slurm, workdir: /w}"),
                            (get_backend("local"), f"{{kind: local, cpu: true, state_dir: {tmp_path}}}")]:  # fmt: skip
        ctx = make_ctx(target)
        out = tmp_path / "p.json"
        assert backend.plan(ctx, str(out), detailed_exitcode=True) == 2
        printed = SavedPlan.model_validate_json(capsys.readouterr().out)
        saved = read_saved_plan(out)
        assert printed.actions == saved.actions
        assert [a.process for a in saved.actions] == ["decode-0", "prefill-0", "router"]
        assert {a.action for a in saved.actions} == {Action.CREATE}
        assert saved.meta.target == target.split(",")[0].split()[-1]


def test_a_plan_for_another_spec_is_stale(tmp_path: Path) -> None:
    ctx = make_ctx("{kind: local, cpu: true, state_dir: /tmp/x}")
    path = tmp_path / "plan.json"
    write_saved_plan(str(path), SavedPlan(meta=plan_meta(ctx, "local", "aaa"), changed=True))
    with pytest.raises(StalePlan, match="renders differently"):
        check_saved_plan(str(path), SavedPlan(meta=plan_meta(ctx, "local", "bbb"), changed=True))
    with pytest.raises(StalePlan, match="moved"):
        check_saved_plan(str(path), SavedPlan(meta=plan_meta(ctx, "local", "aaa"), changed=True), lambda s: ["moved"])
    check_saved_plan(str(path), SavedPlan(meta=plan_meta(ctx, "local", "aaa"), changed=True), lambda s: [])


# --------------------------------------------------------------------------- apply: one confirmation, one gate


def test_confirmation_without_a_terminal_is_refused() -> None:
    ctx = make_ctx("{kind: local, cpu: true, state_dir: /tmp/x}", yes=False)
    with pytest.raises(DisaggError, match="pass -y"):
        confirm(ctx, "Apply these changes?")
    assert confirm(ctx, "Apply these changes?", plan_file="reviewed.json")


@pytest.mark.parametrize("target", ["{kind: systemd}", "{kind: slurm, workdir: /w}", "{kind: local, cpu: true}"])
def test_shared_storage_canary_gets_the_block_size_on_every_target(target: str) -> None:
    ctx = make_ctx(target, kv="shared-storage, path: /tmp/kv")
    assert canary_inputs(ctx.spec, ctx.desired).block_size == (ctx.spec.decode.block_size or 32)
    assert canary_inputs(make_ctx(target).spec, make_ctx(target).desired).block_size is None


def test_gate_reaches_the_router_through_the_given_fetch() -> None:
    """The seam for checks through an SSH channel: the gate's HTTP GETs go through `fetch`."""
    ctx = make_ctx("{kind: systemd}")
    seen: list[str] = []

    def fetch(url: str, timeout_s: float) -> bytes:
        seen.append(url)
        return json.dumps({"prefill": [{"healthy": True}], "decode": [{"healthy": True}]}).encode()

    gate = HealthGate(ctx.spec, ctx.desired, fetch=fetch)
    assert gate.router_sees_upstreams(timeout_s=0)
    assert seen == [ctx.desired.router_url.rstrip("/") + "/health"]
    assert gate.decode_metrics() == [gate.urls["decode-0"] + "/metrics"]
