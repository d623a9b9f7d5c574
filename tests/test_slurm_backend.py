"""The Slurm backend's decisions against a scripted runner (recorded command output, no cluster)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from disaggctl.compile import compile_spec
from disaggctl.errors import DisaggError
from disaggctl.loader import load_text
from disaggctl.targets import OpsContext, get_backend
from disaggctl.targets.slurm import cli
from disaggctl.targets.slurm.backend import Result, SlurmBackend

SPEC = """
name: fake
model: {path: /m, served_name: tiny}
hosts: [{name: slot-a, gpus: 1}, {name: slot-b, gpus: 1}]
prefill: {hosts: {names: [slot-a]}}
decode: {hosts: {names: [slot-b]}}
kv_transfer: {kind: nixl}
router: {host: slot-a}
target: {kind: slurm, workdir: /w}
"""


class Scripted:
    """A Runner whose answers are scripted per command; records every argv."""

    where = "scripted"

    def __init__(self, scontrol: list[str], files: dict[str, str] | None = None, tail: str = "") -> None:
        self.scontrol = scontrol  # successive `scontrol show job` outputs (the last one repeats)
        self.files = files or {}
        self.tail = tail
        self.calls: list[list[str]] = []

    def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = 120) -> Result:
        self.calls.append(argv)
        if argv[0] == "scontrol":
            out = self.scontrol.pop(0) if len(self.scontrol) > 1 else self.scontrol[0]
            return Result(0, out, "")
        if argv[0] == "cat":
            path = argv[-1]
            return Result(0, self.files[path], "") if path in self.files else Result(1, "", "No such file")
        if argv[0] == "tail":
            return Result(0, self.tail, "")
        if argv[0] == "squeue":
            return Result(0, "", "")
        return Result(0, "", "")


def job_line(state: str, comment: str) -> str:
    return (f"JobId=7 HetJobId=7 HetJobOffset=0 JobName=disaggctl-fake JobState={state} Reason=None "
            f"ExitCode=0:0 NodeList=n1 Comment={comment} StdOut=/w/fake/slurm-7.out\n")


def ctx() -> OpsContext:
    loaded = load_text(SPEC, "fake.yaml")
    return OpsContext(loaded=loaded, desired=compile_spec(loaded), console=Console(file=io.StringIO()), yes=True)


def backend() -> SlurmBackend:
    return SlurmBackend(sleep=lambda s: None, poll_s=0)


def test_get_backend_is_the_slurm_backend() -> None:
    assert isinstance(get_backend("slurm"), SlurmBackend)


def test_ready_from_the_state_file_when_the_comment_is_not_updated() -> None:
    """Sites may forbid `scontrol update Comment=`; the state file in the shared workdir still says ready."""
    state = ("job=7\nstate=ready\nhash=x\nendpoint=http://10.0.0.2:8000\n"
             "url.decode-0=http://10.0.0.3:8100\nurl.router=http://10.0.0.2:8000\n")
    run = Scripted([job_line("PENDING", "disaggctl:x"), job_line("RUNNING", "disaggctl:x")],
                   files={"/w/fake/state.7": state})
    endpoint, urls = backend().wait_ready(ctx(), run, "7", timeout_s=5)
    assert endpoint == "http://10.0.0.2:8000" and urls["decode-0"] == "http://10.0.0.3:8100"


def test_failed_job_reported_with_its_output() -> None:
    out = ("2026 disaggctl[7]: starting decode-0 on n1\n"
           "2026 disaggctl[7]: FAILED: decode-0 exited before http://10.0.0.3:8100/health answered\n"
           "  | ValueError: model /m not found\n")
    run = Scripted([job_line("RUNNING", "disaggctl:x:starting"), job_line("FAILED", "disaggctl:x:failed")], tail=out)
    with pytest.raises(DisaggError) as e:
        backend().wait_ready(ctx(), run, "7", timeout_s=5)
    msg = str(e.value)
    assert "job 7" in msg and "/w/fake/slurm-7.out" in msg and "ValueError: model /m not found" in msg


def test_job_that_never_gets_ready_times_out_with_its_state() -> None:
    clock = iter(range(0, 1000, 10))
    b = SlurmBackend(sleep=lambda s: None, clock=lambda: float(next(clock)), poll_s=0)
    run = Scripted([job_line("PENDING", "disaggctl:x").replace("Reason=None", "Reason=Resources")])
    with pytest.raises(DisaggError, match=r"not ready after 30 s \(Slurm state PENDING, reason Resources\)"):
        b.wait_ready(ctx(), run, "7", timeout_s=30)


def test_submit_sends_the_script_on_stdin() -> None:
    class Submit(Scripted):
        def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = 120) -> Result:
            self.calls.append(argv)
            if argv[0] == "sbatch":
                assert input is not None and input.startswith(b"#!/bin/bash\n")
                return Result(0, "12;cluster\n", "")
            return Result(0, "", "")

    run = Submit([""])
    assert backend().submit(ctx(), run, "#!/bin/bash\n") == "12"
    assert run.calls == [["mkdir", "-p", "--", "/w/fake"], ["sbatch", "--parsable"]]


def test_sbatch_refusal_is_an_error_naming_the_command() -> None:
    class Refuse(Scripted):
        def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = 120) -> Result:
            if argv[0] == "sbatch":
                return Result(1, "", "sbatch: error: Batch job submission failed: Invalid account")
            return Result(0, "", "")

    with pytest.raises(DisaggError, match="Invalid account"):
        backend().submit(ctx(), Refuse([""]), "#!/bin/bash\n")


def test_destroy_with_nothing_running() -> None:
    c = ctx()
    b = SlurmBackend(runner_factory=lambda spec: Scripted([""]), sleep=lambda s: None, poll_s=0)
    assert b.destroy(c) == 0
    assert "Nothing to destroy" in c.console.file.getvalue()  # type: ignore[attr-defined]


def test_squeue_output_decides_the_plan() -> None:
    S = cli.SEP
    row = f"7+0{S}disaggctl-fake{S}RUNNING{S}None{S}n1{S}disaggctl:oldhash:ready:http://a:1{S}1:00{S}x{S}/w\n"

    class Queue(Scripted):
        def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = 120) -> Result:
            return Result(0, row, "") if argv[0] == "squeue" else Result(0, "", "")

    c = ctx()
    b = SlurmBackend(runner_factory=lambda spec: Queue([""]), sleep=lambda s: None, poll_s=0)
    assert b.plan(c, None, detailed_exitcode=True) == 2
    text = c.console.file.getvalue()  # type: ignore[attr-defined]
    assert "runs another script (hash oldhash)" in text and "~ cancel job 7" in text and "+ submit job" in text


# --------------------------------------------------------------------------- status --check


class Metrics:
    """The nodes' HTTP as status sees it: /metrics texts and /health by URL; records every URL read."""

    where = "fake nodes"

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts
        self.read: list[str] = []

    def probe(self, url: str, timeout_s: float) -> tuple[bool, str]:
        self.read.append(url)
        return True, "200"

    def fetch(self, url: str, timeout_s: float) -> bytes:
        self.read.append(url)
        if url not in self.texts:
            raise OSError(f"connection refused: {url}")
        return self.texts[url].encode()

    def request(self, method: str, url: str, body: bytes | None, timeout_s: float,
                headers: object) -> tuple[int, bytes]:  # fmt: skip
        raise AssertionError("status sends no request")


