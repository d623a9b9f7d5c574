"""The local target: run a deployment on this machine under disaggctl's own supervisor.

apply: plan against the state folder -> confirm -> preflight (model folder, executables, ports)
-> write config files and the process table atomically -> start the supervisor detached (or
SIGHUP it: only changed processes restart) -> wait for every /health -> canary through the router
-> print the endpoint and a curl. A second apply of the same spec changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disaggctl.deployment import DesiredState, Rendered
from disaggctl.errors import DisaggError
from disaggctl.health import HealthError, HealthProgress
from disaggctl.render.local import ProcSpec, Table, paths, render, table
from disaggctl.secrets import FILE_NAME as SECRETS_FILE
from disaggctl.secrets import known_values, operator_values, redact, write_private
from disaggctl.spec import LocalTarget
from disaggctl.targets import OpsContext
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
from disaggctl.targets.local.rolling import LocalRestarter, local_rollplan
from disaggctl.targets.local.supervisor import kill_group, pid_alive, read_state, supervisor_pid, write_atomic
from disaggctl.targets.rolling import RollPlan
from disaggctl.targets.rollout import (
    ALL_AT_ONCE,
    RolloutRunner,
    Rotation,
    ensure_admin_token,
    roll_text,
    rollable,
    rollout_problems,
    rotation_for,
)
from disaggctl.targets.status import ProcessStatus, StatusReport, print_status, status_exit, with_checks

if TYPE_CHECKING:
    from disaggctl.targets.invariants import InvariantCheck

if TYPE_CHECKING:
    from disaggctl.targets.ui import Phases

SUPERVISOR_START_S = 15.0
LOG_TAIL = 25


def _target(ctx: OpsContext) -> LocalTarget:
    t = ctx.loaded.spec.target
    if not isinstance(t, LocalTarget):  # pragma: no cover - dispatch guarantees it
        raise DisaggError(f"local backend got target kind {t.kind}")
    return t


def deployed_table(state_dir: str) -> Table | None:
    try:
        return Table.from_json(paths(state_dir)["table"].read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DisaggError(
            f"{paths(state_dir)['table']} is unreadable ({e}); remove the state folder or run destroy"
        ) from None


def _why(old: ProcSpec, new: ProcSpec) -> str:
    changed = [f for f in ("argv", "env", "files_sha", "secrets", "secrets_sha", "cwd", "log", "http_port")
               if getattr(old, f) != getattr(new, f)]  # fmt: skip
    names = {"files_sha": "config file", "argv": "command line", "env": "environment", "secrets_sha": "secrets"}
    return ", ".join(names.get(f, f) for f in changed) + " changed"


def diff(old: Table | None, new: Table, running: bool, failed: Set[str] = frozenset()) -> list[ProcessAction]:
    """Pure: the actions that take the deployed table `old` to `new`, one per process."""
    actions: list[ProcessAction] = []
    before = {p.name: p for p in old.processes} if old else {}
    for p in new.processes:
        o = before.get(p.name)
        act, why = Action.UNCHANGED, ""
        if o is None:
            act, why = Action.CREATE, "new process"
        elif o != p:
            act, why = Action.UPDATE, _why(o, p)
        elif not running:
            act, why = Action.RESTART, "supervisor not running"
        elif p.name in failed:
            act, why = Action.RESTART, "failed: start it again"
        actions.append(_action(p, act, why))
    names = {p.name for p in new.processes}
    for name, o in before.items():
        if name not in names:
            actions.append(_action(o, Action.DELETE, "no longer in the spec"))
    if old is not None and (old.restart_on_crash, old.max_restarts) != (new.restart_on_crash, new.max_restarts):
        # the supervisor reads its policy at start: restart it as a whole
        actions = [
            a.model_copy(update={"action": Action.UPDATE, "reason": "restart policy changed"})
            if a.action is Action.UNCHANGED
            else a
            for a in actions
        ]
    return actions


def _action(p: ProcSpec, action: Action, reason: str) -> ProcessAction:
    return ProcessAction(process=p.name, action=action, reason=reason, role=p.role, instance=p.instance,
                         host="localhost", start_order=p.start_order)  # fmt: skip


def _changes(actions: list[ProcessAction]) -> bool:
    return any(a.action is not Action.UNCHANGED for a in actions)


# --------------------------------------------------------------------------- output


_STYLE = {"create": "green", "update": "yellow", "restart": "cyan", "delete": "red", "unchanged": "dim"}


def _print_plan(
    ctx: OpsContext, state_dir: str, actions: list[ProcessAction], files_changed: list[str], extra: Sequence[str] = ()
) -> None:
    c = ctx.console
    c.print(f"[bold]local[/bold] {ctx.desired.name}: state in {state_dir}")
    for a in actions:
        reason = f" ({a.reason})" if a.reason else ""
        c.print(f"  [{_STYLE[a.action.value]}]{a.action.value:<9}[/] {a.process}{reason}")
    for f in files_changed:
        c.print(f"  [yellow]write[/]     {f}")
    for line in extra:
        c.print(line, highlight=False, markup=False, soft_wrap=True)
    n = sum(1 for a in actions if a.action is not Action.UNCHANGED)
    c.print("No changes." if not n and not files_changed else f"{n} process change(s), {len(files_changed)} file(s).")


def _changed_files(rendered: Rendered) -> list[str]:
    out = []
    for f in rendered.files:
        p = Path(f.path)
        try:
            same = p.read_text() == f.content
        except OSError:
            same = False
        if not same:
            out.append(f.path)
    return out


# --------------------------------------------------------------------------- preflight


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "~", "./", "../"))


def preflight(desired: DesiredState, tbl: Table, old: Table | None, running: bool) -> None:
    """Refuse early, with a hint, what would only fail minutes later in a log."""
    for proc in desired.processes:
        if proc.role.value == "router":
            continue
        path = proc.argv[2] if len(proc.argv) > 2 and proc.argv[1] == "serve" else None
        if path and _looks_local(path) and not Path(os.path.expanduser(path)).exists():
            raise DisaggError(
                f"model folder {path} does not exist\n    hint: build the demo model with "
                f"`disaggctl demo-model {path}` or fix model.path"
            )
        break
    for p in tbl.processes:
        exe = p.argv[0]
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise DisaggError(
                f"{p.name}: executable {exe!r} not found\n    hint: run scripts/bootstrap.sh, or set "
                "target.vllm_bin / target.python_bin to absolute paths"
            )
    ours = {p.http_port for p in (old.processes if old and running else [])}
    for p in tbl.processes:
        if p.http_port is None or p.http_port in ours:
            continue
        host = desired.process(p.name).address
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, p.http_port)) == 0:
                raise DisaggError(
                    f"{p.name}: port {p.http_port} on {host} is already in use by another program\n"
                    "    hint: stop it, or change engine.http_port / router.port in the spec"
                )


# --------------------------------------------------------------------------- supervisor


def start_supervisor(state_dir: str, drop: Sequence[str] = ()) -> int:
    """drop: variables kept out of the supervisor's environment (target.secrets: engines read the file)."""
    pth = paths(state_dir)
    env = {k: v for k, v in os.environ.items() if k not in set(drop)}
    pth["logs"].mkdir(parents=True, exist_ok=True)
    with open(pth["supervisor_log"], "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "disaggctl.targets.local.supervisor", state_dir],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # detached: outlives this CLI and its terminal
            close_fds=True,
            env=env,
        )
    deadline = time.monotonic() + SUPERVISOR_START_S
    while time.monotonic() < deadline:
        if supervisor_pid(state_dir) == proc.pid:
            return proc.pid
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise DisaggError(f"the supervisor did not start; see {pth['supervisor_log']}\n{_tail(pth['supervisor_log'])}")


