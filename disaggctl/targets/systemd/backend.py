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

import contextlib
import hashlib
import io
import posixpath
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from disaggctl.deployment import DesiredState, Process, Rendered
from disaggctl.errors import DisaggError
from disaggctl.hostlock import LockHeld
from disaggctl.render.systemd import render_systemd, systemd_target, target_name, unit_name
from disaggctl.spec import SystemdTarget
from disaggctl.ssh import Connection, SshError, SshTarget, connect, target_for
from disaggctl.targets.base import (
    Action,
    SavedPlan,
    check_saved_plan,
    confirm,
    finish_plan,
    plan_meta,
    select_processes,
)
from disaggctl.targets.systemd.access import (
    SshHttp,
    deployment_lock,
    final_registry,
    lock_after_observation,
    lock_command,
    lock_peek,
    locked_observation,
    observe_everything,
    set_registry,
    stale_registry,
    sudo_checked,
    unlocked_since,
)
from disaggctl.targets.systemd.changes import (
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
from disaggctl.targets.systemd.manifest import (
    HostAddress,
    OwnedFile,
    OwnedProcess,
    build_manifest,
    manifest_path,
    owned_list,
    owned_list_path,
    spec_hash,
    state_path,
)
from disaggctl.unitstate import UNIT_STATE_SCRIPT

if TYPE_CHECKING:
    from rich.console import Console

    from disaggctl.spec import ClusterSpec
    from disaggctl.targets import OpsContext
    from disaggctl.targets.gate import HealthGate
    from disaggctl.targets.rolling import Step
    from disaggctl.targets.rollout import Rotation
    from disaggctl.targets.status import StatusReport
    from disaggctl.targets.systemd.rolling import SystemdRoll
    from disaggctl.targets.ui import Phases

T = TypeVar("T")

# Reads everything a plan needs in one round trip, with few processes (it runs on every host on
# every plan): $1 "fast" or "full", $2 the deployment's state folder, then the paths the spec
# wants; the paths the manifest owns are added from $2/owned. Sections are parsed by
# changes.parse_observe.
#
# Unit states: "full" (status) asks `systemctl show` for every unit. "fast" (plan, apply,
# destroy) asks systemd only where the cheap answer could differ from its answer:
# - a .target unit, or a service whose unit file is absent: not asked (a plan does not read
#   their state: the file is created, the target only groups the deployment);
# - a service whose main process runs and whose unit file systemd provably loaded (`_fresh`:
#   the file is older than the deployment's last daemon-reload, stamped in $2/reloaded by
#   PUSH_SCRIPT, and no unit file or drop-in elsewhere on systemd's unit path can apply to it):
#   read from its cgroup (unitstate.UNIT_STATE_SCRIPT; no systemctl, no D-Bus) - active/running,
#   MainPID, its command line, NeedDaemonReload=no;
# - every other service (not running, failed, waiting to restart, reload pending or unknown):
#   `systemctl show`, as in "full".
OBSERVE_SCRIPT = (
    "_us() {\n"
    + UNIT_STATE_SCRIPT
    + "}\n"
    + r"""
# shellcheck disable=SC3013 # -ot: dash, bash and busybox sh all have it
_fresh() {
  [ -f "$d/reloaded" ] && [ "/etc/systemd/system/$1" -ot "$d/reloaded" ] || return 1
  for x in $SHADOW; do [ -e "$x/$1" ] && return 1; done
  for n in $DROPINS; do
    case $n in
      "$1.d"|service.d) return 1 ;;
      *-.service.d) case $1 in "${n%.service.d}"*) return 1 ;; esac ;;
    esac
  done
  return 0
}
mode=$1; d=$2; want=$3; shift 3
m=$d/manifest.json
[ -f "$m" ] || m=""
# the owned paths the caller did not name (on a converged host it named them all): each file is
# hashed and stat'ed once
nl='
'
seen=$nl
for p in "$@"; do seen=$seen$p$nl; done
if [ -f "$d/owned" ]; then
  while IFS= read -r l; do
    case $seen in *"$nl$l$nl"*) ;; *) set -- "$@" "$l"; seen=$seen$l$nl ;; esac
  done < "$d/owned"
fi
printf '@@paths\n'
units=""
for p in "$@"; do
  printf '%s\n' "$p"
  case $p in
    /etc/systemd/system/*/*) ;;
    /etc/systemd/system/*.service|/etc/systemd/system/*.target)
      case " $units " in *" ${p##*/} "*) ;; *) units="$units ${p##*/}";; esac;;
  esac
done
# one sha256sum for the manifest (its line first) and every path
sums=""
if [ -n "$m" ] || [ $# -gt 0 ]; then sums=$(sha256sum -- ${m:+"$m"} "$@" 2>/dev/null); fi
printf '@@sha\n%s\n' "$sums"
# the manifest's text only when it is not the one the caller expects (its sha256 in $want): a
# converged host sends ~10 KB less and runs no cat. cat, not a `read` loop: dash reads a byte
# per system call (8 ms of the host's CPU for 10 KB, against ~0.5 ms for one cat)
case $sums in
  "$want  $m"|"$want  $m
"*) printf '@@manifest-as-expected\n' ;;
  *) printf '@@manifest\n'; [ -z "$m" ] || cat -- "$m"; echo ;;
esac
printf '@@mode\n'; [ $# -gt 0 ] && stat -c '%a %n' -- "$@" 2>/dev/null
slow=$units
if [ -n "$units" ] && [ "$mode" = fast ]; then
  SHADOW="/etc/systemd/system.control /run/systemd/system.control /run/systemd/transient
    /run/systemd/generator.early /run/systemd/system /run/systemd/generator /usr/local/lib/systemd/system
    /usr/lib/systemd/system /lib/systemd/system /run/systemd/generator.late"
  DROPINS=""
  for x in /etc/systemd/system $SHADOW; do
    for dd in "$x"/*.d; do [ -d "$dd" ] && DROPINS="$DROPINS ${dd##*/}"; done
  done
  set -f
  slow=""; cheap=""
  for u in $units; do
    case $u in *.service) ;; *) continue ;; esac
    [ -f "/etc/systemd/system/$u" ] || continue
    if _fresh "$u"; then cheap="$cheap $u"; else slow="$slow $u"; fi
  done
  if [ -n "$cheap" ]; then
    printf '@@state\n'
    US_IDLE=""
    # shellcheck disable=SC2086 # unit names carry no spaces
    _us $cheap
    # no main process: systemctl tells failed, restarting and stopped apart
    [ -z "$US_IDLE" ] || slow="$slow$US_IDLE"
  fi
  set +f
fi
if [ -n "$slow" ] && command -v systemctl >/dev/null 2>&1; then
  printf '@@show\n'
  # shellcheck disable=SC2086 # unit names carry no spaces (prefix, deployment and process names are checked)
  show=$(systemctl show --property=Id,LoadState,ActiveState,SubState,MainPID,NRestarts,UnitFileState,NeedDaemonReload \
    -- $slow)
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
)

# The whole "files" step of one host in one round trip. Arguments: folders to create, units to
# stop and disable, destination paths (their contents arrive as a tar on stdin, members named
# after each destination's temporary sibling `.NAME.dctl-tmp`, with their modes), paths to
# remove, units to enable; lists end with "--"; then "reload", "reload:STAMP" or "-"; then the units to (re)start,
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
# reload:STAMP - the observe script's proof that systemd loaded every unit file older than STAMP
case $1 in reload*) systemctl daemon-reload; [ "${1#reload:}" = "$1" ] || : > "${1#reload:}" ;; esac
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
    stamp: str | None = None,
) -> None:
    """One command: mkdir, stop+disable, atomic writes (with modes), removals, enable, daemon-reload,
    then (re)start `start` in order; a unit that fails to start raises ApplyError with its journal.
    `stamp`: a file touched right after the reload (the observe script's proof of what is loaded)."""
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
    token = (f"reload:{stamp}" if stamp else "reload") if reload else "-"
    argv += [*remove, "--", *enable, "--", token, *start]
    r = conn.run(argv, input=buf.getvalue() if files else None, sudo=True, timeout=300 + 600 * len(start))
    if r.rc == 75 and "\n@@failed " in r.err:
        err, _, unit = r.err.rpartition("\n@@failed ")
        unit = unit.strip()
        raise ApplyError(conn.name, unit, f"failed to start: {err.strip()}", journal_tail(conn, unit))
    if r.rc != 0:
        if files:  # a failed step leaves no temporary file behind (each is renamed or removed)
            tmps = ["/" + _tmp_member(f[0]) for f in files]
            with contextlib.suppress(DisaggError):
                conn.run(["rm", "-f", "--", *tmps], sudo=True, timeout=60)
        raise SshError(conn.name, f"push exited {r.rc}: {r.err.strip() or r.out.strip()}")


class ApplyError(DisaggError):
    """A step failed on a host: names the host and unit, carries the journal tail."""

    def __init__(self, host: str, unit: str | None, message: str, journal: str = "") -> None:
        self.host, self.unit, self.journal, self.message = host, unit, journal, message
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
    removed: dict[str, HostAddress] = field(default_factory=dict)  # remembered hosts the spec dropped
    registry: dict[str, HostAddress] = field(default_factory=dict)  # what the final manifests remember
    registry_pending: dict[str, HostAddress] = field(default_factory=dict)  # ... the pending ones
    final_registry: dict[str, HostAddress] | None = None  # access.final_registry

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
    """The operator's values (environment, then target.secrets_file); a missing one is an error."""
    from disaggctl.secrets import operator_values

    return operator_values(spec)


# --------------------------------------------------------------------------- connections


class Hosts:
    """One open SSH connection per host, used by every phase of an operation.

    Connecting starts in the background: the caller renders the spec meanwhile, and
    observe_all observes each host as soon as its own connection is up (no barrier after
    connecting: the remote key exchanges share the hosts' CPUs with the observe commands).
    """

    def __init__(self, spec: ClusterSpec, names: list[str], connector: Callable[..., Connection] = connect) -> None:
        self.spec = spec
        self._connector = connector
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(64, len(names))))
        self._pending: dict[str, Future[Connection | str]] = {}
        self.add({n: None for n in names})
        self._conns: dict[str, Connection] | None = None
        self._errors: dict[str, str] = {}

    def add(self, targets: Mapping[str, SshTarget | None]) -> None:
        """Start connecting to more hosts (None: the declared host of that name), before any map."""

        def one(name: str, target: SshTarget | None) -> Connection | str:
            try:
                return self._connector(target or target_for(self.spec, name))
            except DisaggError as e:
                return str(e) or f"{name}: unreachable"

        jobs: list[tuple[Future[Connection | str], str, SshTarget | None]] = []
        for n, t in targets.items():
            if n in self._pending:  # observed again (under the lock): the connection stands
                continue
            fut: Future[Connection | str] = Future()
            self._pending[n] = fut
            jobs.append((fut, n, t))

        def run(fut: Future[Connection | str], name: str, target: SshTarget | None) -> None:
            try:
                fut.set_result(one(name, target))
            except BaseException as e:  # not a DisaggError: whoever waits for the connection gets it
                fut.set_exception(e)

        def spawn() -> None:
            # Thread.start() waits until the new thread runs, which takes a GIL hand-off from the
            # threads already in their key exchange: started from here, the caller renders
            # meanwhile. Own threads, not the pool's: a pool task waiting for a connection never
            # holds up the connecting
            for fut, name, target in jobs:
                threading.Thread(target=run, args=(fut, name, target), name=f"connect {name}", daemon=True).start()

        threading.Thread(target=spawn, name="connect", daemon=True).start()

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

    def start_each(self, names: list[str], fn: Callable[[str], T]) -> dict[str, Future[T]]:
        """fn(name) for every name on the pool's threads, not waiting for them."""
        return {n: self._pool.submit(fn, n) for n in names}

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


def reload_stamp(ctx: Context) -> str:
    """Touched after each daemon-reload of an apply: systemd loaded every unit file older than it."""
    return f"{ctx.state_dir}/reloaded"


def observe(conn: Connection, ctx: Context, full: bool = False) -> Observed:
    """full: every unit's state from `systemctl show` (status); else from the cgroup where that
    gives systemd's answer (OBSERVE_SCRIPT). The host sends its manifest only when it differs
    from the final manifest this spec writes there (expected_manifest)."""
    paths = [f.path for f in ctx.rendered.for_host(conn.name)]
    mode = "full" if full else "fast"
    expected = expected_manifest(ctx, conn.name)
    want = hashlib.sha256(expected).hexdigest() if expected else "-"
    argv = ["sh", "-c", OBSERVE_SCRIPT, "observe", mode, ctx.state_dir, want, *paths]
    r = conn.run(argv, sudo=True, timeout=120)
    if r.rc != 0:
        raise SshError(conn.name, f"observe failed (exit {r.rc}): {r.err.strip()[:300]}")
    return parse_observe(conn.name, r.out, expected)


def expected_manifest(ctx: Context, host: str) -> bytes | None:
    """The final manifest an apply of this spec leaves on a host that runs something, when no
    other host holds files (access.set_registry's registry then): what a converged host has."""
    if not ctx.rendered.for_host(host):
        return None
    has_units = bool(ctx.rendered.units.get(host))
    m = build_manifest(
        ctx.rendered, host, ctx.desired.name, ctx.target_unit if has_units else None,
        _owned_processes(ctx, host), ctx.digest, None, final_registry(ctx),
    )  # fmt: skip
    return m.to_bytes()


def observe_more(
    hosts: Hosts, ctx: Context, targets: Mapping[str, SshTarget], full: bool = False
) -> dict[str, Observed]:
    """Connect to and observe hosts the spec does not declare (remembered by the manifests)."""
    hosts.add(targets)
    return _observe_names(hosts, ctx, list(targets), full)


def observe_all(hosts: Hosts, ctx: Context, full: bool = False) -> dict[str, Observed]:
    """Observe every declared host, each as soon as its connection is up."""
    return _observe_names(hosts, ctx, ctx.hosts, full)


def observe_started(hosts: Hosts, ctx: Context) -> dict[str, Future[Observed]]:
    """observe_all, not waiting: each declared host's observation, begun as soon as it is connected."""
    return hosts.start_each(ctx.hosts, _observer(hosts, ctx))


def _observer(hosts: Hosts, ctx: Context, full: bool = False) -> Callable[[str], Observed]:
    def one(name: str) -> Observed:
        conn = hosts.connection(name)
        if isinstance(conn, str):
            return Observed(name, error=conn)
        try:
            return observe(conn, ctx, full)
        except Exception as e:  # one host's failure is reported, the others go on
            return Observed(name, error=str(e))

    return one


def _observe_names(hosts: Hosts, ctx: Context, names: list[str], full: bool = False) -> dict[str, Observed]:
    return dict(zip(names, hosts.each(names, _observer(hosts, ctx, full)), strict=True))


def compute_plan(ctx: Context, observed: Mapping[str, Observed]) -> Plan:
    return make_plan(ctx.desired, ctx.rendered, observed, ctx.unit_of, ctx.target_unit, ctx.digest)


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
        ctx.registry_pending if pending else ctx.registry,
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
        stamp=reload_stamp(ctx),
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
    """Backend protocol implementation (disaggctl.targets.Backend): how to reach the hosts (SSH) and
    what a unit is (a systemd service per process); the flow is the shared one of targets.base."""

    connector: Callable[..., Connection] = staticmethod(connect)  # tests may swap the connection factory

    # ----- helpers

    def _ctx(self, ctx: OpsContext, need_secrets: bool = True) -> Context:
        """need_secrets False (logs, destroy): render without the operator's secret values."""
        spec = ctx.spec
        return build_context(spec, ctx.desired, operator_secrets(spec) if need_secrets else None)

    def _hosts(self, ctx: OpsContext) -> Hosts:
        """Start connecting to every declared host (a dropped host may still hold owned files)."""
        systemd_target(ctx.spec)  # a wrong target kind fails before any connection
        return Hosts(ctx.spec, [h.name for h in ctx.spec.hosts], sudo_checked(self.connector))

    @staticmethod
    def _gate(c: Context, hosts: Hosts) -> HealthGate:
        """The shared gate, speaking HTTP through the SSH connections (bastion-only hosts too)."""
        from disaggctl.targets.gate import HealthGate

        via = SshHttp.for_context(c, hosts.conns)
        return HealthGate(c.spec, c.desired, probe=via.probe, fetch=via.fetch, request=via.request)

    # ----- plan

    def plan(self, ctx: OpsContext, out_file: str | None, detailed_exitcode: bool) -> int:
        from disaggctl.targets.systemd.ui import print_plan

        with self._hosts(ctx) as hosts:
            c = self._ctx(ctx)  # rendered while the connections come up
            observed = observe_everything(hosts, c)
            plan = compute_plan(c, observed)
            diffs = plan_diffs(hosts, c, plan) if ctx.diff else None
            roll = _rolling(c, hosts, plan, observed)  # the router's fallback is read through SSH
        failed = any(h.error for h in plan.hosts)

        def show() -> None:
            print_plan(ctx.console, plan, diffs)
            _print_roll(ctx.console, roll)

        return finish_plan(ctx, saved_plan(ctx, c, plan), show, out_file, detailed_exitcode, failed)

    # ----- apply

    def apply(self, ctx: OpsContext, plan_file: str | None) -> int:
        console = ctx.console
        with self._hosts(ctx) as hosts:
            c = self._ctx(ctx)  # rendered while the connections come up
            try:
                with _apply_observation(ctx, c, hosts, plan_file) as obs:
                    return 0 if obs is None else self._apply_locked(ctx, c, hosts, plan_file, obs)
            except LockHeld as e:
                console.print(f"[red bold]apply refused:[/red bold] {e}")
                return 1

    def _apply_locked(
        self, ctx: OpsContext, c: Context, hosts: Hosts, plan_file: str | None, observed: dict[str, Observed]
    ) -> int:
        from disaggctl.targets.systemd.ui import print_plan
        from disaggctl.targets.ui import Phases

        console = ctx.console
        plan = compute_plan(c, observed)
        if not _usable(console, c, plan):
            return 1
        check_saved_plan(
            plan_file, saved_plan(ctx, c, plan), lambda s: stale_reasons(load_plan(s.target, "plan"), plan)
        )
        print_plan(console, plan)
        set_registry(c, observed)
        roll = _rolling(c, hosts, plan, observed)
        _print_roll(console, roll)
        if not plan.changed:
            _refresh_registry(c, hosts, observed, plan)
            return 0
        if not confirm(ctx, "Apply these changes?", plan_file) or not _confirm_roll(ctx, roll):
            console.print("Apply cancelled; nothing was changed.")
            return 1
        roll = _rollable(console, roll)
        try:
            with Phases(console) as phases:
                self._execute(c, hosts, plan, observed, phases, roll)
                self._health(c, hosts, plan, phases)
        except ApplyError as e:
            _report_failure(console, e)
            return 1
        _refresh_registry(c, hosts, observed, plan)
        console.print("[green]Apply complete.[/green]")
        return 0

    def _execute(
        self,
        c: Context,
        hosts: Hosts,
        plan: Plan,
        observed: Mapping[str, Observed],
        phases: Phases,
        roll: tuple[SystemdRoll, Rotation] | None = None,
    ) -> None:
        """Files (and the first start phase, without a rollout) on every changed host, then the
        rolling restart of the running instances (`roll`, through the router as it runs), then each
        start phase, each gated by its processes' health; the final manifest last."""
        changed = [h for h in plan.hosts if h.changed]
        todo = start_phases(changed, skip=roll[0].rolled_units if roll else set())
        # the first phase starts in the files command of each host, right after its reload: one
        # round trip less per host, and no host waits for the slowest one's files before starting.
        # Not with a rollout: it drains through the running router, so nothing (the router
        # included) starts before it ends
        first: Mapping[str, list[str]] = todo[0][1] if todo and not roll else {}
        first_role = _ROLE_NAME.get(todo[0][0], f"order {todo[0][0]}") if todo else ""

        def files(conn: Connection) -> None:
            units = first.get(conn.name, [])
            with phases.step(conn.name, f"files, start {first_role}" if units else "files"):
                push_files(conn, c, plan.host(conn.name), observed[conn.name], start=units)

        _raise_first(hosts.map([h.host for h in changed], files), "files")
        if c.spec.router.kind == "builtin":  # before the router (a later start phase) reads it
            _make_token(hosts, c)
        gate = self._gate(c, hosts)  # a no-op apply never gets here
        if roll:
            self._roll(c, hosts, gate, roll, phases)
        for i, (order, units_of) in enumerate(todo):
            role = _ROLE_NAME.get(order, f"order {order}")

            def start(conn: Connection, units: Mapping[str, list[str]] = units_of, role: str = role) -> None:
                with phases.step(conn.name, f"start {role}"):
                    start_units(conn, units[conn.name])

            if i > 0 or roll:
                _raise_first(hosts.map(list(units_of), start), f"start {role}")
            started = {u for us in units_of.values() for u in us}
            procs = [p for p in c.desired.processes if p.start_order == order and c.unit_of[p.name] in started]
            self._wait(c, hosts, gate, procs, phases, role)

        def final(conn: Connection) -> None:
            with phases.step(conn.name, "manifest"):
                write_manifest(conn, c, observed[conn.name], pending=False)
                if not c.rendered.for_host(conn.name):  # nothing left here: drop the state folder
                    _drop_folders(conn, c)

        _raise_first(hosts.map([h.host for h in changed], final), "manifest")

    def _roll(
        self, c: Context, hosts: Hosts, gate: HealthGate, roll: tuple[SystemdRoll, Rotation], phases: Phases
    ) -> None:
        """The rolling restart (targets/rollout.py): drain, restart the unit, health, pair canary,
        undrain. Whatever stops it (a unit that does not come back, a host lost, the router's admin
        API) is an ApplyError naming the instance's host and unit; the runner has put what it
        drained back in rotation where it could."""
        from disaggctl.targets.rollout import RolloutRunner
        from disaggctl.targets.systemd.rolling import restarter

        sroll, rotation = roll
        restart = restarter(sroll, lambda host, units: start_units(hosts.conns[host], units))
        procs = [p for p in c.desired.processes if p.name in sroll.units]
        runner = RolloutRunner(sroll.plan, gate, rotation, restart, phases.note, alive=_alive_check(c, hosts, procs))
        with phases.step("all", f"rolling {len(sroll.plan.rolled)} instance(s)"):
            try:
                runner.run()
            except ApplyError as e:
                raise ApplyError(e.host, e.unit, e.message + _stopped_at(runner.current), e.journal) from None
            except (DisaggError, OSError) as e:
                raise _roll_failure(hosts, sroll, runner.current, e) from None

    def _wait(
        self, c: Context, hosts: Hosts, gate: HealthGate, procs: list[Process], phases: Phases, role: str
    ) -> None:
        """The shared gate's wait for one start phase; a dead unit fails it at once (one SSH round
        trip per check, at most once a second per unit, not once per probe)."""
        from disaggctl.health import HealthError

        names = [p.name for p in procs if p.health_url]
        if not names:
            return
        by_name = {p.name: p for p in procs}
        alive = _alive_check(c, hosts, procs)
        with phases.step("all", f"health {role} ({len(names)})"):
            try:
                gate.wait(names, alive=alive)
            except SshError as e:  # a host lost while its units were checked
                raise ApplyError(e.host, None, f"health {role}: {str(e).removeprefix(e.host + ': ')}") from None
            except HealthError as e:
                p = by_name.get(e.name)
                if p is None:
                    raise ApplyError("?", None, str(e)) from None
                unit = c.unit_of[p.name]
                raise ApplyError(
                    p.host, unit, f"not healthy: {e.detail}", journal_tail(hosts.conns[p.host], unit)
                ) from None

    def _health(self, c: Context, hosts: Hosts, plan: Plan, phases: Phases) -> None:
        """After any (re)start: the router sees its upstreams, then the canary through it."""
        from disaggctl.health import HealthError
        from disaggctl.targets.gate import canary_summary

        if not any(h.units_with(Action.CREATE, Action.RESTART) for h in plan.hosts):
            return
        router = next((p for p in c.desired.processes if p.role.value == "router"), None)
        if router is None:
            return  # nothing to send a request through (partial deployments, the fan-out bench)
        gate = self._gate(c, hosts)
        if c.spec.router.kind == "builtin":
            with phases.step("router", "all instances back in the router"):
                gate.router_sees_upstreams()
        with phases.step("router", "canary"):
            try:
                res = gate.canary()
            except HealthError as e:
                unit = c.unit_of[router.name]
                tail = journal_tail(hosts.conns[router.host], unit) if router.host in hosts.conns else ""
                raise ApplyError(router.host, unit, f"canary failed: {e}", tail) from None
        phases.note(canary_summary(res))

    # ----- status

    def status(self, ctx: OpsContext) -> int:
        from disaggctl.targets.status import print_status, status_exit

        with self._hosts(ctx) as hosts:
            c = self._ctx(ctx)  # rendered while the connections come up
            observed = observe_everything(hosts, c, full=True)  # restarts, load state: systemctl show
            via = SshHttp.for_context(c, hosts.conns)  # bastion-only hosts: HTTP through SSH
            report = status_report(c, observed, compute_plan(c, observed), via.probe)
            if ctx.options.get("check"):
                from disaggctl.targets.status import with_checks
                from disaggctl.targets.systemd.rolling import systemd_checks

                report = with_checks(report, systemd_checks(c.spec, c.desired, observed, c.unit_of, via.fetch))
        print_status(ctx, report)
        return status_exit(report)

    # ----- destroy

    def destroy(self, ctx: OpsContext) -> int:
        c = self._ctx(ctx, need_secrets=False)  # removal goes by the manifest
        with Hosts(c.spec, c.hosts, sudo_checked(self.connector)) as hosts:
            try:
                with deployment_lock(hosts, c, lock_command("destroy", ctx.loaded.file), _force(ctx), ctx.console):
                    return self._destroy_locked(ctx, c, hosts)
            except LockHeld as e:
                ctx.console.print(f"[red bold]destroy refused:[/red bold] {e}")
                return 1

    def _destroy_locked(self, ctx: OpsContext, c: Context, hosts: Hosts) -> int:
        console = ctx.console
        observed = observe_everything(hosts, c)
        owned = {h: o for h, o in observed.items() if o.manifest is not None}
        for h, o in observed.items():
            if o.error:
                console.print(f"[red]{h}: {o.error}[/red] (skipped: nothing removed there)")
        if not owned:
            console.print(f"Nothing to destroy: no host holds a manifest of {c.desired.name}.")
            return 1 if any(o.error for o in observed.values()) else 0
        _print_destroy(console, owned)
        if not confirm(ctx, "Destroy these?"):
            console.print("Destroy cancelled; nothing was changed.")
            return 1
        results = hosts.map(list(owned), lambda conn: remove_owned(conn, c, owned[conn.name]))
        failed = {h: r for h, r in results.items() if isinstance(r, BaseException)}
        for h, r in failed.items():
            console.print(f"[red]{h}: destroy failed: {r}[/red]")
        if not failed:
            console.print(f"[green]Destroyed {c.desired.name} on {len(owned)} host(s).[/green]")
        return 1 if failed or any(o.error for o in observed.values()) else 0

    # ----- logs

    def logs(self, ctx: OpsContext, role: str | None, instance: int | None, follow: bool, lines: int) -> int:
        c = self._ctx(ctx, need_secrets=False)
        by_host: dict[str, list[str]] = {}
        for p in select_processes(c.desired, role, instance):
            by_host.setdefault(p.host, []).append(c.unit_of[p.name])
        lock = threading.Lock()

        def tail(conn: Connection) -> int:
            argv = ["journalctl", "--no-pager", "-o", "short-iso", "-n", str(lines)]
            for u in by_host[conn.name]:
                argv += ["-u", u]
            if follow:
                argv.append("-f")

            def emit(line: str) -> None:
                with lock:
                    sys.stdout.write(f"{conn.name}: {line}\n")
                    sys.stdout.flush()

            return conn.stream(argv, emit, sudo=True)

        with Hosts(c.spec, list(by_host), sudo_checked(self.connector)) as hosts:
            for h, e in hosts.errors.items():
                ctx.console.print(f"[red]{h}: {e}[/red]")
            results = hosts.map(list(hosts.conns), tail)
        bad = [r for r in results.values() if isinstance(r, BaseException) or r != 0]
        return 1 if bad or hosts.errors else 0


_ROLE_NAME = {0: "decode", 1: "prefill", 2: "router"}


@contextlib.contextmanager
def _apply_observation(
    ctx: OpsContext, c: Context, hosts: Hosts, plan_file: str | None
) -> Iterator[dict[str, Observed] | None]:
    """Observe every host, then: nothing to change and nobody held the lock meanwhile -> None,
    the no-op done, nothing written, no lock taken (_noop); else the observation, under the lock,
    kept when the lock folder was quiet since it began (access.lock_after_observation).
    --force-unlock: the lock is broken and taken first, the hosts observed meanwhile."""
    command = lock_command("apply", ctx.loaded.file)
    if _force(ctx):
        with locked_observation(hosts, c, command, True, ctx.console) as obs:
            yield obs
        return
    began = time.monotonic()
    observed = observe_everything(hosts, c)
    if _noop(ctx, c, hosts, plan_file, observed, began):
        yield None
        return
    with lock_after_observation(hosts, c, command, ctx.console, observed, began) as obs:
        yield obs


def _noop(
    ctx: OpsContext, c: Context, hosts: Hosts, plan_file: str | None, observed: dict[str, Observed], began: float
) -> bool:
    """True (the plan printed) when every host is as the spec wants, every manifest remembers the
    right hosts, and no apply held the lock since the observing began (access.unlocked_since):
    nothing to write, no lock to take. LockHeld when someone holds it."""
    from disaggctl.targets.systemd.ui import print_plan

    seen = lock_peek(hosts, c)  # sent now that every host has answered; the plan is made meanwhile
    plan = compute_plan(c, observed)
    if plan.changed or any(h.error for h in plan.hosts):
        return False
    set_registry(c, observed)
    if stale_registry(c, observed):
        return False
    try:
        if not unlocked_since(c, seen.result(), began):
            return False
    except LockHeld:
        raise
    except DisaggError:  # the lock host did not answer: taking the lock says why
        return False
    if plan_file:  # the plan document is built only to compare with a saved one
        check_saved_plan(
            plan_file, saved_plan(ctx, c, plan), lambda s: stale_reasons(load_plan(s.target, "plan"), plan)
        )
    print_plan(ctx.console, plan)
    return True


def saved_plan(ctx: OpsContext, c: Context, plan: Plan) -> SavedPlan:
    """The shared plan document: per-process actions, the per-host file/unit plan as details."""
    return SavedPlan(
        meta=plan_meta(ctx, "systemd", c.digest),
        changed=plan.changed,
        actions=plan.process_actions(),
        target=plan.model_dump(mode="json"),
    )


def _usable(console: Console, c: Context, plan: Plan) -> bool:
    """Drop unreachable hosts this spec does not use (what an earlier apply left there is cleaned up
    once they are back); False, after saying so, when a host that runs something is unreachable."""
    for h in plan.hosts:
        if h.error and not c.rendered.for_host(h.host):
            console.print(f"[yellow]{h.error} (not used by this spec; skipped)[/yellow]")
    plan.hosts = [h for h in plan.hosts if not (h.error and not c.rendered.for_host(h.host))]
    bad = [h for h in plan.hosts if h.error]
    for h in bad:
        console.print(f"[red]{h.host}: {h.error}[/red]")
    if bad:
        console.print("[red]Nothing was changed.[/red] Fix the hosts above and run apply again.")
    return not bad


def start_phases(
    changed: list[HostPlan], skip: set[str] | frozenset[str] = frozenset()
) -> list[tuple[int, dict[str, list[str]]]]:
    """Decode everywhere, then prefill, then the router: (start order, host -> units to start).
    `skip`: units a rolling restart handles."""
    units = [(h.host, u) for h in changed for u in h.units_with(Action.CREATE, Action.RESTART) if u.unit not in skip]
    orders = sorted({u.start_order for _, u in units if u.start_order < 99})
    out: list[tuple[int, dict[str, list[str]]]] = []
    for order in orders:
        per_host: dict[str, list[str]] = {}
        for host, u in units:
            if u.start_order == order:
                per_host.setdefault(host, []).append(u.unit)
        out.append((order, per_host))
    return out


def _alive_check(c: Context, hosts: Hosts, procs: list[Process]) -> Callable[[str], bool]:
    """alive(name) for the gate: the unit of a process is still running (a dead unit fails the
    wait at once); one SSH round trip per check, at most once per health interval per unit, the
    first a second after the start (a unit just started is alive)."""
    by_name = {p.name: p for p in procs}
    interval = max(1.0, c.spec.health.interval_s)
    checked: dict[str, float] = dict.fromkeys(by_name, time.monotonic())

    def alive(name: str) -> bool:
        now = time.monotonic()
        if name not in by_name or now - checked.get(name, -1e9) < interval:
            return True
        checked[name] = now
        p = by_name[name]
        return unit_alive(hosts.conns[p.host], c.unit_of[name])

    return alive


def _stopped_at(step: Step | None) -> str:
    where = f" at {step.op.value} {', '.join(step.instances)}" if step is not None else ""
    return f" (the rollout stopped{where})"


def _roll_failure(hosts: Hosts, roll: SystemdRoll, step: Step | None, e: DisaggError | OSError) -> ApplyError:
    """What stopped a rollout, located: the instance the gate names (with its journal), else the
    instance of the failed step on the host that was lost, else the step's first instance."""
    from disaggctl.health import HealthError

    at = _stopped_at(step)
    if isinstance(e, HealthError) and e.name in roll.units:
        host, unit = roll.units[e.name]
        return ApplyError(host, unit, f"not healthy: {e.detail}{at}", _journal_or_nothing(hosts, host, unit))
    lost = e.host if isinstance(e, SshError) else None
    names = [n for n in (step.instances if step is not None else ()) if n in roll.units]
    name = next(iter([n for n in names if roll.units[n][0] == lost] or names), None)
    if name is None:
        return ApplyError(lost or "?", None, f"{e}{at}")
    host, unit = roll.units[name]
    return ApplyError(host, unit, str(e).removeprefix(f"{host}: ") + at)


def _journal_or_nothing(hosts: Hosts, host: str, unit: str) -> str:
    """The unit's journal tail, or "" when its host cannot be asked (connection lost)."""
    conn = hosts.conns.get(host)
    if conn is None:
        return ""
    try:
        return journal_tail(conn, unit)
    except (DisaggError, OSError):
        return ""


def _rolling(
    c: Context, hosts: Hosts, plan: Plan, observed: Mapping[str, Observed]
) -> tuple[SystemdRoll, Rotation] | None:
    """The rolling plan of the running instances this change restarts, and how they leave rotation:
    the router's admin API through the router host's SSH connection (SshHttp: a loopback
    admin_bind, the default, is reached from that host), the token read there on the first call."""
    from disaggctl.targets.rollout import NoRotation, rotation_for
    from disaggctl.targets.systemd.rolling import systemd_roll

    roll = systemd_roll(c.spec, c.desired, plan, observed, c.unit_of)
    if roll is None:
        return None
    router = next((p for p in c.desired.processes if p.role.value == "router"), None)
    fact = observed[router.host].units.get(c.unit_of[router.name]) if router and router.host in observed else None
    if fact is None or not fact.running:  # no router serves now: nothing to take out of rotation
        return roll, NoRotation(description="the router is not running: instances restart without a drain")
    via = SshHttp.for_context(c, hosts.conns)
    return roll, rotation_for(c.spec, c.desired, _remote_token(hosts, c), remote_router=True, request=via.request)


def _make_token(hosts: Hosts, c: Context) -> None:
    """The router admin token on the router host (made only when missing), before the router
    starts and before a rollout drains through it; also for a loopback admin_bind, which the
    rollout reaches through the router host's SSH connection."""
    from disaggctl.compile import router_admin

    admin = router_admin(c.spec, c.desired.placement)
    if admin is not None and admin.token_file:
        _remote_token(hosts, c)(admin.token_file)


def _remote_token(hosts: Hosts, c: Context) -> Callable[[str], str]:
    """Reads the router admin token over the router host's SSH connection; made there first (umask
    077, only when missing: not a rendered file, so plans stay stable). Never printed."""
    from disaggctl.targets.rollout import ADMIN_TOKEN_SCRIPT

    host = c.desired.placement.router_host

    def read(path: str) -> str:
        def one(conn: Connection) -> str:
            r = conn.run(["sh", "-c", ADMIN_TOKEN_SCRIPT, "token", path], sudo=True, timeout=30)
            if r.rc != 0:
                raise SshError(conn.name, f"router admin token {path}: exit {r.rc}: {r.err.strip()[:200]}")
            data = conn.get(path)
            if not data:
                raise SshError(conn.name, f"router admin token {path}: missing")
            return data.decode().strip()

        got = hosts.map([host], one)[host]
        if isinstance(got, BaseException):
            raise got
        return got

    return read


def _print_roll(console: Console, roll: tuple[SystemdRoll, Rotation] | None) -> None:
    from disaggctl.targets.rollout import roll_text

    if roll:
        for line in roll_text(roll[0].plan, roll[1]):
            console.print(line, highlight=False, markup=False, soft_wrap=True)


def _rollable(console: Console, roll: tuple[SystemdRoll, Rotation] | None) -> tuple[SystemdRoll, Rotation] | None:
    """None (the start phases restart everything at once) when the change cannot be rolled."""
    from disaggctl.targets.rollout import ALL_AT_ONCE, rollable

    if roll is None or rollable(roll[0].plan, roll[1]):
        return roll
    console.print(ALL_AT_ONCE)
    return None


def _confirm_roll(ctx: OpsContext, roll: tuple[SystemdRoll, Rotation] | None) -> bool:
    from disaggctl.targets.rollout import rollout_problems

    if roll is None or not rollout_problems(roll[0].plan, roll[1]):
        return True
    return confirm(ctx, "This change cannot be rolled without failing requests (see above). Roll it anyway?")


def _force(ctx: OpsContext) -> bool:
    return bool(ctx.options.get("force_unlock"))


def _refresh_registry(c: Context, hosts: Hosts, observed: Mapping[str, Observed], plan: Plan) -> None:
    """Hosts the apply did not touch whose manifests remember other hosts than they should now
    (a removed host was cleaned, or a manifest from before the registry): rewrite their manifest."""
    done = {h.host for h in plan.hosts if h.changed}
    stale = [n for n in stale_registry(c, observed) if n not in done and n in hosts.conns]
    if stale:
        _raise_first(hosts.map(stale, lambda conn: write_manifest(conn, c, observed[conn.name], pending=False)),
                     "manifest")  # fmt: skip


def _report_failure(console: Console, e: ApplyError) -> None:
    console.print(f"[red bold]apply failed:[/red bold] {e}")
    if e.journal:
        console.print(f"[dim]journalctl -u {e.unit} -n 50 on {e.host}:[/dim]")
        console.print(e.journal, markup=False, highlight=False)
    console.print("Fix the cause and run apply again: it continues from what is on the hosts.")


def _print_destroy(console: Console, owned: Mapping[str, Observed]) -> None:
    for h, o in owned.items():
        assert o.manifest is not None
        console.print(f"[bold]{h}[/bold]")
        for u in [*(o.manifest.units), *([o.manifest.target_unit] if o.manifest.target_unit else [])]:
            console.print(f"  [red]- stop+remove[/red] {u}")
        for path in o.manifest.owned_paths():
            console.print(f"  [red]- delete[/red]      {path}")


def remove_owned(conn: Connection, c: Context, obs: Observed) -> None:
    """Stop and remove exactly what the host's manifest names, then the state folder."""
    m = obs.manifest
    assert m is not None
    units = [*m.units, *([m.target_unit] if m.target_unit else [])]
    push(conn, [], stop=units, remove=m.owned_paths(), reload=True)
    _drop_folders(conn, c)


def _drop_folders(conn: Connection, c: Context) -> None:
    """The state folder, the router admin token (made at apply time, not in the manifest) and the
    config folder when nothing else is left in it: a destroyed host, or one the spec dropped."""
    from disaggctl.compile import ROUTER_ADMIN_TOKEN

    conn.run(["rm", "-rf", "--", c.state_dir], sudo=True)
    conn.run(["rm", "-f", "--", f"{c.desired.config_dir}/{ROUTER_ADMIN_TOKEN}"], sudo=True)
    conn.run(["rmdir", "--ignore-fail-on-non-empty", "--", c.desired.config_dir], sudo=True)


def status_report(
    c: Context, observed: Mapping[str, Observed], plan: Plan, probe: Callable[[str, float], tuple[bool, str]]
) -> StatusReport:
    from disaggctl.targets.status import ProcessStatus, StatusReport

    rows: list[ProcessStatus] = []
    for p in c.desired.processes:
        obs = observed[p.host]
        unit = c.unit_of[p.name]
        base: dict[str, Any] = {"name": p.name, "role": p.role.value, "instance": p.instance, "host": p.host}
        base |= {"unit": unit, "port": p.http_port, "gpus": list(p.gpus)}
        if obs.error:
            rows.append(ProcessStatus(state="unreachable", running=False, healthy=None, drift=[obs.error], **base))
            continue
        uf = obs.units.get(unit)
        installed = uf is not None and uf.load_state != "not-found"
        state = f"{uf.active_state}/{uf.sub_state}" if uf is not None and installed else "not installed"
        healthy, health = None, "-"
        if p.health_url:
            healthy, detail = probe(p.health_url, 3.0)
            health = "ok" if healthy else detail
        pid = uf.main_pid if uf is not None and uf.main_pid > 0 else None
        restarts = uf.n_restarts if uf is not None and installed else None
        running = bool(uf and uf.running)
        rows.append(ProcessStatus(state=state, running=running, healthy=healthy, health=health, pid=pid,
                                  restarts=restarts, drift=_drift(c, obs, p, unit), **base))  # fmt: skip
    notes = ["The hosts differ from the spec: run `disaggctl plan` to see the changes."] if plan.changed else []
    ok = not plan.changed and all(r.running and r.healthy is not False and not r.drift for r in rows)
    deployed = any(o.manifest is not None for o in observed.values())
    return StatusReport(deployment=c.desired.name, target="systemd", deployed=deployed, healthy=ok,
                        endpoint=c.desired.router_url or None, processes=rows, notes=notes)  # fmt: skip


def _raise_first(results: Mapping[str, object], phase: str) -> None:
    for host, r in results.items():
        if isinstance(r, ApplyError):
            raise r
        if isinstance(r, BaseException):
            raise ApplyError(host, None, f"{phase}: {r}") from r


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