def engine_text(success: float, external: float = 0, local: float = 0) -> str:
    lbl = 'engine="0",model_name="tiny"'
    return (f'vllm:request_success_total{{{lbl},finished_reason="length"}} {success}\n'
            f'vllm:prompt_tokens_by_source_total{{{lbl},source="external_kv_transfer"}} {external}\n'
            f'vllm:prompt_tokens_by_source_total{{{lbl},source="local_compute"}} {local}\n')  # fmt: skip


def router_text(disagg: float, error_in_200: float = 0) -> str:
    return (f'disaggctl_router_requests_total{{endpoint="completions",path="disaggregated",reason="x"}} {disagg}\n'
            f"disaggctl_router_error_in_200_total {error_in_200}\n")  # fmt: skip


STATE = ("job=7\nstate=ready\nendpoint=http://10.0.0.2:8000\nurl.prefill-0=http://10.0.0.2:8100\n"
         "url.decode-0=http://10.0.0.3:8200\nurl.router=http://10.0.0.2:8000\n")  # fmt: skip


def checked_status(
    texts: dict[str, str], script_hash: str | None = None, check: bool = True
) -> tuple[int, dict[str, object], Metrics]:
    """`status [--check] --output json` of job 7 (running the spec's script unless `script_hash`) whose nodes
    answer `texts`; returns the exit code, the report and the fake nodes."""
    c = ctx()
    c.output = "json"
    c.options["check"] = check
    S = cli.SEP
    digest = script_hash or SlurmBackend()._script(c)[1]
    row = f"7+0{S}disaggctl-fake{S}RUNNING{S}None{S}n1{S}disaggctl:{digest}:ready:http://10.0.0.2:8000{S}1:00{S}x{S}/w\n"

    class Queue(Scripted):
        def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = 120) -> Result:
            return Result(0, row, "") if argv[0] == "squeue" else super().run(argv, input, timeout)

    nodes = Metrics(texts)
    runner = Queue([""], files={"/w/fake/state.7": STATE})
    b = SlurmBackend(runner_factory=lambda spec: runner, http_factory=lambda run: nodes, sleep=lambda s: None)
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        rc = b.status(c)
    return rc, json.loads(out.getvalue()), nodes


