"""The Slurm target: one heterogeneous job per deployment, driven with sbatch/squeue/scontrol/scancel.

Commands run on this machine or, with `target.submit.host`, on the login host over SSH
(disaggctl.ssh); HTTP to the job's processes (health gate, canary, status, `status --check`) then
leaves from the login host too (targets/slurm/access.py). What the cluster runs is observed from
Slurm itself: jobs are found by name (`disaggctl-<deployment>`), and the job's comment
`disaggctl:<hash>:<state>:<endpoint>` carries the hash of the script it runs (so `plan` knows
whether it matches the spec) and, once the job updated it, its state and endpoint. The per-instance
URLs are in the job's state file in the (shared) job folder.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from disaggctl import secrets as secret_files
from disaggctl.errors import DisaggError
from disaggctl.render.slurm import (
    STOP_TIMEOUT_S,
    job_name,
    render_slurm,
    script_hash,
    script_of,
    secrets_path,
    slurm_target,
)
from disaggctl.targets.base import (
    Action,
    ProcessAction,
    SavedPlan,
    check_saved_plan,
    confirm,
    finish_plan,
    plan_meta,
    select_processes,
)
from disaggctl.targets.slurm import cli
from disaggctl.targets.slurm.access import DirectHttp, LoginHostHttp, NodeHttp, job_checks
from disaggctl.targets.status import ProcessStatus, StatusReport, print_status, status_exit, with_checks

if TYPE_CHECKING:
    from disaggctl import ssh
    from disaggctl.deployment import DesiredState
    from disaggctl.spec import ClusterSpec
    from disaggctl.targets import OpsContext
    from disaggctl.targets.ui import Phases


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class Runner(Protocol):
    """Where Slurm commands run: argv in, a Result out."""

    where: str

    def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = 120) -> Result: ...


class LocalRunner:
    where = "this machine"

    def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = 120) -> Result:
        try:
            p = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
        except FileNotFoundError:
            return Result(127, "", f"{argv[0]}: command not found (is Slurm's client installed here?)")
        except subprocess.TimeoutExpired:
            return Result(124, "", f"{shlex.join(argv)} timed out after {timeout} s")
        return Result(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))


class SshRunner:
    """Runs on the login host; one connection for the whole operation."""

    def __init__(self, spec: ClusterSpec) -> None:
        from disaggctl import ssh

        s = slurm_target(spec).submit
        assert s.host is not None
        if s.host in {h.name for h in spec.hosts}:
            target = ssh.target_for(spec, s.host)
        else:
            # known_hosts/strict_host_keys: read when the spec grows them (target.submit has neither yet)
            known = getattr(s, "known_hosts", None)
            target = ssh.SshTarget(
                name=s.host,
                address=s.host,
                port=s.port,
                user=s.user or getpass.getuser(),
                key=os.path.expanduser(s.key) if s.key else None,
                known_hosts=str(known) if known else None,
                strict=bool(getattr(s, "strict_host_keys", False)),
            )
        self.where = f"{target.user}@{target.address}"
        self._conn = ssh.connect(target)

    @property
    def conn(self) -> ssh.Connection:
        return self._conn

    def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = 120) -> Result:
        r = self._conn.run(argv, input=input, timeout=timeout)
        return Result(r.rc, r.out, r.err)


def runner_for(spec: ClusterSpec) -> Runner:
    return SshRunner(spec) if slurm_target(spec).submit.host else LocalRunner()


def node_http(run: Runner) -> NodeHttp:
    """How this operation reaches the job's processes: from the login host when commands run there
    over SSH (the operator may reach only that host), else from this machine (targets/slurm/access.py)."""
    if isinstance(run, SshRunner):
        return LoginHostHttp(run.conn, run.where)
    return DirectHttp()


# --------------------------------------------------------------------------- observing


def _check(r: Result, argv: list[str], where: str) -> Result:
    if not r.ok:
        raise DisaggError(f"`{shlex.join(argv)}` failed on {where} (exit {r.rc}): {(r.err or r.out).strip()}")
    return r


def list_jobs(run: Runner, name: str) -> list[cli.Job]:
    """Pending and running jobs of the deployment, oldest first (a successor overlaps its predecessor)."""
    argv = cli.squeue_argv(name)
    return cli.jobs_from_queue(cli.parse_squeue(_check(run.run(argv), argv, run.where).out))


def show_job(run: Runner, job_id: str) -> cli.Job | None:
    r = run.run(cli.scontrol_job_argv(job_id))
    if not r.ok:
        if cli.scontrol_missing(r.err):
            return None
        _check(r, cli.scontrol_job_argv(job_id), run.where)
    jobs = cli.parse_scontrol_jobs(r.out)
    return jobs[0] if jobs else None


def read_file(run: Runner, path: str) -> str | None:
    r = run.run(["cat", "--", path])
    return r.out if r.ok else None


def job_output(run: Runner, job: cli.Job) -> str:
    if not job.stdout:
        return ""
    r = run.run(["tail", "-n", "400", "--", job.stdout])
    return r.out if r.ok else f"(cannot read {job.stdout}: {r.err.strip()})"


@dataclass(frozen=True)
class PlanResult:
    hash: str
    jobs: list[cli.Job]
    keep: str | None  # the job that already runs this exact script
    cancel: list[str]  # jobs running another script
    submit: bool

    @property
    def changes(self) -> bool:
        return self.submit or bool(self.cancel)

    def to_json(self) -> dict[str, object]:
        return {
            "target": "slurm",
            "hash": self.hash,
            "observed": {j.job_id: (j.tag.hash if j.tag else None) for j in self.jobs},
            "keep": self.keep,
            "cancel": self.cancel,
            "submit": self.submit,
        }


def compute_plan(script_digest: str, jobs: list[cli.Job]) -> PlanResult:
    """Pure: which jobs to keep, cancel or submit so exactly one job runs the rendered script."""
    same = [
        j.job_id
        for j in jobs
        if j.tag and j.tag.hash == script_digest and j.tag.state not in ("failed", "stopping", "stopped")
    ]
    keep = same[-1] if same else None
    # While a successor takes over, two jobs with the same script overlap: keep both (the old one leaves itself).
    cancel = [j.job_id for j in jobs if j.job_id not in same]
    return PlanResult(script_digest, jobs, keep, cancel, submit=keep is None)


# --------------------------------------------------------------------------- the backend


class SlurmBackend:
    def __init__(
        self,
        runner_factory: Callable[[ClusterSpec], Runner] = runner_for,
        http_factory: Callable[[Runner], NodeHttp] = node_http,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float = 1.0,
    ) -> None:
        self._runner_factory = runner_factory
        self._http_factory = http_factory
        self._sleep = sleep
        self._clock = clock
        self._poll_s = poll_s
        self._secret_values: list[str] = []  # set by apply: redacted from quoted job output

    # ---- helpers

    def _script(self, ctx: OpsContext) -> tuple[str, str]:
        rendered = render_slurm(ctx.desired, ctx.spec)
        text = script_of(rendered).content
        return text, script_hash(text)

    def _say(self, ctx: OpsContext, text: str) -> None:
        if ctx.output != "json":
            ctx.console.print(text, markup=False, highlight=False)

    def plan_for(self, ctx: OpsContext, run: Runner) -> PlanResult:
        _, digest = self._script(ctx)
        return compute_plan(digest, list_jobs(run, job_name(ctx.spec)))

    # ---- Backend protocol

    def plan(self, ctx: OpsContext, out_file: str | None, detailed_exitcode: bool) -> int:
        run = self._runner_factory(ctx.spec)
        p = self.plan_for(ctx, run)
        return finish_plan(ctx, saved_plan(ctx, p), lambda: self._show(ctx, p, run), out_file, detailed_exitcode)

    def _show(self, ctx: OpsContext, p: PlanResult, run: Runner) -> None:
        for j in p.jobs:
            tag = j.tag
            what = (
                "matches the spec"
                if tag and tag.hash == p.hash
                else f"runs another script (hash {tag.hash if tag else 'none'})"
            )
            self._say(ctx, f"job {j.job_id} {j.state} on {','.join(j.nodes)}: {what}")
        if not p.changes:
            self._say(ctx, f"No changes: job {p.keep} runs the rendered script (hash {p.hash}).")
        for c in p.cancel:
            self._say(ctx, f"~ cancel job {c} (clean shutdown: router, prefill, decode)")
        if p.submit:
            self._say(ctx, f"+ submit job {job_name(ctx.spec)} (hash {p.hash}) via {run.where}")

    def apply(self, ctx: OpsContext, plan_file: str | None) -> int:
        from disaggctl.targets.ui import Phases

        run = self._runner_factory(ctx.spec)
        self._secret_values = secret_files.known_values(ctx.spec)
        script, digest = self._script(ctx)
        p = compute_plan(digest, list_jobs(run, job_name(ctx.spec)))
        observed = p.to_json()["observed"]
        check_saved_plan(plan_file, saved_plan(ctx, p), lambda s: _stale(s, observed))
        self._show(ctx, p, run)
        if p.changes and not confirm(ctx, f"Cancel job(s) {', '.join(p.cancel) or '-'} and submit the new script?",
                                     plan_file):  # fmt: skip
            return 1
        with Phases(ctx.console) as phases:
            if p.cancel:
                with phases.step("slurm", f"stop job(s) {', '.join(p.cancel)}"):
                    self._stop_jobs(ctx, run, p.cancel)
            job_id = p.keep
            if job_id is None:
                with phases.step("slurm", "submit"):
                    job_id = self.submit(ctx, run, script)
            else:
                self._say(ctx, f"job {job_id} already runs this spec (hash {digest})")
            with phases.step(f"job {job_id}", "ready"):
                endpoint, urls = self.wait_ready(ctx, run, job_id)
            self.check_health(ctx, endpoint, urls, phases, self._http_factory(run))
        if ctx.output == "json":
            ctx.console.print_json(json.dumps({"job": job_id, "endpoint": endpoint, "urls": urls}))
        else:
            self._say(ctx, f"Ready: job {job_id}, endpoint {endpoint}")
        return 0

    def status(self, ctx: OpsContext) -> int:
        run = self._runner_factory(ctx.spec)
        jobs = list_jobs(run, job_name(ctx.spec))
        _, digest = self._script(ctx)
        current = next((j for j in reversed(jobs) if j.running), jobs[-1] if jobs else None)
        fields: dict[str, str] = {}
        if current is not None and current.running:
            fields = cli.parse_state_file(read_file(run, f"{ctx.desired.config_dir}/state.{current.job_id}") or "")
        http = self._http_factory(run)
        report = status_report(ctx, jobs, current, fields, digest, http.probe)
        if ctx.options.get("check"):
            report = with_checks(report, job_checks(ctx.spec, ctx.desired, current, fields, digest, http.fetch))
        print_status(ctx, report)
        return status_exit(report)

    def destroy(self, ctx: OpsContext) -> int:
        run = self._runner_factory(ctx.spec)
        jobs = list_jobs(run, job_name(ctx.spec))
        if not jobs:
            self._say(ctx, f"Nothing to destroy: no job named {job_name(ctx.spec)}.")
            return 0
        for j in jobs:
            self._say(ctx, f"- job {j.job_id} {j.state} on {','.join(j.nodes)}")
        if not confirm(ctx, "Cancel these jobs?"):
            return 1
        self._stop_jobs(ctx, run, [j.job_id for j in jobs])
        if secret_files.names(ctx.spec):
            remove_job_secrets(run, ctx.desired.config_dir)  # the job's EXIT trap did, unless it was killed
        self._say(ctx, "Destroyed.")
        return 0

    def logs(self, ctx: OpsContext, role: str | None, instance: int | None, follow: bool, lines: int) -> int:
        run = self._runner_factory(ctx.spec)
        jobs = [j for j in list_jobs(run, job_name(ctx.spec)) if j.running]
        if not jobs:
            raise DisaggError(f"no running job named {job_name(ctx.spec)}")
        job = jobs[-1]
        names = [p.name for p in select_processes(ctx.desired, role, instance)]
        paths = [f"{ctx.desired.config_dir}/logs/{job.job_id}/{n}.log" for n in names]
        if role is None and instance is None:
            full = show_job(run, job.job_id)
            if full and full.stdout:
                paths.insert(0, full.stdout)
        argv = ["tail", "-n", str(lines), *(["-F"] if follow else []), "--", *paths]
        if follow:
            if not isinstance(run, LocalRunner):
                raise DisaggError("--follow works when sbatch runs on this machine; over SSH use without it")
            return subprocess.call(argv)
        r = run.run(argv)
        ctx.console.print(r.out, markup=False, highlight=False, end="")
        return 0 if r.ok else 1

    # ---- operations

    def submit(self, ctx: OpsContext, run: Runner, script: str) -> str:
        cfg_dir = ctx.desired.config_dir
        _check(run.run(["mkdir", "-p", "--", cfg_dir]), ["mkdir", "-p", cfg_dir], run.where)
        names = secret_files.names(ctx.spec)
        if names:
            write_job_secrets(run, cfg_dir, secret_files.file_text(names, secret_files.operator_values(ctx.spec)))
        # sbatch exports the submitting environment into the job: never the operator's secrets
        argv = cli.sbatch_argv(env_drop=names)
        r = _check(run.run(argv, input=script.encode()), argv, run.where)
        job_id = cli.parse_sbatch(r.out)
        self._say(ctx, f"submitted job {job_id} ({job_name(ctx.spec)}) via {run.where}")
        return job_id

    def wait_ready(
        self, ctx: OpsContext, run: Runner, job_id: str, timeout_s: float | None = None
    ) -> tuple[str, dict[str, str]]:
        """Until the job reports `ready` in its comment; a job that ends or fails first is reported with the
        relevant lines of its output file."""
        # Pending time counts too: a busy partition may hold the job for a while before it starts.
        opt = ctx.options.get("start_timeout_s")
        limit = timeout_s or (float(opt) if isinstance(opt, int | float) else ctx.spec.health.startup_timeout_s + 600)
        start = self._clock()
        last = ""
        while True:
            job = show_job(run, job_id)
            if job is None:
                raise DisaggError(f"job {job_id} disappeared from Slurm before it was ready")
            tag = job.tag
            state = tag.state if tag else "?"
            endpoint = tag.endpoint if tag else ""
            fields: dict[str, str] = {}
            if job.running:
                # The state file says the same as the comment; it also carries every process's URL, and it
                # still works where a site does not let users update their job's comment.
                fields = cli.parse_state_file(read_file(run, f"{ctx.desired.config_dir}/state.{job_id}") or "")
                if fields.get("job") == job_id and fields.get("state") and state in ("?", "submitted", "starting"):
                    state, endpoint = fields["state"], fields.get("endpoint", "")
            now = f"{job.state}/{state}"
            if now != last:
                self._say(
                    ctx,
                    f"job {job_id}: {job.state}"
                    + (f" ({job.reason})" if job.reason not in ("", "None") else "")
                    + f", deployment {state}",
                )
                last = now
            if state == "ready" and job.running and endpoint:
                urls = {k[4:]: v for k, v in fields.items() if k.startswith("url.")}
                return endpoint, urls
            if job.finished or state == "failed":
                self._fail(
                    run,
                    job,
                    f"job {job_id} ended ({job.state}, exit {job.exit_code}) before it was ready"
                    if job.finished
                    else f"job {job_id} reported a failure",
                )
            if self._clock() - start > limit:
                raise DisaggError(
                    f"job {job_id} not ready after {limit:g} s (Slurm state {job.state}, "
                    f"reason {job.reason}); it keeps running: `disaggctl destroy` cancels it"
                )
            self._sleep(self._poll_s)

    def _fail(self, run: Runner, job: cli.Job, message: str) -> None:
        for _ in range(10):  # the batch shell may still be writing its report
            if job.finished:
                break
            self._sleep(self._poll_s)
            job = show_job(run, job.job_id) or job
        lines = cli.relevant_lines(job_output(run, job))
        detail = "\n".join(f"    {ln}" for ln in lines) or "    (the output file is empty)"
        detail = secret_files.redact(detail, self._secret_values)  # a process that printed its environment
        raise DisaggError(f"{message}; from {job.stdout or 'its output file'}:\n{detail}")

    def check_health(
        self, ctx: OpsContext, endpoint: str, urls: dict[str, str], phases: Phases | None = None,
        http: NodeHttp | None = None,
    ) -> None:
        """The shared gate: every /health (at the URLs the job reported), the router, the canary; over
        `http` (default: from this machine)."""
        from disaggctl.targets.gate import HealthGate, canary_summary

        if ctx.options.get("skip_canary"):
            return
        via = http or DirectHttp()
        gate = HealthGate(ctx.spec, ctx.desired, urls=urls or {"router": endpoint}, router_url=endpoint,
                          probe=via.probe, fetch=via.fetch, request=via.request)  # fmt: skip
        with phases.step("slurm", f"health ({len(gate.urls)})") if phases else nullcontext():
            gate.wait()
        with phases.step("slurm", "canary") if phases else nullcontext():
            gate.router_sees_upstreams()
            result = gate.canary()
        self._say(ctx, canary_summary(result))

    def _stop_jobs(self, ctx: OpsContext, run: Runner, ids: list[str]) -> None:
        """Clean stop (SIGTERM to the batch shell: its trap stops router, prefill, decode), then scancel
        whatever is left, and wait until Slurm shows nothing of these jobs running."""
        jobs = {j.job_id: j for j in list_jobs(run, job_name(ctx.spec))}
        for i in ids:
            j = jobs.get(i)
            if j is not None and j.running:
                self._say(ctx, f"stopping job {i} (SIGTERM to its batch shell)")
                run.run(cli.scancel_argv(i, signal="TERM", batch=True))
            else:
                run.run(cli.scancel_argv(i))
        n_steps = max(1, len(ctx.desired.processes))
        if not self._wait_gone(run, ctx, ids, STOP_TIMEOUT_S * n_steps + 30):
            self._say(ctx, "jobs still running after the clean stop; cancelling them")
            for i in ids:
                run.run(cli.scancel_argv(i))
            if not self._wait_gone(run, ctx, ids, 120):
                raise DisaggError(f"jobs {', '.join(ids)} still in the queue after scancel")

    def _wait_gone(self, run: Runner, ctx: OpsContext, ids: list[str], timeout_s: float) -> bool:
        start = self._clock()
        while True:
            left = [j for j in list_jobs(run, job_name(ctx.spec)) if j.job_id in ids]
            if not left:
                return True
            if self._clock() - start > timeout_s:
                return False
            self._sleep(self._poll_s)


def write_job_secrets(run: Runner, cfg_dir: str, text: str) -> None:
    """The job's secrets file, 0600 in a 0700 folder on the submit host (shared storage): the values go
    through stdin, never argv; written to a temp file and renamed."""
    path = secrets_path(cfg_dir)
    script = ('umask 077; d=$(dirname -- "$1"); mkdir -p -- "$d" && chmod 700 -- "$d" && '
              'cat > "$1.tmp.$$" && chmod 600 -- "$1.tmp.$$" && mv -f -- "$1.tmp.$$" "$1"')
    argv = ["sh", "-c", script, "sh", path]
    r = run.run(argv, input=text.encode())
    if not r.ok:  # the message is the shell's, about the path: never the values
        raise DisaggError(f"cannot write the job's secrets file {path} on {run.where} (exit {r.rc}): "
                          f"{(r.err or r.out).strip()}")


def remove_job_secrets(run: Runner, cfg_dir: str) -> None:
    run.run(["rm", "-f", "--", secrets_path(cfg_dir)])


def saved_plan(ctx: OpsContext, p: PlanResult) -> SavedPlan:
    """The shared plan document: every process follows the job (submitted, replaced or kept)."""
    act = Action.UNCHANGED if not p.submit else (Action.UPDATE if p.jobs else Action.CREATE)
    why = {Action.UNCHANGED: f"job {p.keep} runs it", Action.UPDATE: "the job runs another script",
           Action.CREATE: "no job runs the deployment"}[act]  # fmt: skip
    actions = [ProcessAction(process=q.name, action=act, reason=why, role=q.role.value, instance=q.instance,
                             host=q.host, start_order=q.start_order) for q in ctx.desired.processes]  # fmt: skip
    return SavedPlan(meta=plan_meta(ctx, "slurm", p.hash), changed=p.changes, actions=actions, target=p.to_json())


def _stale(saved: SavedPlan, observed: object) -> list[str]:
    if saved.target.get("observed") != observed:
        return ["the jobs changed since the plan was made"]
    return []


def status_report(
    ctx: OpsContext, jobs: list[cli.Job], current: cli.Job | None, fields: dict[str, str], digest: str,
    probe: Callable[[str, float], tuple[bool, str]] | None = None,
) -> StatusReport:
    """One row per process of the newest running job (URLs from its state file, /health read with `probe`,
    default from this machine), the jobs as detail."""
    from disaggctl.health import http_probe

    probe = probe or http_probe
    tag = current.tag if current else None
    endpoint = (tag.endpoint if tag and tag.endpoint else fields.get("endpoint")) or None
    matches = bool(tag and tag.hash == digest)
    rows: list[ProcessStatus] = []
    for q in ctx.desired.processes:
        url = fields.get(f"url.{q.name}")
        healthy, health = None, "-"
        if url:
            healthy, detail = probe(url.rstrip("/") + "/health", 5)
            health = "ok" if healthy else detail
        running = bool(current and current.running)
        state = current.state if current else "not deployed"
        rows.append(ProcessStatus(
            name=q.name, role=q.role.value, instance=q.instance, host=",".join(current.nodes) if current else "",
            state=state, running=running, healthy=healthy, health=health, port=q.http_port, gpus=list(q.gpus),
            unit=current.job_id if current else None,
            drift=[] if matches or not current else ["job runs another script"],
        ))  # fmt: skip
    job_rows = [{"job": j.job_id, "state": j.state, "reason": j.reason, "nodes": j.nodes, "time_left": j.time_left,
                 "deployment": j.tag.state if j.tag else None, "endpoint": j.tag.endpoint if j.tag else "",
                 "matches_spec": bool(j.tag and j.tag.hash == digest)} for j in jobs]  # fmt: skip
    notes = [] if jobs else [f"No job named {job_name(ctx.spec)} is pending or running."]
    ok = bool(rows) and matches and all(r.running and r.healthy is not False for r in rows)
    return StatusReport(deployment=ctx.desired.name, target="slurm", deployed=bool(jobs), healthy=ok,
                        endpoint=endpoint, processes=rows, notes=notes, detail={"jobs": job_rows})  # fmt: skip


def sbatch_test_only(run: Runner, desired: DesiredState, spec: ClusterSpec, path: str) -> Result:
    """`sbatch --test-only` of the rendered script written at `path` on the submit host (a check, not a submit)."""
    script = script_of(render_slurm(desired, spec)).content
    w = run.run(["sh", "-c", 'cat > "$1"', "sh", path], input=script.encode())
    if not w.ok:
        return w
    return run.run(cli.sbatch_test_argv(path))


def backend() -> SlurmBackend:
    return SlurmBackend()
