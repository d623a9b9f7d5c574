"""The systemd target: plan / apply / status / destroy / logs on hosts reached over SSH.

    observe   one shell command per host: manifest, sha256 + mode of every file of interest,
              `systemctl show` of every unit and the command line of its main process
    plan      changes.make_plan (pure) over the rendered files and the observed hosts
    apply     one command per host: stop and remove dropped units, files (pending manifest first,
              atomic uploads), enable + daemon-reload, start the first phase (decode); then
              decode's /health on all hosts, start prefill, gate, router, gate (each phase on all
              hosts in parallel), final manifest, and the canary through the router

One SSH connection per host for the whole operation, hosts in parallel threads; connecting
starts while the spec renders.
"""

from __future__ import annotations

import io
import os
import posixpath
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from disaggctl.targets.systemd.changes import (
    Action,
    HostPlan,
    Observed,
    Plan,
    load_plan,
    make_plan,
    parse_observe,
    same_command,
    stale_reasons,
)
from disaggctl.targets.systemd.changes import unified_diff as _udiff
from disaggctl.deployment import DesiredState, Process, Rendered
from disaggctl.errors import DisaggError
from disaggctl.targets.systemd.manifest import (
    OwnedFile,
    OwnedProcess,
    build_manifest,
    manifest_path,
    owned_list,
    owned_list_path,
    spec_hash,
    state_path,
)
from disaggctl.render.systemd import render_systemd, systemd_target, target_name, unit_name
from disaggctl.spec import SystemdTarget
from disaggctl.ssh import Connection, SshError, connect, target_for

if TYPE_CHECKING:
    from disaggctl.spec import ClusterSpec
    from disaggctl.targets import OpsContext
    from disaggctl.targets.systemd.ui import Phases

T = TypeVar("T")

# Reads everything a plan needs in one round trip, with few processes (it runs on every host on
# every plan): $1 the deployment's state folder, then the paths the spec wants; the paths the
# manifest owns are added from $1/owned. Sections are parsed by changes.parse_observe.
OBSERVE_SCRIPT = r"""
d=$1; shift
printf '@@manifest\n'
if [ -f "$d/manifest.json" ]; then
  while IFS= read -r l || [ -n "$l" ]; do printf '%s\n' "$l"; done < "$d/manifest.json"
fi
if [ -f "$d/owned" ]; then while IFS= read -r l; do set -- "$@" "$l"; done < "$d/owned"; fi
printf '\n@@paths\n'
units=""
for p in "$@"; do
  printf '%s\n' "$p"
  case $p in
    /etc/systemd/system/*/*) ;;
    /etc/systemd/system/*.service|/etc/systemd/system/*.target)
      case " $units " in *" ${p##*/} "*) ;; *) units="$units ${p##*/}";; esac;;
  esac
done
printf '@@sha\n'; [ $# -gt 0 ] && sha256sum -- "$@" 2>/dev/null
printf '@@mode\n'; [ $# -gt 0 ] && stat -c '%a %n' -- "$@" 2>/dev/null
if [ -n "$units" ] && command -v systemctl >/dev/null 2>&1; then
  printf '@@show\n'
  # shellcheck disable=SC2086 # unit names carry no spaces (prefix, deployment and process names are checked)
  show=$(systemctl show --property=Id,LoadState,ActiveState,SubState,MainPID,NRestarts,UnitFileState,NeedDaemonReload \
    -- $units)
  printf '%s\n\n@@cmdlines\n' "$show"
  # a for loop over the lines, not `printf | while read`: a pipeline forks two subshells
  ifs=$IFS; IFS='
'; set -f
  for kv in $show; do
    case $kv in MainPID=*) v=${kv#MainPID=} ;; *) continue ;; esac
    if [ "$v" -gt 0 ] && [ -r "/proc/$v/cmdline" ]; then
      printf '%s ' "$v"; base64 -w0 < "/proc/$v/cmdline"; echo
    fi
  done
  IFS=$ifs; set +f
fi
printf '@@end\n'
"""