def stop_supervisor(state_dir: str, timeout_s: float = 60.0) -> None:
    pid = supervisor_pid(state_dir)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    # processes left behind by a supervisor that died: their pid files name their groups
    for pid_file in paths(state_dir)["run"].glob("*.pid"):
        try:
            child = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            child = 0
        if child > 1 and pid_alive(child):
            kill_group(child, 20.0)
        pid_file.unlink(missing_ok=True)


def _proc_states(state_dir: str) -> dict[str, dict[str, Any]]:
    st = read_state(state_dir) or {}
    procs = st.get("processes")
    return procs if isinstance(procs, dict) else {}


def _failed(state_dir: str) -> set[str]:
    """Processes the running supervisor gave up on (max_restarts reached): apply starts them again."""
    if supervisor_pid(state_dir) is None:
        return set()
    return {n for n, st in _proc_states(state_dir).items() if st.get("state") == "failed"}


def _wait_reloaded(state_dir: str, names: list[str], since: float, timeout_s: float = 90.0) -> None:
    """After SIGHUP: wait until every changed process was (re)started after `since` or failed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = _proc_states(state_dir)
        # started_at is stamped on every start attempt, also one that fails at once
        if all(((states.get(n) or {}).get("started_at") or 0) >= since for n in names):
            return
        time.sleep(0.1)
    raise DisaggError(f"the supervisor did not restart {', '.join(names)}; see {paths(state_dir)['supervisor_log']}")


def _tail(path: Path, n: int = LOG_TAIL) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"    (no log at {path})"
    return "\n".join("    | " + line for line in lines[-n:])


# --------------------------------------------------------------------------- the backend


@dataclass
class _Observed:
    """The local deployment as it is now, and the plan to the spec."""

    state_dir: str
    old: Table | None
    new: Table
    running: bool
    actions: list[ProcessAction]
    files: list[str]
    failed: set[str] = field(default_factory=set)
    roll: RollPlan | None = None  # a rolling change of running instances (targets/rolling.py)
    rotation: Rotation | None = None

    @property
    def changed(self) -> bool:
        return _changes(self.actions) or bool(self.files)

    def roll_lines(self) -> list[str]:
        if self.roll is None or self.rotation is None:
            return []
        return roll_text(self.roll, self.rotation)


def _admin_token(ctx: OpsContext) -> None:
    """The builtin router's admin token in its config folder, made once, before the router starts."""
    from disaggctl.compile import router_admin

    admin = router_admin(ctx.spec, ctx.desired.placement) if ctx.spec.router.kind == "builtin" else None
    if admin is not None and admin.token_file:
        ensure_admin_token(Path(admin.token_file))


