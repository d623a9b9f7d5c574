"""The local target: run a deployment on this machine under disaggctl's own supervisor.

apply: plan against the state folder -> confirm -> preflight (model folder, executables, ports)
-> write config files and the process table atomically -> start the supervisor detached (or
SIGHUP it: only changed processes restart) -> wait for every /health -> canary through the router
-> print the endpoint and a curl. A second apply of the same spec changes nothing.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Set
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from disaggctl.deployment import DesiredState, Rendered
from disaggctl.errors import DisaggError
from disaggctl.health import HealthError, HealthProgress, run_canary, wait_healthy
from disaggctl.render.local import ProcSpec, Table, paths, render, table
from disaggctl.spec import LocalTarget
from disaggctl.targets.local.supervisor import kill_group, pid_alive, read_state, supervisor_pid, write_atomic
from disaggctl.targets import OpsContext

SUPERVISOR_START_S = 15.0
LOG_TAIL = 25


@dataclass(frozen=True)
class Action:
    """One line of the plan: what happens to a process and why."""

    kind: str  # create | update | start | delete | unchanged
    name: str
    reason: str = ""


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
    changed = [f for f in ("argv", "env", "files_sha", "cwd", "log", "http_port") if getattr(old, f) != getattr(new, f)]
    names = {"files_sha": "config file", "argv": "command line", "env": "environment"}
    return ", ".join(names.get(f, f) for f in changed) + " changed"


def diff(old: Table | None, new: Table, running: bool, failed: Set[str] = frozenset()) -> list[Action]:
    """Pure: the actions that take the deployed table `old` to `new`."""
    actions: list[Action] = []
    before = {p.name: p for p in old.processes} if old else {}
    for p in new.processes:
        o = before.get(p.name)
        if o is None:
            actions.append(Action("create", p.name, "new process"))
        elif o != p:
            actions.append(Action("update", p.name, _why(o, p)))
        elif not running:
            actions.append(Action("start", p.name, "supervisor not running"))
        elif p.name in failed:
            actions.append(Action("start", p.name, "failed: start it again"))
        else:
            actions.append(Action("unchanged", p.name))
    names = {p.name for p in new.processes}
    for name in before:
        if name not in names:
            actions.append(Action("delete", name, "no longer in the spec"))
    if old is not None and (old.restart_on_crash, old.max_restarts) != (new.restart_on_crash, new.max_restarts):
        # the supervisor reads its policy at start: restart it as a whole
        actions = [Action("update", a.name, "restart policy changed") if a.kind == "unchanged" else a for a in actions]
    return actions


def _changes(actions: list[Action]) -> bool:
    return any(a.kind != "unchanged" for a in actions)


# --------------------------------------------------------------------------- output


_STYLE = {"create": "green", "update": "yellow", "start": "cyan", "delete": "red", "unchanged": "dim"}


def _print_plan(ctx: OpsContext, state_dir: str, actions: list[Action], files_changed: list[str]) -> None:
    c = ctx.console
    c.print(f"[bold]local[/bold] {ctx.desired.name}: state in {state_dir}")
    for a in actions:
        reason = f" ({a.reason})" if a.reason else ""
        c.print(f"  [{_STYLE[a.kind]}]{a.kind:<9}[/] {a.name}{reason}")
    for f in files_changed:
        c.print(f"  [yellow]write[/]     {f}")
    n = sum(1 for a in actions if a.kind != "unchanged")
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


def start_supervisor(state_dir: str) -> int:
    pth = paths(state_dir)
    pth["logs"].mkdir(parents=True, exist_ok=True)
    with open(pth["supervisor_log"], "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "disaggctl.targets.local.supervisor", state_dir],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # detached: outlives this CLI and its terminal
            close_fds=True,
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


class LocalBackend:
    def plan(self, ctx: OpsContext, out_file: str | None, detailed_exitcode: bool) -> int:
        target = _target(ctx)
        state_dir = ctx.desired.config_dir
        new = table(ctx.desired, target)
        old = deployed_table(state_dir)
        running = supervisor_pid(state_dir) is not None
        actions = diff(old, new, running, _failed(state_dir))
        files = _changed_files(render(ctx.desired, target))
        if ctx.output == "json":
            data = {"target": "local", "state_dir": state_dir, "actions": [asdict(a) for a in actions], "files": files}
            sys.stdout.write(json.dumps(data, indent=2) + "\n")
        else:
            _print_plan(ctx, state_dir, actions, files)
        if out_file:
            saved = {
                "spec_file": str(Path(ctx.loaded.file).resolve()),
                "profiles": list(ctx.loaded.spec.profiles),
                "target": "local",
                "state_dir": state_dir,
                "base": old.to_json() if old else None,
                "table": new.to_json(),
                "actions": [asdict(a) for a in actions],
            }
            write_atomic(Path(out_file), json.dumps(saved, indent=2) + "\n")
            ctx.console.print(f"plan saved to {out_file}")
        changed = _changes(actions) or bool(files)
        return 2 if detailed_exitcode and changed else 0

    def apply(self, ctx: OpsContext, plan_file: str | None) -> int:
        target = _target(ctx)
        desired = ctx.desired
        state_dir = desired.config_dir
        rendered = render(desired, target)
        new = table(desired, target)
        old = deployed_table(state_dir)
        if plan_file:
            saved = json.loads(Path(plan_file).read_text())
            if saved.get("base") != (old.to_json() if old else None):
                raise DisaggError(f"the deployment changed since {plan_file} was made; run `disaggctl plan` again")
            if saved.get("table") != new.to_json():
                raise DisaggError(f"the spec no longer compiles to {plan_file}; run `disaggctl plan` again")
        running = supervisor_pid(state_dir) is not None
        actions = diff(old, new, running, _failed(state_dir))
        files = _changed_files(rendered)
        _print_plan(ctx, state_dir, actions, files)
        if _changes(actions) or files:
            if not ctx.yes and not self._confirm(ctx):
                ctx.console.print("Apply cancelled.")
                return 1
            preflight(desired, new, old, supervisor_pid(state_dir) is not None)
            self._write(rendered, state_dir)
            t0 = time.time()
            same_policy = old is not None and (old.restart_on_crash, old.max_restarts) == (
                new.restart_on_crash,
                new.max_restarts,
            )
            if running and same_policy:
                pid = supervisor_pid(state_dir)
                assert pid is not None
                os.kill(pid, signal.SIGHUP)
                changed = [a.name for a in actions if a.kind in ("create", "update", "start")]
                _wait_reloaded(state_dir, changed, t0)
                ctx.console.print(f"supervisor (pid {pid}) restarted: {', '.join(changed) or 'nothing'}")
            else:
                if supervisor_pid(state_dir) is not None:
                    stop_supervisor(state_dir)
                pid = start_supervisor(state_dir)
                ctx.console.print(f"supervisor started (pid {pid}); logs in {paths(state_dir)['logs']}")
        return self._gate(ctx, new)

    def _confirm(self, ctx: OpsContext) -> bool:
        if not sys.stdin.isatty():
            raise DisaggError("apply needs confirmation: run it in a terminal or pass -y")
        answer = ctx.console.input("Apply these changes? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    def _write(self, rendered: Rendered, state_dir: str) -> None:
        pth = paths(state_dir)
        for d in ("logs", "run", "work"):
            pth[d].mkdir(parents=True, exist_ok=True)
        for f in rendered.files:
            p = Path(f.path)
            p.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(p, f.content)
            os.chmod(p, f.mode)

    def _gate(self, ctx: OpsContext, tbl: Table) -> int:
        """Health of every process, then the canary; on failure show the process's log tail."""
        spec = ctx.loaded.spec
        state_dir = tbl.state_dir
        c = ctx.console
        targets = {p.name: p.health_url for p in tbl.processes if p.health_url}
        shown: dict[str, float] = {}
        restarts0 = {n: int(st.get("restarts") or 0) for n, st in _proc_states(state_dir).items()}

        def alive(name: str) -> bool:
            if supervisor_pid(state_dir) is None:
                return False
            return (_proc_states(state_dir).get(name) or {}).get("state") != "failed"

        def progress(ev: HealthProgress) -> None:
            if ev.healthy:
                c.print(f"  [green]healthy[/] {ev.name} after {ev.elapsed_s:.1f} s")
            elif ev.elapsed_s - shown.get(ev.name, -30.0) >= 15:
                shown[ev.name] = ev.elapsed_s
                c.print(f"  waiting for {ev.name} ({ev.elapsed_s:.0f} s): {ev.detail}")

        try:
            wait_healthy(
                targets, spec.health.startup_timeout_s, spec.health.interval_s, alive=alive, on_progress=progress
            )
            decode_metrics = [
                p.health_url.rsplit("/", 1)[0] + "/metrics"
                for p in tbl.processes
                if p.role == "decode" and p.health_url
            ]
            canary = spec.health.canary
            res = run_canary(
                ctx.desired.router_url,
                ctx.desired.model_name,
                canary.prompt,
                canary.max_tokens,
                decode_metrics,
                spec.health.request_timeout_s,
                canary.require_kv_transfer,
                block_size=(spec.decode.block_size or 32) if ctx.desired.kv_kind == "shared-storage" else None,
            )
        except HealthError as e:
            c.print(f"[red]health check failed[/]: {e}")
            if e.name in targets:
                c.print(f"last lines of {tbl.proc(e.name).log}:\n{_tail(Path(tbl.proc(e.name).log))}")
            for name, st in _proc_states(state_dir).items():
                # a process that died during the check explains a failed canary better than the canary does
                if int(st.get("restarts") or 0) > restarts0.get(name, 0) or st.get("state") == "failed":
                    code = st.get("last_exit")
                    why = " (SIGKILL: out of memory?)" if code == -9 else ""
                    c.print(f"[red]{name} exited with {code}{why} during the check[/]; now {st.get('state')}")
            c.print(f"hint: `disaggctl logs {ctx.loaded.file}` shows every log; `disaggctl destroy` stops it all")
            return 1
        kv = f"decode received the KV of {res.kv_tokens:g} prompt tokens" if res.kv_transferred else "no KV transfer"
        c.print(f"  [green]canary[/] {res.prompt_tokens} prompt tokens -> {res.text!r} in {res.latency_s:.2f} s ({kv})")
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
        target = _target(ctx)
        state_dir = ctx.desired.config_dir
        old = deployed_table(state_dir)
        sup = supervisor_pid(state_dir)
        new = table(ctx.desired, target)
        if old is None:
            msg = f"{ctx.desired.name}: not deployed (no {paths(state_dir)['table']})"
            if ctx.output == "json":
                sys.stdout.write(json.dumps({"deployed": False, "state_dir": state_dir}) + "\n")
            else:
                ctx.console.print(msg)
            return 1
        states = _proc_states(state_dir)
        drift = {a.name: a for a in diff(old, new, sup is not None) if a.kind in ("create", "update", "delete")}
        rows = []
        ok = sup is not None
        for p in old.processes:
            st = states.get(p.name) or {}
            pid = st.get("pid") if sup else None
            healthy: bool | None = None
            if p.health_url and pid:
                from disaggctl.health import http_probe

                healthy = http_probe(p.health_url, 2.0)[0]
            state = str(st.get("state", "unknown")) if sup else "stopped"
            ok = ok and state == "running" and healthy is not False
            d = drift.get(p.name)
            rows.append(
                {
                    "name": p.name,
                    "role": p.role,
                    "state": state,
                    "pid": pid,
                    "restarts": st.get("restarts", 0),
                    "port": p.http_port,
                    "healthy": healthy,
                    "cores": p.env.get("VLLM_CPU_OMP_THREADS_BIND"),
                    "drift": (d.reason if d else None),
                    "log": p.log,
                }
            )
        for name, a in drift.items():
            if a.kind == "create":
                rows.append({"name": name, "state": "not deployed", "drift": "in the spec, not deployed"})
                ok = False
        if ctx.output == "json":
            out = {"deployed": True, "state_dir": state_dir, "supervisor_pid": sup, "processes": rows}
            sys.stdout.write(json.dumps(out, indent=2) + "\n")
            return 0 if ok else 1
        from rich.table import Table as RichTable

        c = ctx.console
        c.print(
            f"[bold]{ctx.desired.name}[/] (local) state {state_dir}; supervisor "
            + (f"pid {sup}" if sup else "[red]not running[/]")
        )
        t = RichTable(show_edge=False)
        for col in ("process", "role", "state", "pid", "restarts", "port", "health", "cores", "drift"):
            t.add_column(col)
        for r in rows:
            h = r.get("healthy")
            t.add_row(
                str(r["name"]),
                str(r.get("role", "")),
                str(r["state"]),
                str(r.get("pid") or "-"),
                str(r.get("restarts", "")),
                str(r.get("port") or "-"),
                "-" if h is None else ("[green]ok[/]" if h else "[red]down[/]"),
                str(r.get("cores") or "-"),
                str(r.get("drift") or ""),
            )
        c.print(t)
        if sup:
            c.print(f"router: {ctx.desired.router_url}")
        return 0 if ok else 1

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
        if not ctx.yes and not self._confirm(ctx):
            ctx.console.print("Destroy cancelled.")
            return 1
        t0 = time.monotonic()
        stop_supervisor(state_dir)
        removed = self._remove_owned(state_dir)
        ctx.console.print(
            f"stopped and removed {removed} entries in {time.monotonic() - t0:.1f} s; "
            f"logs kept in {paths(state_dir)['logs']}"
        )
        return 0

    def _remove_owned(self, state_dir: str) -> int:
        """Exactly what disaggctl wrote: config files, the table, run/ and work/; logs stay."""
        import shutil

        pth = paths(state_dir)
        n = 0
        for f in self._owned_files(state_dir):
            if f.exists():
                f.unlink()
                n += 1
        for d in (pth["run"], pth["work"]):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        return n

    def _owned_files(self, state_dir: str) -> list[Path]:
        # the names compile gives ConfigFiles (router.json, lmcache-<instance>.yaml) and the table
        return [paths(state_dir)["table"], Path(state_dir) / "router.json", *Path(state_dir).glob("lmcache-*.yaml")]

    def logs(self, ctx: OpsContext, role: str | None, instance: int | None, follow: bool, lines: int) -> int:
        state_dir = ctx.desired.config_dir
        tbl = deployed_table(state_dir) or table(ctx.desired, _target(ctx))
        procs = [p for p in tbl.processes if role is None or p.role == role]
        if instance is not None:
            procs = [p for p in procs if p.instance.rsplit("-", 1)[-1] == str(instance)]
        if not procs:
            raise DisaggError(f"no process matches role={role} instance={instance}")
        files = {p.name: Path(p.log) for p in procs}
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