# The whole "files" step of one host in one round trip. Arguments: folders to create, units to
# stop and disable, destination paths (their contents arrive as a tar on stdin, members named
# after each destination's temporary sibling `.NAME.dctl-tmp`, with their modes), paths to
# remove, units to enable; lists end with "--"; then "reload" or "-"; then the units to (re)start,
# in order, after the reload (a unit that fails names itself on stderr, exit 75). tar writes every temporary
# file next to its destination (creating missing folders), then each is renamed into place: each
# file lands atomically. Destinations are renamed in order, so the pending manifest (listed
# first) is on disk before any file it covers. Every process forked here runs on each host, so
# the script uses shell builtins (parameter expansion, not dirname/basename) wherever it can.
PUSH_SCRIPT = r"""
set -e
while [ "$1" != -- ]; do mkdir -p -- "$1"; shift; done; shift
stop=""; while [ "$1" != -- ]; do stop="$stop $1"; shift; done; shift
# shellcheck disable=SC2086 # unit names carry no spaces
[ -n "$stop" ] && { systemctl disable --now -q -- $stop 2>&1 || true; }
[ "$1" != -- ] && tar -x -C / -f -
while [ "$1" != -- ]; do
  mv -f -- "${1%/*}/.${1##*/}.dctl-tmp" "$1"
  shift
done; shift
while [ "$1" != -- ]; do rm -f -- "$1"; shift; done; shift
enable=""; while [ "$1" != -- ]; do enable="$enable $1"; shift; done; shift
# enable reloads systemd by itself unless told not to; one reload (~0.4 s of CPU) is enough
# shellcheck disable=SC2086
[ -n "$enable" ] && systemctl enable --no-reload -q -- $enable
[ "$1" = reload ] && systemctl daemon-reload
shift
for u in "$@"; do
  systemctl restart -- "$u" || { printf '\n@@failed %s\n' "$u" >&2; exit 75; }
done
exit 0
"""


def _tmp_member(path: str) -> str:
    """The tar member of a destination: its temporary sibling, relative to / (tar -C /)."""
    d, _, b = path.rpartition("/")
    return f"{d}/.{b}.dctl-tmp".lstrip("/")