class LocalBackend:
    """Backend protocol implementation: the host is this machine, a unit is a row of the supervisor's
    process table; the flow is the shared one of targets.base."""

    def _observe(self, ctx: OpsContext, rendered: Rendered, secrets: Mapping[str, str]) -> _Observed:
        state_dir = ctx.desired.config_dir
        new = table(ctx.desired, _target(ctx), secrets)
        old = deployed_table(state_dir)
        running = supervisor_pid(state_dir) is not None
        failed = _failed(state_dir)
        actions = diff(old, new, running, failed)
        o = _Observed(state_dir, old, new, running, actions, _changed_files(rendered), failed)
        if running and old is not None and _same_policy(old, new):
            roll = local_rollplan(ctx.spec, ctx.desired, old, new, actions, failed)
            if roll.strategy != "none":
                o.roll, o.rotation = roll, rotation_for(ctx.spec, ctx.desired)
        return o

    def _saved(self, ctx: OpsContext, o: _Observed) -> SavedPlan:
        base = o.old.to_json() if o.old else None
        details: dict[str, Any] = {"state_dir": o.state_dir, "base": base, "table": o.new.to_json(), "files": o.files}
        if o.roll is not None and o.rotation is not None:
            details["rollout"] = dict(o.roll.to_dict(), problems=rollout_problems(o.roll, o.rotation),
                                      rotation=o.rotation.description)  # fmt: skip
        digest = hashlib.sha256(o.new.to_json().encode()).hexdigest()
        return SavedPlan(meta=plan_meta(ctx, "local", digest), changed=o.changed, actions=o.actions, target=details)

    def plan(self, ctx: OpsContext, out_file: str | None, detailed_exitcode: bool) -> int:
        values = operator_values(ctx.spec)
        o = self._observe(ctx, render(ctx.desired, _target(ctx), values), values)
        show = lambda: _print_plan(ctx, o.state_dir, o.actions, o.files, o.roll_lines())  # noqa: E731
        return finish_plan(ctx, self._saved(ctx, o), show, out_file, detailed_exitcode)

    def apply(self, ctx: OpsContext, plan_file: str | None) -> int:
        from disaggctl.targets.ui import Phases

        values = operator_values(ctx.spec)
        rendered = render(ctx.desired, _target(ctx), values)
        o = self._observe(ctx, rendered, values)
        base = o.old.to_json() if o.old else None
        check_saved_plan(plan_file, self._saved(ctx, o), lambda s: _stale(s, base))
        _print_plan(ctx, o.state_dir, o.actions, o.files, o.roll_lines())
        if not o.changed:
            return self._gate(ctx, o.new, None)
        if not confirm(ctx, "Apply these changes?", plan_file):
            ctx.console.print("Apply cancelled.")
            return 1
        if not self._confirm_roll(ctx, o, plan_file):
            ctx.console.print("Apply cancelled.")
            return 1
        if o.roll is not None and o.rotation is not None and not rollable(o.roll, o.rotation):
            ctx.console.print(ALL_AT_ONCE)
            o.roll = None
        preflight(ctx.desired, o.new, o.old, supervisor_pid(o.state_dir) is not None)
        with Phases(ctx.console) as phases:
            with phases.step("local", "files"):
                self._write(rendered, o.state_dir, table_too=o.roll is None)
                _admin_token(ctx)
            if o.roll is not None:
                if not self._roll(ctx, o, phases):
                    return 1
            else:
                self._start(ctx, o, phases)
            return self._gate(ctx, o.new, phases)

    def _confirm_roll(self, ctx: OpsContext, o: _Observed, plan_file: str | None) -> bool:
        """A rollout that breaks pairs or leaves a role without an instance asks first (-y: go on)."""
        if o.roll is None or o.rotation is None or not rollout_problems(o.roll, o.rotation):
            return True
        return confirm(ctx, "This change cannot be rolled without failing requests (see above). Roll it anyway?")

    def _roll(self, ctx: OpsContext, o: _Observed, phases: Phases) -> bool:
        """Each step of the rolling plan, then the final table (router, new and removed processes)."""
        from disaggctl.targets.gate import HealthGate

        assert o.roll is not None and o.rotation is not None and o.old is not None
        state_dir = o.state_dir
        gate = HealthGate(ctx.spec, ctx.desired, urls=_urls(o.new))
        restarter = LocalRestarter(state_dir, o.old, o.new, _wait_reloaded)
        runner = RolloutRunner(o.roll, gate, o.rotation, restarter, lambda m: ctx.console.print(m, markup=False),
                               alive=_alive(state_dir))  # fmt: skip
        restarts0 = {n: int(st.get("restarts") or 0) for n, st in _proc_states(state_dir).items()}
        try:
            with phases.step("local", f"rolling {len(o.roll.rolled)} instance(s), {len(o.roll.steps)} steps"):
                runner.run()
            with phases.step("local", "final table"):
                rest = restarter.finish()
            ctx.console.print(f"rolled {', '.join(o.roll.rolled)}; then restarted {', '.join(rest) or 'nothing'}")
        except HealthError as e:
            _explain_failure(ctx, o.new, e, restarts0)
            ctx.console.print("[red]the rollout stopped[/]; instances not rolled yet still run the old definition")
            return False
        return True

    def _start(self, ctx: OpsContext, o: _Observed, phases: Phases) -> None:
        """SIGHUP a running supervisor with the same restart policy (only changed processes restart);
        else (re)start the supervisor."""
        t0 = time.time()
        same_policy = o.old is not None and (o.old.restart_on_crash, o.old.max_restarts) == (
            o.new.restart_on_crash,
            o.new.max_restarts,
        )
        if o.running and same_policy:
            pid = supervisor_pid(o.state_dir)
            assert pid is not None
            changed = [a.process for a in o.actions if a.action in (Action.CREATE, Action.UPDATE, Action.RESTART)]
            with phases.step("local", f"restart {', '.join(changed) or 'nothing'}"):
                os.kill(pid, signal.SIGHUP)
                _wait_reloaded(o.state_dir, changed, t0)
            ctx.console.print(f"supervisor (pid {pid}) restarted: {', '.join(changed) or 'nothing'}")
            return
        with phases.step("local", "start supervisor"):
            if supervisor_pid(o.state_dir) is not None:
                stop_supervisor(o.state_dir)
            pid = start_supervisor(o.state_dir, drop=o.new.secret_names)
        ctx.console.print(f"supervisor started (pid {pid}); logs in {paths(o.state_dir)['logs']}")

    def _write(self, rendered: Rendered, state_dir: str, table_too: bool = True) -> None:
        """The state folder's files; without `table_too` the process table is left to the rollout."""
        pth = paths(state_dir)
        for d in ("logs", "run", "work"):
            pth[d].mkdir(parents=True, exist_ok=True)
        for f in rendered.files:
            if not table_too and Path(f.path) == pth["table"]:
                continue
            p = Path(f.path)
            p.parent.mkdir(parents=True, exist_ok=True)
            if f.secret:
                write_private(p, f.content)  # 0600 from the first byte
                continue
            write_atomic(p, f.content)
            os.chmod(p, f.mode)

    def _gate(self, ctx: OpsContext, tbl: Table, phases: Phases | None) -> int:
        """The shared gate (health of every process, router, canary); on failure the process's log tail."""
        from disaggctl.targets.gate import HealthGate, canary_summary

        state_dir = tbl.state_dir
        gate = HealthGate(ctx.spec, ctx.desired, urls=_urls(tbl))
        restarts0 = {n: int(st.get("restarts") or 0) for n, st in _proc_states(state_dir).items()}
        try:
            with _step(phases, f"health ({len(gate.urls)})"):
                gate.wait(None, alive=_alive(state_dir), on_progress=_progress_printer(ctx))
            with _step(phases, "canary"):
                gate.router_sees_upstreams()
                res = gate.canary()
        except HealthError as e:
            _explain_failure(ctx, tbl, e, restarts0)
            return 1
        ctx.console.print(f"  [green]{canary_summary(res)}[/]")
        self._print_endpoint(ctx)
        return 0

    def _print_endpoint(self, ctx: OpsContext) -> None:
        url = ctx.desired.router_url
        body = json.dumps({"model": ctx.desired.model_name, "prompt": "The quick brown fox " * 12, "max_tokens": 16})
        ctx.console.print(f"\n[bold]Ready[/]: {url} (OpenAI API: /v1/completions, /v1/chat/completions)")
        curl = f"curl -s {url}/v1/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}"
        ctx.console.print(curl, soft_wrap=True, highlight=False, markup=False)

    # ------------------------------------------------------------------ status / destroy / logs

    def status(self, ctx: OpsContext) -> int:
        report = status_report(ctx)
        print_status(ctx, report)
        return status_exit(report)

    def destroy(self, ctx: OpsContext) -> int:
        state_dir = ctx.desired.config_dir
        old = deployed_table(state_dir)
        if old is None and supervisor_pid(state_dir) is None:
            ctx.console.print(f"{ctx.desired.name}: nothing deployed in {state_dir}")
            return 0
        names = [p.name for p in old.processes] if old else []
        ctx.console.print(
            f"destroy {ctx.desired.name}: stop {', '.join(names) or 'the supervisor'}; remove {state_dir}"
        )
        if not confirm(ctx, "Destroy these?"):
            ctx.console.print("Destroy cancelled.")
            return 1
        t0 = time.monotonic()
        stop_supervisor(state_dir)
        removed = _remove_owned(state_dir)
        ctx.console.print(
            f"stopped and removed {removed} entries in {time.monotonic() - t0:.1f} s; "
            f"logs kept in {paths(state_dir)['logs']}"
        )
        return 0

    def logs(self, ctx: OpsContext, role: str | None, instance: int | None, follow: bool, lines: int) -> int:
        state_dir = ctx.desired.config_dir
        tbl = deployed_table(state_dir) or table(ctx.desired, _target(ctx))
        wanted = {p.name for p in select_processes(ctx.desired, role, instance)}
        files = {p.name: Path(p.log) for p in tbl.processes if p.name in wanted}
        if not files:
            raise DisaggError(f"no process matches --role {role} --instance {instance}")
        for name, path in files.items():
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:] if lines > 0 else []
            except OSError:
                text = [f"(no log yet at {path})"]
            for line in text:
                sys.stdout.write(f"{name}| {line}\n")
        sys.stdout.flush()
        if follow:
            _follow(files, time.sleep)
        return 0