HEALTHY = {"http://10.0.0.2:8100/metrics": engine_text(5), "http://10.0.0.3:8200/metrics": engine_text(5, 400, 5),
           "http://10.0.0.2:8000/metrics": router_text(5)}  # fmt: skip


def test_status_check_reads_the_jobs_metrics_at_the_state_file_urls() -> None:
    rc, report, nodes = checked_status(HEALTHY)
    checks = {c["name"]: c for c in report["checks"]}  # type: ignore[attr-defined]
    assert rc == 0 and report["healthy"] is True, report
    assert {n: c["ok"] for n, c in checks.items()} == dict.fromkeys(
        ["prefill_handles_requests", "decode_receives_kv", "kv_transfer_failures", "error_in_200",
         "fingerprints_match"], True), checks  # fmt: skip
    # through the backend's node HTTP (the login host's SSH channel when there is one), at the job's URLs
    assert set(HEALTHY) <= set(nodes.read) and "http://10.0.0.3:8200/health" in nodes.read


def test_status_check_fails_when_prefill_handles_nothing() -> None:
    rc, report, _ = checked_status({**HEALTHY, "http://10.0.0.2:8100/metrics": engine_text(0)})
    checks = {c["name"]: c for c in report["checks"]}  # type: ignore[attr-defined]
    assert rc == 1 and report["healthy"] is False
    bad = checks["prefill_handles_requests"]
    assert bad["ok"] is False and bad["detail"] == "router sent 5 disaggregated requests; prefill instances " \
        "finished 0 (none on prefill-0)" and bad["instances"] == ["prefill-0"]
    assert [n for n, c in checks.items() if c["ok"] is False] == ["prefill_handles_requests"]


def test_status_check_unreachable_metrics_are_unknown_not_violated() -> None:
    rc, report, _ = checked_status({"http://10.0.0.2:8000/metrics": router_text(5)})
    checks = {c["name"]: c for c in report["checks"]}  # type: ignore[attr-defined]
    assert rc == 0 and checks["prefill_handles_requests"]["ok"] is None and checks["decode_receives_kv"]["ok"] is None


def test_status_check_on_a_job_running_another_script_leaves_fingerprints_unchecked() -> None:
    rc, report, _ = checked_status(HEALTHY, script_hash="oldhash")
    checks = {c["name"]: c for c in report["checks"]}  # type: ignore[attr-defined]
    assert rc == 1  # drift: the job runs another script
    assert checks["fingerprints_match"]["ok"] is None and "another script" in checks["fingerprints_match"]["detail"]
    assert checks["prefill_handles_requests"]["ok"] is True


def test_status_without_check_reads_no_metrics() -> None:
    rc, report, nodes = checked_status({**HEALTHY, "http://10.0.0.2:8100/metrics": engine_text(0)}, check=False)
    assert rc == 0 and report["checks"] == [] and not any(u.endswith("/metrics") for u in nodes.read)
    assert "http://10.0.0.2:8100/health" in nodes.read  # /health goes through the same node HTTP