def push(
    conn: Connection,
    files: list[tuple[str, bytes, int]],
    mkdirs: Sequence[str] = (),
    stop: Sequence[str] = (),
    remove: Sequence[str] = (),
    enable: Sequence[str] = (),
    reload: bool = False,
    start: Sequence[str] = (),
) -> None:
    """One command: mkdir, stop+disable, atomic writes (with modes), removals, enable, daemon-reload,
    then (re)start `start` in order; a unit that fails to start raises ApplyError with its journal."""
    # GNU tar skips members with ".." in their names: hand it (and mv) lexically normal paths
    files = [(posixpath.normpath(path), data, mode) for path, data, mode in files]
    # tar creates the folders of the files it writes; mkdir only those that receive none
    parents = {f[0].rpartition("/")[0] for f in files}
    mk = [d for d in mkdirs if not any(q == d.rstrip("/") or q.startswith(d.rstrip("/") + "/") for q in parents)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path, data, mode in files:
            info = tarfile.TarInfo(_tmp_member(path))
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    argv = ["sh", "-c", PUSH_SCRIPT, "push", *mk, "--", *stop, "--", *(f[0] for f in files), "--"]
    argv += [*remove, "--", *enable, "--", "reload" if reload else "-", *start]
    r = conn.run(argv, input=buf.getvalue() if files else None, sudo=True, timeout=300 + 600 * len(start))
    if r.rc == 75 and "\n@@failed " in r.err:
        err, _, unit = r.err.rpartition("\n@@failed ")
        unit = unit.strip()
        raise ApplyError(conn.name, unit, f"failed to start: {err.strip()}", journal_tail(conn, unit))
    if r.rc != 0:
        raise SshError(conn.name, f"push exited {r.rc}: {r.err.strip() or r.out.strip()}")


class ApplyError(DisaggError):
    """A step failed on a host: names the host and unit, carries the journal tail."""

    def __init__(self, host: str, unit: str | None, message: str, journal: str = "") -> None:
        self.host, self.unit, self.journal = host, unit, journal
        where = f"{host}: {unit}: " if unit else f"{host}: "
        super().__init__(where + message)


@dataclass
class Context:
    """Everything an operation derives from the spec once."""

    spec: ClusterSpec
    target: SystemdTarget
    desired: DesiredState
    rendered: Rendered
    digest: str
    unit_of: dict[str, str]  # process -> unit
    target_unit: str
    hosts: list[str]  # every declared host (a dropped host may still hold owned files)

    @property
    def state_dir(self) -> str:
        return state_path(self.target.state_dir, self.desired.name)


def build_context(spec: ClusterSpec, desired: DesiredState, secrets: Mapping[str, str] | None) -> Context:
    t = systemd_target(spec)
    rendered = render_systemd(desired, spec, secrets)
    return Context(
        spec=spec,
        target=t,
        desired=desired,
        rendered=rendered,
        digest=spec_hash(rendered),
        unit_of={p.name: unit_name(t.unit_prefix, desired.name, p.name) for p in desired.processes},
        target_unit=target_name(t.unit_prefix, desired.name),
        hosts=[h.name for h in spec.hosts],
    )


def operator_secrets(spec: ClusterSpec) -> dict[str, str]:
    t = systemd_target(spec)
    return {k: os.environ[k] for k in t.secrets if k in os.environ}


# --------------------------------------------------------------------------- connections


class Hosts:
    """One open SSH connection per host, used by every phase of an operation.

    Connecting starts in the background: the caller renders the spec meanwhile, and
    observe_all observes each host as soon as its own connection is up (no barrier after
    connecting: the remote key exchanges share the hosts' CPUs with the observe commands).
    """

    def __init__(self, spec: ClusterSpec, names: list[str], connector: Callable[..., Connection] = connect) -> None:
        self.spec = spec
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(64, len(names))))

        def one(name: str) -> Connection | str:
            try:
                return connector(target_for(spec, name))
            except DisaggError as e:
                return str(e) or f"{name}: unreachable"

        self._pending: dict[str, Future[Connection | str]] = {n: self._pool.submit(one, n) for n in names}
        self._conns: dict[str, Connection] | None = None
        self._errors: dict[str, str] = {}

    def connection(self, name: str) -> Connection | str:
        """One host's connection (waiting for it), or why there is none."""
        return self._pending[name].result()

    def _settle(self) -> dict[str, Connection]:
        if self._conns is None:
            conns: dict[str, Connection] = {}
            for name in self._pending:
                r = self.connection(name)
                if isinstance(r, str):
                    self._errors[name] = r
                else:
                    conns[name] = r
            self._conns = conns
        return self._conns

    @property
    def conns(self) -> dict[str, Connection]:
        return self._settle()

    @property
    def errors(self) -> dict[str, str]:
        self._settle()
        return self._errors

    def map(self, names: list[str], fn: Callable[[Connection], T]) -> dict[str, T | BaseException]:
        conns = self.conns

        def one(name: str) -> tuple[str, T | BaseException]:
            try:
                return name, fn(conns[name])
            except Exception as e:  # one host's failure is reported, the others go on
                return name, e

        return dict(self._pool.map(one, names))

    def each(self, names: list[str], fn: Callable[[str], T]) -> list[T]:
        """fn(name) for every name on the pool's threads, in order."""
        return list(self._pool.map(fn, names))

    def close(self) -> None:
        def close_one(f: Future[Connection | str]) -> None:
            r = f.result()
            if not isinstance(r, str):
                r.close()

        for f in self._pending.values():
            f.add_done_callback(close_one)  # runs now when connected, else when the connect ends
        self._pool.shutdown(wait=False)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def observe(conn: Connection, ctx: Context) -> Observed:
    paths = [f.path for f in ctx.rendered.for_host(conn.name)]
    r = conn.run(["sh", "-c", OBSERVE_SCRIPT, "observe", ctx.state_dir, *paths], sudo=True, timeout=120)
    if r.rc != 0:
        raise SshError(conn.name, f"observe failed (exit {r.rc}): {r.err.strip()[:300]}")
    return parse_observe(conn.name, r.out)


def observe_all(hosts: Hosts, ctx: Context) -> dict[str, Observed]:
    """Observe every declared host, each as soon as its connection is up."""

    def one(name: str) -> Observed:
        conn = hosts.connection(name)
        if isinstance(conn, str):
            return Observed(name, error=conn)
        try:
            return observe(conn, ctx)
        except Exception as e:  # one host's failure is reported, the others go on
            return Observed(name, error=str(e))

    return dict(zip(ctx.hosts, hosts.each(ctx.hosts, one), strict=True))


def compute_plan(ctx: Context, observed: Mapping[str, Observed], meta: Mapping[str, object]) -> Plan:
    return make_plan(ctx.desired, ctx.rendered, observed, ctx.unit_of, ctx.target_unit, ctx.digest, meta)