def _same_policy(old: Table, new: Table) -> bool:
    return (old.restart_on_crash, old.max_restarts) == (new.restart_on_crash, new.max_restarts)


def _urls(tbl: Table) -> dict[str, str]:
    return {p.name: p.health_url.rsplit("/", 1)[0] for p in tbl.processes if p.health_url}


def _alive(state_dir: str) -> Callable[[str], bool]:
    def alive(name: str) -> bool:
        if supervisor_pid(state_dir) is None:
            return False
        return (_proc_states(state_dir).get(name) or {}).get("state") != "failed"

    return alive


def _stale(saved: SavedPlan, base: str | None) -> list[str]:
    if saved.target.get("base") != base:
        return ["the deployment changed since the plan was made (its process table differs)"]
    return []


@contextmanager
def _step(phases: Phases | None, what: str) -> Iterator[None]:
    if phases is None:
        yield
        return
    with phases.step("local", what):
        yield


def _progress_printer(ctx: OpsContext) -> Callable[[HealthProgress], None]:
    shown: dict[str, float] = {}
    c = ctx.console

    def progress(ev: HealthProgress) -> None:
        if ev.healthy:
            c.print(f"  [green]healthy[/] {ev.name} after {ev.elapsed_s:.1f} s")
        elif ev.elapsed_s - shown.get(ev.name, -30.0) >= 15:
            shown[ev.name] = ev.elapsed_s
            c.print(f"  waiting for {ev.name} ({ev.elapsed_s:.0f} s): {ev.detail}")

    return progress


def _explain_failure(ctx: OpsContext, tbl: Table, e: HealthError, restarts0: Mapping[str, int]) -> None:
    c = ctx.console
    c.print(f"[red]health check failed[/]: {e}")
    if e.name in {p.name for p in tbl.processes}:
        tail = redact(_tail(Path(tbl.proc(e.name).log)), known_values(ctx.spec))  # a process may print its env
        c.print(f"last lines of {tbl.proc(e.name).log}:\n{tail}")
    for name, st in _proc_states(tbl.state_dir).items():
        # a process that died during the check explains a failed canary better than the canary does
        if int(st.get("restarts") or 0) > restarts0.get(name, 0) or st.get("state") == "failed":
            code = st.get("last_exit")
            why = " (SIGKILL: out of memory?)" if code == -9 else ""
            c.print(f"[red]{name} exited with {code}{why} during the check[/]; now {st.get('state')}")
    c.print(f"hint: `disaggctl logs {ctx.loaded.file}` shows every log; `disaggctl destroy` stops it all")


def status_report(ctx: OpsContext) -> StatusReport:
    """The deployed table, the supervisor's view of each process, /health, and drift from the spec."""
    from disaggctl.health import http_probe

    state_dir = ctx.desired.config_dir
    old = deployed_table(state_dir)
    sup = supervisor_pid(state_dir)
    detail: dict[str, object] = {"state_dir": state_dir, "supervisor_pid": sup}
    common = {"deployment": ctx.desired.name, "target": "local", "endpoint": ctx.desired.router_url, "detail": detail}
    if old is None:
        return StatusReport(deployed=False, healthy=False, notes=[f"no {paths(state_dir)['table']}"], **common)
    states = _proc_states(state_dir)
    drift = {a.process: a for a in diff(old, _wanted(ctx, old), sup is not None)
             if a.action in (Action.CREATE, Action.UPDATE, Action.DELETE)}  # fmt: skip
    rows: list[ProcessStatus] = []
    for p in old.processes:
        st = states.get(p.name) or {}
        pid = st.get("pid") if sup else None
        healthy, health = None, "-"
        if p.health_url and pid:
            healthy, detail_ = http_probe(p.health_url, 2.0)
            health = "ok" if healthy else detail_
        state = str(st.get("state", "unknown")) if sup else "stopped"
        d = drift.get(p.name)
        rows.append(ProcessStatus(
            name=p.name, role=p.role, instance=p.instance, host="localhost", state=state, running=state == "running",
            healthy=healthy, health=health, pid=pid if isinstance(pid, int) else None,
            restarts=int(st.get("restarts") or 0), port=p.http_port, cores=p.env.get("VLLM_CPU_OMP_THREADS_BIND"),
            unit=None, log=p.log, drift=[d.reason] if d else [],
        ))  # fmt: skip
    for name, a in drift.items():
        if a.action is Action.CREATE:
            rows.append(ProcessStatus(name=name, role=a.role, instance=a.instance, host="localhost",
                                      state="not deployed", running=False, healthy=None,
                                      drift=["in the spec, not deployed"]))  # fmt: skip
    ok = sup is not None and all(r.running and r.healthy is not False for r in rows)
    notes = [] if sup else ["the supervisor is not running: `disaggctl apply` starts it"]
    report = StatusReport(deployed=True, healthy=ok, processes=rows, notes=notes, **common)
    return with_checks(report, _checks(ctx, old, states)) if ctx.options.get("check") else report