def plan_diffs(hosts: Hosts, ctx: Context, plan: Plan) -> dict[tuple[str, str], str]:
    """Unified diffs of updated (non-secret) files: the old content is fetched only for those."""
    wanted = {(f.host, f.path): f.content for f in ctx.rendered.files}
    out: dict[tuple[str, str], str] = {}
    for h in plan.hosts:
        conn = hosts.conns.get(h.host)
        for f in h.files:
            if f.secret or f.action not in (Action.UPDATE, Action.CREATE, Action.DELETE) or conn is None:
                continue
            old = conn.get(f.path) if f.action is not Action.CREATE else None
            out[(h.host, f.path)] = _udiff(
                f.path, old.decode(errors="replace") if old else None, wanted.get((h.host, f.path))
            )
    return out


# --------------------------------------------------------------------------- apply steps


def journal_tail(conn: Connection, unit: str, lines: int = 50) -> str:
    try:
        r = conn.run(["journalctl", "-u", unit, "-n", str(lines), "--no-pager"], sudo=True, timeout=30)
        return r.out
    except DisaggError as e:
        return f"(journal unavailable: {e})"


def _owned_processes(ctx: Context, host: str) -> dict[str, OwnedProcess]:
    return {
        p.name: OwnedProcess(
            unit=ctx.unit_of[p.name],
            role=p.role.value,
            instance=p.instance,
            http_port=p.http_port,
            gpus=list(p.gpus),
            start_order=p.start_order,
            argv=list(p.argv),
        )
        for p in ctx.desired.on_host(host)
    }


def manifest_files(ctx: Context, host: str, old: Observed | None, pending: bool) -> list[tuple[str, bytes, int]]:
    """The `owned` list and the manifest (owned first: a superset of the manifest if cut between)."""
    extra: dict[str, OwnedFile] | None = None
    if pending:
        extra = dict(old.manifest.files) if old and old.manifest else {}
    has_units = bool(ctx.rendered.units.get(host))
    m = build_manifest(
        ctx.rendered,
        host,
        ctx.desired.name,
        ctx.target_unit if has_units else None,
        _owned_processes(ctx, host),
        ctx.digest,
        extra,
    )
    return [
        (owned_list_path(ctx.target.state_dir, ctx.desired.name), owned_list(list(m.files)), 0o644),
        (manifest_path(ctx.target.state_dir, ctx.desired.name), m.to_bytes(), 0o644),
    ]


def write_manifest(conn: Connection, ctx: Context, old: Observed | None, pending: bool) -> None:
    files = manifest_files(ctx, conn.name, old, pending)
    if not pending and files[0][1] == manifest_files(ctx, conn.name, old, True)[0][1]:
        files = files[1:]  # the owned list the pending write left is already the final one
    push(conn, files)


def push_files(conn: Connection, ctx: Context, hp: HostPlan, obs: Observed, start: Sequence[str] = ()) -> None:
    """Stop dropped units, pending manifest, atomic uploads, removals, reload, enable, then start
    the units of the first start phase: one command."""
    contents = {f.path: f for f in ctx.rendered.for_host(conn.name)}
    dropped_units = [u.unit for u in hp.units_with(Action.DELETE)]
    uploads = [contents[f.path] for f in hp.files_with(Action.CREATE, Action.UPDATE)]
    removed = [f.path for f in hp.files_with(Action.DELETE)]
    unit_changed = bool(dropped_units) or any(
        p.startswith("/etc/systemd/system/") for p in [*(f.path for f in uploads), *removed]
    )
    push(
        conn,
        [*manifest_files(ctx, conn.name, obs, pending=True), *((f.path, f.content.encode(), f.mode) for f in uploads)],
        mkdirs=[ctx.desired.config_dir, ctx.state_dir],
        stop=dropped_units,
        remove=removed,
        enable=[u.unit for u in hp.units_with(Action.CREATE)],
        reload=unit_changed or bool(hp.units_with(Action.CREATE)),
        start=start,
    )


def start_units(conn: Connection, units: list[str]) -> None:
    """Restart (or start) units in order; on failure raise with the unit's journal tail."""
    for unit in units:
        r = conn.run(["systemctl", "restart", unit], sudo=True, timeout=600)
        if r.rc != 0:
            raise ApplyError(conn.name, unit, f"failed to start: {r.err.strip()}", journal_tail(conn, unit))


def unit_alive(conn: Connection, unit: str) -> bool:
    r = conn.run(["systemctl", "show", "--property=ActiveState,SubState", "--", unit], sudo=True, timeout=30)
    props = dict(line.partition("=")[::2] for line in r.out.splitlines())
    return props.get("ActiveState") in ("active", "activating", "reloading") and props.get("SubState") != "auto-restart"