def _checks(ctx: OpsContext, tbl: Table, states: Mapping[str, Mapping[str, Any]]) -> list[InvariantCheck]:
    """`status --check`: the invariants over the running instances' and the router's metrics."""
    from disaggctl.targets.gate import http_fetch
    from disaggctl.targets.invariants import scrape_and_check
    from disaggctl.targets.local.rolling import head_argv
    from disaggctl.targets.rollout import running_fingerprints

    down = {n for n, st in states.items() if st.get("state") != "running"}
    urls = {p.name: (p.role, p.health_url.rsplit("/", 1)[0]) for p in tbl.processes
            if p.health_url and p.role in ("prefill", "decode") and p.name not in down}  # fmt: skip
    fps = running_fingerprints(ctx.spec, ctx.desired, head_argv(tbl, down))
    router = next((p for p in tbl.processes if p.role == "router" and p.health_url), None)
    router_metrics = router.health_url.rsplit("/", 1)[0] + "/metrics" if router and router.health_url else None
    return scrape_and_check(urls, router_metrics, fps, http_fetch)


def _wanted(ctx: OpsContext, old: Table) -> Table:
    """The table the spec wants, for status: with the operator's secrets when they are set, else the
    deployed rows' secrets hash (status does not need the values to report drift elsewhere)."""
    try:
        return table(ctx.desired, _target(ctx), operator_values(ctx.spec))
    except DisaggError:
        want = table(ctx.desired, _target(ctx))
        deployed = {p.name: p.secrets_sha for p in old.processes}
        procs = [dataclasses.replace(p, secrets_sha=deployed.get(p.name, p.secrets_sha)) for p in want.processes]
        return dataclasses.replace(want, processes=procs)


def _remove_owned(state_dir: str) -> int:
    """Exactly what disaggctl wrote: config files, the table, run/ and work/; logs stay."""
    import shutil

    from disaggctl.compile import ROUTER_ADMIN_TOKEN

    pth = paths(state_dir)
    n = 0
    # the names compile gives ConfigFiles (router.json, lmcache-<instance>.yaml), the table, the admin token
    token = Path(state_dir) / ROUTER_ADMIN_TOKEN
    owned = [pth["table"], Path(state_dir) / "router.json", Path(state_dir) / SECRETS_FILE, token]
    for f in [*owned, *Path(state_dir).glob("lmcache-*.yaml")]:
        if f.exists():
            f.unlink()
            n += 1
    for d in (pth["run"], pth["work"]):
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def _follow(files: dict[str, Path], sleep: Callable[[float], None]) -> None:
    pos = {n: (p.stat().st_size if p.exists() else 0) for n, p in files.items()}
    try:
        while True:
            for name, path in files.items():
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if size < pos[name]:
                    pos[name] = 0  # truncated
                if size > pos[name]:
                    with open(path, "rb") as f:
                        f.seek(pos[name])
                        chunk = f.read(size - pos[name])
                    pos[name] = size
                    for line in chunk.decode(errors="replace").splitlines():
                        sys.stdout.write(f"{name}| {line}\n")
                    sys.stdout.flush()
            sleep(0.5)
    except KeyboardInterrupt:
        return


def backend() -> LocalBackend:
    return LocalBackend()