# --------------------------------------------------------------------------- the backend


class SystemdBackend:
    """Backend protocol implementation (disaggctl.targets.Backend)."""

    connector: Callable[..., Connection] = staticmethod(connect)  # tests may swap the connection factory

    # ----- helpers

    def _ctx(self, ctx: OpsContext, need_secrets: bool = True) -> Context:
        """need_secrets False (logs, destroy): render without the operator's secret values."""
        spec = ctx.spec
        return build_context(spec, ctx.desired, operator_secrets(spec) if need_secrets else None)

    def _hosts(self, ctx: OpsContext) -> Hosts:
        """Start connecting to every declared host (a dropped host may still hold owned files)."""
        systemd_target(ctx.spec)  # a wrong target kind fails before any connection
        return Hosts(ctx.spec, [h.name for h in ctx.spec.hosts], self.connector)

    def _meta(self, ctx: OpsContext) -> dict[str, object]:
        opts = ctx.options
        profiles = opts.get("profiles")
        topo = opts.get("topology_file")
        return {
            "spec_file": os.path.abspath(ctx.loaded.file),
            "profiles": list(profiles) if isinstance(profiles, list) else [],
            "topology_file": str(topo) if topo else None,
        }

    # ----- plan

    def plan(self, ctx: OpsContext, out_file: str | None, detailed_exitcode: bool) -> int:
        from disaggctl.targets.systemd.ui import print_plan

        with self._hosts(ctx) as hosts:
            c = self._ctx(ctx)  # rendered while the connections come up
            observed = observe_all(hosts, c)
            plan = compute_plan(c, observed, self._meta(ctx))
            diffs = plan_diffs(hosts, c, plan) if ctx.diff else None
        if ctx.output == "json":
            sys.stdout.write(plan.to_json())
        else:
            print_plan(ctx.console, plan, diffs)
        if out_file:
            with open(out_file, "w") as f:
                f.write(plan.to_json())
            if ctx.output != "json":  # keep stdout pure JSON
                ctx.console.print(f"Saved the plan to {out_file}; apply it with `disaggctl apply {out_file}`.")
        if any(h.error for h in plan.hosts):
            return 1
        return 2 if detailed_exitcode and plan.changed else 0

    # ----- apply

    def apply(self, ctx: OpsContext, plan_file: str | None) -> int:
        from disaggctl.targets.systemd.ui import Phases, print_plan

        console = ctx.console
        with self._hosts(ctx) as hosts:
            c = self._ctx(ctx)  # rendered while the connections come up
            observed = observe_all(hosts, c)
            plan = compute_plan(c, observed, self._meta(ctx))
            # a declared host this deployment does not use may be down: go on without it (what an
            # earlier apply left there is cleaned up once it is back); a host that runs something may not
            for h in plan.hosts:
                if h.error and not c.rendered.for_host(h.host):
                    console.print(f"[yellow]{h.error} (not used by this spec; skipped)[/yellow]")
            plan.hosts = [h for h in plan.hosts if not (h.error and not c.rendered.for_host(h.host))]
            bad = [h for h in plan.hosts if h.error]
            if bad:
                for h in bad:
                    console.print(f"[red]{h.host}: {h.error}[/red]")
                console.print("[red]Nothing was changed.[/red] Fix the hosts above and run apply again.")
                return 1
            if plan_file:
                with open(plan_file) as f:
                    saved = load_plan(f.read(), plan_file)
                stale = stale_reasons(saved, plan)
                if stale:
                    console.print(f"[red]The saved plan {plan_file} is stale; nothing was changed:[/red]")
                    for s in stale:
                        console.print(f"  {s}")
                    console.print("Run `disaggctl plan -o FILE` again.")
                    return 1
            print_plan(console, plan)
            if not plan.changed:
                return 0
            if not ctx.yes and not plan_file and not _confirm(console):
                console.print("Apply cancelled; nothing was changed.")
                return 1
            try:
                with Phases(console) as phases:
                    self._execute(c, hosts, plan, observed, phases)
                    self._health(ctx, c, hosts, plan, phases)
            except ApplyError as e:
                console.print(f"[red bold]apply failed:[/red bold] {e}")
                if e.journal:
                    console.print(f"[dim]journalctl -u {e.unit} -n 50 on {e.host}:[/dim]")
                    console.print(e.journal, markup=False, highlight=False)
                console.print("Fix the cause and run apply again: it continues from what is on the hosts.")
                return 1
        console.print("[green]Apply complete.[/green]")
        return 0

    def _execute(self, c: Context, hosts: Hosts, plan: Plan, observed: Mapping[str, Observed], phases: Phases) -> None:
        changed = [h for h in plan.hosts if h.changed]
        # decode everywhere, then prefill, then the router: systemd orders units of one host only
        orders = sorted(
            {u.start_order for h in changed for u in h.units_with(Action.CREATE, Action.RESTART) if u.start_order < 99}
        )
        phases_todo = [
            (
                order,
                {
                    h.host: units
                    for h in changed
                    if (
                        units := [u.unit for u in h.units_with(Action.CREATE, Action.RESTART) if u.start_order == order]
                    )
                },
            )
            for order in orders
        ]
        # the first phase starts in the files command of each host, right after its reload: one
        # round trip less per host, and no host waits for the slowest one's files before starting
        first: Mapping[str, list[str]] = phases_todo[0][1] if phases_todo else {}
        first_role = _ROLE_NAME.get(orders[0], f"order {orders[0]}") if orders else ""

        def files(conn: Connection) -> None:
            units = first.get(conn.name, [])
            with phases.step(conn.name, f"files, start {first_role}" if units else "files"):
                push_files(conn, c, plan.host(conn.name), observed[conn.name], start=units)

        _raise_first(hosts.map([h.host for h in changed], files), "files")

        for i, (order, todo) in enumerate(phases_todo):
            role = _ROLE_NAME.get(order, f"order {order}")

            def start(conn: Connection, units: Mapping[str, list[str]] = todo, role: str = role) -> None:
                with phases.step(conn.name, f"start {role}"):
                    start_units(conn, units[conn.name])

            if i > 0:
                _raise_first(hosts.map(list(todo), start), f"start {role}")
            procs = [
                p
                for p in c.desired.processes
                if p.start_order == order and c.unit_of[p.name] in {u for us in todo.values() for u in us}
            ]
            self._wait(c, hosts, procs, phases, role)

        def final(conn: Connection) -> None:
            with phases.step(conn.name, "manifest"):
                write_manifest(conn, c, observed[conn.name], pending=False)
                if not c.rendered.for_host(conn.name):  # nothing left here: drop the state folder
                    conn.run(["rm", "-rf", "--", c.state_dir], sudo=True)

        _raise_first(hosts.map([h.host for h in changed], final), "manifest")

    def _wait(self, c: Context, hosts: Hosts, procs: list[Process], phases: Phases, role: str) -> None:
        from disaggctl.health import HealthError, wait_healthy

        targets = {p.name: p.health_url for p in procs if p.health_url}
        if not targets:
            return
        by_name = {p.name: p for p in procs}
        h = c.spec.health

        # the first check after a second: a unit just started is alive, and 32 sequential SSH
        # round trips before the first probe would only delay the wait
        checked: dict[str, float] = dict.fromkeys(by_name, time.monotonic())

        def alive(name: str) -> bool:
            # one SSH round trip per check: at most once a second per unit, not once per probe
            now = time.monotonic()
            if now - checked.get(name, -1e9) < max(1.0, h.interval_s):
                return True
            checked[name] = now
            p = by_name[name]
            return unit_alive(hosts.conns[p.host], c.unit_of[name])

        with phases.step("all", f"health {role} ({len(targets)})"):
            try:
                wait_healthy({k: v for k, v in targets.items() if v}, h.startup_timeout_s, h.interval_s, alive=alive)
            except HealthError as e:
                p = by_name.get(e.name)
                if p is None:
                    raise ApplyError("?", None, str(e)) from None
                conn = hosts.conns[p.host]
                unit = c.unit_of[p.name]
                raise ApplyError(p.host, unit, f"not healthy: {e.detail}", journal_tail(conn, unit)) from None

    def _health(self, ctx: OpsContext, c: Context, hosts: Hosts, plan: Plan, phases: Phases) -> None:
        """The end-to-end canary through the router, after any restart."""
        from disaggctl.health import HealthError, run_canary

        if not any(h.units_with(Action.CREATE, Action.RESTART) for h in plan.hosts):
            return
        if not any(p.role.value == "router" for p in c.desired.processes):
            return  # nothing to send a request through (partial deployments, the fan-out bench)
        h = c.spec.health
        decode_metrics = [
            p.health_url.rsplit("/", 1)[0] + "/metrics"
            for p in c.desired.processes
            if p.role.value == "decode" and p.health_url
        ]
        if c.spec.router.kind == "builtin":
            with phases.step("router", "all instances back in the router"):
                router_sees_all(c.desired.router_url, min(h.startup_timeout_s, 120.0), h.interval_s)
        with phases.step("router", "canary"):
            try:
                res = run_canary(
                    c.desired.router_url,
                    c.desired.model_name,
                    h.canary.prompt,
                    h.canary.max_tokens,
                    decode_metrics,
                    h.request_timeout_s,
                    h.canary.require_kv_transfer,
                )
            except HealthError as e:
                router = next(p for p in c.desired.processes if p.role.value == "router")
                unit = c.unit_of[router.name]
                tail = journal_tail(hosts.conns[router.host], unit) if router.host in hosts.conns else ""
                raise ApplyError(router.host, unit, f"canary failed: {e}", tail) from None
        phases.note(
            f"canary: {res.completion_tokens} tokens in {res.latency_s:.2f}s, "
            f"{res.kv_tokens:g} prompt tokens received by decode from prefill"
        )

    # ----- status

    def status(self, ctx: OpsContext) -> int:
        from disaggctl.health import http_probe
        from disaggctl.targets.systemd.ui import StatusRow, print_status

        with self._hosts(ctx) as hosts:
            c = self._ctx(ctx)  # rendered while the connections come up
            observed = observe_all(hosts, c)
        plan = compute_plan(c, observed, {})
        rows: list[StatusRow] = []
        notes: list[str] = []
        problems = False
        for p in c.desired.processes:
            obs = observed[p.host]
            unit = c.unit_of[p.name]
            if obs.error:
                rows.append(StatusRow(p.name, p.host, unit, "unreachable", "?", _gpus(p), _port(p), [obs.error]))
                problems = True
                continue
            uf = obs.units.get(unit)
            state = f"{uf.active_state}/{uf.sub_state}" if uf and uf.load_state != "not-found" else "not installed"
            health = "-"
            if p.health_url:
                ok, detail = http_probe(p.health_url, 3.0)
                health = "ok" if ok else detail
            drift = _drift(c, obs, p, unit)
            problems |= bool(drift) or health not in ("ok", "-") or not (uf and uf.running)
            rows.append(StatusRow(p.name, p.host, unit, state, health, _gpus(p), _port(p), drift))
        if plan.changed:
            notes.append("The hosts differ from the spec: run `disaggctl plan` to see the changes.")
        if ctx.output == "json":
            import json

            sys.stdout.write(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
        else:
            print_status(ctx.console, c.desired.name, rows, notes)
        return 1 if problems or plan.changed else 0

    # ----- destroy

    def destroy(self, ctx: OpsContext) -> int:
        c = self._ctx(ctx, need_secrets=False)  # removal goes by the manifest
        console = ctx.console
        with Hosts(c.spec, c.hosts, self.connector) as hosts:
            observed = observe_all(hosts, c)
            owned = {h: o for h, o in observed.items() if o.manifest is not None}
            for h, o in observed.items():
                if o.error:
                    console.print(f"[red]{h}: {o.error}[/red] (skipped: nothing removed there)")
            if not owned:
                console.print(f"Nothing to destroy: no host holds a manifest of {c.desired.name}.")
                return 1 if any(o.error for o in observed.values()) else 0
            for h, o in owned.items():
                assert o.manifest is not None
                console.print(f"[bold]{h}[/bold]")
                for u in [*(o.manifest.units), *([o.manifest.target_unit] if o.manifest.target_unit else [])]:
                    console.print(f"  [red]- stop+remove[/red] {u}")
                for path in o.manifest.owned_paths():
                    console.print(f"  [red]- delete[/red]      {path}")
            if not ctx.yes and not _confirm(console, "Destroy these?"):
                console.print("Destroy cancelled; nothing was changed.")
                return 1

            def remove(conn: Connection) -> None:
                m = owned[conn.name].manifest
                assert m is not None
                units = [*m.units, *([m.target_unit] if m.target_unit else [])]
                push(conn, [], stop=units, remove=m.owned_paths(), reload=True)
                conn.run(["rm", "-rf", "--", c.state_dir], sudo=True)
                conn.run(["rmdir", "--ignore-fail-on-non-empty", "--", c.desired.config_dir], sudo=True)

            results = hosts.map(list(owned), remove)
        failed = {h: r for h, r in results.items() if isinstance(r, BaseException)}
        for h, r in failed.items():
            console.print(f"[red]{h}: destroy failed: {r}[/red]")
        if not failed:
            console.print(f"[green]Destroyed {c.desired.name} on {len(owned)} host(s).[/green]")
        return 1 if failed or any(o.error for o in observed.values()) else 0

    # ----- logs

    def logs(self, ctx: OpsContext, role: str | None, instance: int | None, follow: bool, lines: int) -> int:
        c = self._ctx(ctx, need_secrets=False)
        procs = [
            p
            for p in c.desired.processes
            if (role is None or p.role.value == role)
            and (instance is None or p.instance == f"{p.role.value}-{instance}")
        ]
        if not procs:
            raise DisaggError(f"no process matches --role {role} --instance {instance}")
        by_host: dict[str, list[str]] = {}
        for p in procs:
            by_host.setdefault(p.host, []).append(c.unit_of[p.name])
        out = sys.stdout
        lock = threading.Lock()

        def tail(conn: Connection) -> int:
            argv = ["journalctl", "--no-pager", "-o", "short-iso", "-n", str(lines)]
            for u in by_host[conn.name]:
                argv += ["-u", u]
            if follow:
                argv.append("-f")

            def emit(line: str) -> None:
                with lock:
                    out.write(f"{conn.name}: {line}\n")
                    out.flush()

            return conn.stream(argv, emit, sudo=True)

        with Hosts(c.spec, list(by_host), self.connector) as hosts:
            for h, e in hosts.errors.items():
                ctx.console.print(f"[red]{h}: {e}[/red]")
            results = hosts.map(list(hosts.conns), tail)
        bad = [r for r in results.values() if isinstance(r, BaseException) or r != 0]
        return 1 if bad or hosts.errors else 0


_ROLE_NAME = {0: "decode", 1: "prefill", 2: "router"}


def router_sees_all(router_url: str, timeout_s: float, interval_s: float) -> bool:
    """Wait until the builtin router's /health marks every upstream healthy.

    The router health-checks its upstreams on its own interval: right after a restart it may
    still route around an instance (a canary then prefills locally and shows no KV transfer).
    Returns False at the timeout and lets the canary report what it sees.
    """
    import json
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(router_url.rstrip("/") + "/health", timeout=5) as r:
                body = json.loads(r.read())
            pools = [*body.get("prefill", []), *body.get("decode", [])]
            if pools and all(i.get("healthy") for i in pools):
                return True
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def _raise_first(results: Mapping[str, object], phase: str) -> None:
    for host, r in results.items():
        if isinstance(r, ApplyError):
            raise r
        if isinstance(r, BaseException):
            raise ApplyError(host, None, f"{phase}: {r}") from r


def _confirm(console: object, question: str = "Apply these changes?") -> bool:
    if not sys.stdin.isatty():
        raise DisaggError("refusing to change hosts without confirmation: stdin is not a terminal; pass -y")
    from rich.prompt import Confirm

    return bool(Confirm.ask(question, default=False))


def _gpus(p: Process) -> str:
    return ",".join(str(g) for g in p.gpus) or "-"


def _port(p: Process) -> str:
    return str(p.http_port) if p.http_port else "-"


def _drift(c: Context, obs: Observed, p: Process, unit: str) -> list[str]:
    """Differences from what disaggctl wrote (hand edits) and from what should run."""
    out: list[str] = []
    m = obs.manifest
    paths = [f"/etc/systemd/system/{unit}", *(f"{c.desired.config_dir}/{n}" for n in p.files)]
    for path in paths:
        fact = obs.files.get(path)
        recorded = m.files.get(path) if m else None
        if fact is None or fact.sha256 is None:
            out.append(f"{path} missing")
        elif recorded is not None and recorded.sha256 != fact.sha256:
            out.append(f"{path} edited by hand")
    uf = obs.units.get(unit)
    if uf is not None and uf.load_state != "not-found":
        if not uf.running:
            out.append(f"unit {uf.active_state}")
        elif uf.need_reload:
            out.append("unit file changed since start")
        elif uf.cmdline is not None and not same_command(uf.cmdline, p.argv):
            out.append("command line differs")
    return out


def backend() -> SystemdBackend:
    return SystemdBackend()
