"""The Terraform-style plan: what is on each host, what should be, and the actions between. Pure.

    Observed   one host as read by the observe script: manifest, file hashes/modes, unit states
    HostPlan   per host: file actions (create/update/delete/unchanged) and unit actions
               (create/restart/delete/unchanged) with a reason for each restart
    Plan       all hosts plus what it was computed against (observed hashes, rendered hashes): the
               `target` details of the saved plan (disaggctl.targets.base.SavedPlan); `apply
               plan.json` refuses it when either moved

Restarts follow from changes: a unit restarts when its unit file, a config file it reads or the
secrets changed, when it is not running, or when its running command line differs from the
unit; with LMCache a restarted prefill also restarts the decode instances it pushes KV to
(their receiver state is per sender connection).
"""

from __future__ import annotations

import base64
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from disaggctl.deployment import DesiredState, Process, Rendered, RenderedFile
from disaggctl.errors import DisaggError
from disaggctl.targets.base import Action, ProcessAction
from disaggctl.targets.systemd.manifest import Manifest, parse_manifest
from disaggctl.unitstate import parse_unit_states

PLAN_VERSION = 1
UNIT_DIR = "/etc/systemd/system/"

# KV connectors whose decode side must restart when a prefill it peers with restarts
PEER_RESTART_KINDS = {"lmcache"}


# --------------------------------------------------------------------------- observed state


@dataclass(frozen=True)
class FileFact:
    sha256: str | None  # None: missing
    mode: int | None


@dataclass(frozen=True)
class UnitFact:
    unit: str
    load_state: str = ""
    active_state: str = ""
    sub_state: str = ""
    main_pid: int = 0
    n_restarts: int = 0
    unit_file_state: str = ""
    need_reload: bool = False
    cmdline: list[str] | None = None  # of MainPID when running

    @property
    def running(self) -> bool:
        return self.active_state in ("active", "reloading") and self.sub_state != "auto-restart"


@dataclass
class Observed:
    host: str
    manifest: Manifest | None = None
    files: dict[str, FileFact] = field(default_factory=dict)
    units: dict[str, UnitFact] = field(default_factory=dict)
    error: str | None = None  # unreachable, observe failed

    def against(self) -> dict[str, str | None]:
        """What a plan records of this host: path -> sha256 (None when missing), manifest spec hash."""
        out: dict[str, str | None] = {p: f.sha256 for p, f in sorted(self.files.items())}
        out["@manifest"] = self.manifest.spec_hash if self.manifest else None
        return out


def parse_observe(host: str, text: str, expected: bytes | None = None) -> Observed:
    """Parse the observe script's output.

    Sections: @@manifest (JSON), @@paths (every path of interest), @@sha (sha256sum lines),
    @@mode (`stat -c '%a %n'` lines), @@show (`systemctl show` blocks, blank-line separated,
    each with Id=), @@cmdlines ("PID base64-of-/proc/PID/cmdline"), @@state (unitstate lines of
    the services read from their cgroup, whose unit file systemd loaded at the last reload), @@end;
    @@manifest-as-expected instead of @@manifest: the host's manifest is `expected` (same sha256).
    A path listed but absent from @@sha is missing on the host. A unit in both @@state and @@show
    (not running) takes systemctl's answer.
    """
    obs = Observed(host)
    section = ""
    manifest_lines: list[str] = []
    sha: dict[str, str] = {}
    modes: dict[str, int] = {}
    paths: list[str] = []
    blocks: list[dict[str, str]] = [{}]
    cmdlines: dict[int, list[str]] = {}
    state_lines: list[str] = []
    for line in text.split("\n"):
        if line.startswith("@@") and line[2:] in _SECTIONS:
            section = line[2:]
            if section == "manifest-as-expected" and expected is not None:
                manifest_lines = [expected.decode()]
            continue
        if section == "manifest":
            manifest_lines.append(line)
        elif section == "paths" and line:
            paths.append(line)
        elif section == "sha" and line:
            escaped = line.startswith("\\")  # sha256sum escapes names with a backslash or newline
            digest, _, path = (line[1:] if escaped else line).partition("  ")
            sha[path.replace("\\\\", "\\") if escaped else path] = digest
        elif section == "mode" and line:
            mode, _, path = line.partition(" ")
            modes[path] = int(mode, 8)
        elif section == "show":
            if not line:
                blocks.append({})
            elif "=" in line:
                k, _, v = line.partition("=")
                blocks[-1][k] = v
        elif section == "cmdlines" and line:
            pid_text, _, b64 = line.partition(" ")
            cmdlines[int(pid_text)] = _decode_cmdline(b64)
        elif section == "state" and line:
            state_lines.append(line)
    obs.units.update(_cgroup_facts(state_lines))
    for path in paths:
        obs.files[path] = FileFact(sha.get(path), modes.get(path) if path in sha else None)
    for b in blocks:
        unit = b.get("Id")
        if not unit:
            continue
        main_pid = int(b.get("MainPID", "0") or 0)
        obs.units[unit] = UnitFact(
            unit=unit,
            load_state=b.get("LoadState", ""),
            active_state=b.get("ActiveState", ""),
            sub_state=b.get("SubState", ""),
            main_pid=main_pid,
            n_restarts=int(b.get("NRestarts", "0") or 0),
            unit_file_state=b.get("UnitFileState", ""),
            need_reload=b.get("NeedDaemonReload", "no") == "yes",
            cmdline=cmdlines.get(main_pid) if main_pid > 0 else None,
        )
    obs.manifest = parse_manifest("\n".join(manifest_lines).strip() or None)
    return obs


_SECTIONS = ("manifest", "manifest-as-expected", "paths", "sha", "mode", "show", "cmdlines", "state", "end")


def _cgroup_facts(lines: list[str]) -> dict[str, UnitFact]:
    """Running services read from their cgroup: what `systemctl show` says of them (the observe
    script sends only units whose loaded unit file is the one on disk, so NeedDaemonReload=no).
    NRestarts is not read (only `status` shows it, and it asks systemctl)."""
    units = [line.partition(" ")[0] for line in lines]
    out: dict[str, UnitFact] = {}
    for u, st in parse_unit_states("\n".join(lines), units).items():
        if st.running:
            out[u] = UnitFact(
                unit=u, load_state="loaded", active_state="active", sub_state="running", main_pid=st.main_pid,
                unit_file_state="enabled" if st.enabled else "disabled",
                cmdline=list(st.cmdline) if st.cmdline is not None else None,
            )  # fmt: skip
    return out


def _decode_cmdline(b64: str) -> list[str]:
    raw = base64.b64decode(b64.strip() or b"")
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]] if raw else []


# --------------------------------------------------------------------------- plan model


class FileChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    action: Action
    mode: int | None = None
    secret: bool = False
    old_sha256: str | None = None
    new_sha256: str | None = None
    reason: str = ""


class UnitChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    unit: str
    process: str | None = None  # None for the target unit (and a unit the spec dropped)
    role: str | None = None
    instance: str | None = None
    start_order: int = 0
    action: Action
    reason: str = ""


class HostPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str
    files: list[FileChange] = Field(default_factory=list)
    units: list[UnitChange] = Field(default_factory=list)
    against: dict[str, str | None] = Field(default_factory=dict)  # observed path -> sha256 at plan time
    error: str | None = None

    @property
    def changed(self) -> bool:
        return any(c.action is not Action.UNCHANGED for c in self.files) or any(
            c.action is not Action.UNCHANGED for c in self.units
        )

    def files_with(self, *actions: Action) -> list[FileChange]:
        return [c for c in self.files if c.action in actions]

    def units_with(self, *actions: Action) -> list[UnitChange]:
        return [c for c in self.units if c.action in actions]


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = PLAN_VERSION
    deployment: str
    spec_hash: str = ""
    hosts: list[HostPlan] = Field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(h.changed for h in self.hosts)

    def host(self, name: str) -> HostPlan:
        for h in self.hosts:
            if h.host == name:
                return h
        raise KeyError(name)

    def counts(self) -> dict[str, int]:
        out = {a.value: 0 for a in Action}
        for h in self.hosts:
            for a in [c.action for c in h.files] + [c.action for c in h.units]:
                out[a.value] += 1
        return out

    def process_actions(self) -> list[ProcessAction]:
        """One action per process (in start order): what its unit does; the seam for ordered executors."""
        out = [
            ProcessAction(
                process=u.process,
                action=u.action,
                reason=u.reason,
                role=u.role,
                instance=u.instance,
                host=h.host,
                start_order=u.start_order,
            )
            for h in self.hosts
            for u in h.units
            if u.process is not None
        ]
        return sorted(out, key=lambda a: (a.start_order, a.process))


def load_plan(data: Mapping[str, Any], where: str) -> Plan:
    """The systemd details of a saved plan (SavedPlan.target)."""
    try:
        return Plan.model_validate(data)
    except ValueError as e:
        raise DisaggError(f"{where}: not a systemd plan ({str(e).splitlines()[0]})") from None


# --------------------------------------------------------------------------- diff


def _file_change(f: RenderedFile, fact: FileFact | None) -> FileChange:
    old = fact.sha256 if fact else None
    base = {"path": f.path, "mode": f.mode, "secret": f.secret, "old_sha256": old, "new_sha256": f.sha256}
    if old is None:
        return FileChange(action=Action.CREATE, reason="missing", **base)
    if old != f.sha256:
        return FileChange(action=Action.UPDATE, reason="content differs", **base)
    if fact is not None and fact.mode is not None and fact.mode != f.mode:
        return FileChange(action=Action.UPDATE, reason=f"mode {fact.mode:o} -> {f.mode:o}", **base)
    return FileChange(action=Action.UNCHANGED, **base)


def diff_host(
    desired: DesiredState, rendered: Rendered, obs: Observed, unit_of: Mapping[str, str], target_unit: str
) -> HostPlan:
    """Actions that take `obs` to what `rendered` says for this host. unit_of: process -> unit name.

    Three steps: files (wanted, then owned ones the spec dropped), the units of the spec's
    processes (restart reasons follow from the file changes and the observed units), then the
    deployment's target unit and units the spec dropped."""
    plan = HostPlan(host=obs.host, against=obs.against())
    wanted = {f.path: f for f in rendered.for_host(obs.host)}
    plan.files = _file_changes(wanted, obs)
    changed = {c.path: c for c in plan.files if c.action in (Action.CREATE, Action.UPDATE)}
    for p in sorted(desired.on_host(obs.host), key=lambda p: p.start_order):
        plan.units.append(_unit_change(desired, p, unit_of[p.name], obs, changed))
    plan.units += _other_units(obs, wanted, changed, target_unit)
    return plan


def _file_changes(wanted: Mapping[str, RenderedFile], obs: Observed) -> list[FileChange]:
    out = [_file_change(f, obs.files.get(f.path)) for f in wanted.values()]
    owned = obs.manifest.files if obs.manifest else {}
    for path in sorted(set(owned) - set(wanted)):
        fact = obs.files.get(path)
        if fact is None or fact.sha256 is not None:
            old = fact.sha256 if fact else None
            out.append(
                FileChange(
                    path=path, action=Action.DELETE, secret=owned[path].secret, old_sha256=old,
                    reason="no longer in the spec",
                )
            )  # fmt: skip
    return out


def _unit_change(
    desired: DesiredState, p: Process, unit: str, obs: Observed, changed: Mapping[str, FileChange]
) -> UnitChange:
    """A process's unit: created with its unit file, else restarted for every reason found."""
    unit_path = UNIT_DIR + unit
    base: dict[str, Any] = {
        "unit": unit, "process": p.name, "role": p.role.value, "instance": p.instance,
        "start_order": p.start_order,
    }  # fmt: skip
    if unit_path in changed and changed[unit_path].action is Action.CREATE:
        return UnitChange(action=Action.CREATE, reason="new unit", **base)
    reasons = _changed_inputs(desired, p, unit_path, changed) + _run_state_reasons(
        obs.units.get(unit), p, unit_path in changed
    )
    if reasons:
        return UnitChange(action=Action.RESTART, reason="; ".join(reasons), **base)
    return UnitChange(action=Action.UNCHANGED, **base)


def _changed_inputs(desired: DesiredState, p: Process, unit_path: str, changed: Mapping[str, FileChange]) -> list[str]:
    """What the process reads that this plan rewrites: its unit file, its config files, the secrets."""
    reasons = ["unit file changed"] if unit_path in changed else []
    reasons += [f"{name} changed" for name in p.files if f"{desired.config_dir}/{name}" in changed]
    if any(c.secret for c in changed.values()):
        reasons.append("secrets changed")
    return reasons


def _run_state_reasons(uf: UnitFact | None, p: Process, unit_file_changed: bool) -> list[str]:
    """What the observed unit says: not running, loaded from an older unit file, another command."""
    if uf is None or not uf.running:
        state = f"{uf.active_state}/{uf.sub_state}" if uf and uf.active_state else "unknown"
        return [f"not running ({state})"]
    if uf.need_reload and not unit_file_changed:
        return ["unit file on disk differs from the loaded unit"]
    if uf.cmdline is not None and not same_command(uf.cmdline, p.argv):
        return ["running command line differs from the unit"]
    return []


def _other_units(
    obs: Observed, wanted: Mapping[str, RenderedFile], changed: Mapping[str, FileChange], target_unit: str
) -> list[UnitChange]:
    """The deployment's target unit, and the units of processes the spec dropped (from the manifest)."""
    out: list[UnitChange] = []
    tpath = UNIT_DIR + target_unit
    if tpath in wanted:
        act = Action.CREATE if tpath in changed and changed[tpath].action is Action.CREATE else Action.UNCHANGED
        out.append(UnitChange(unit=target_unit, action=act, start_order=99, reason="groups the deployment"))
    if obs.manifest:
        m = obs.manifest
        process_of = {op.unit: (name, op) for name, op in m.processes.items()}
        for u in [*m.units, *([m.target_unit] if m.target_unit else [])]:
            if UNIT_DIR + u in wanted:
                continue
            name, op = process_of.get(u, (None, None))
            out.append(
                UnitChange(
                    unit=u, process=name, role=op.role if op else None, instance=op.instance if op else None,
                    start_order=op.start_order if op else 99, action=Action.DELETE, reason="no longer in the spec",
                )
            )  # fmt: skip
    return out


def same_command(cmdline: list[str], argv: list[str]) -> bool:
    """A wrapper (`vllm` a script that execs python) changes argv[0..k]; the arguments must match."""
    args = argv[1:]
    return cmdline[len(cmdline) - len(args) :] == args if len(cmdline) >= len(args) else False


def peer_restarts(plans: list[HostPlan], kv_kind: str) -> None:
    """With connectors whose decode state is per prefill connection, restart decode with prefill."""
    if kv_kind not in PEER_RESTART_KINDS:
        return
    restarted = [c.process for h in plans for c in h.units if c.role == "prefill" and c.action is Action.RESTART]
    if not restarted:
        return
    for h in plans:
        for i, c in enumerate(h.units):
            if c.role == "decode" and c.action is Action.UNCHANGED:
                why = f"peers with restarted {', '.join(p or '' for p in restarted)} ({kv_kind})"
                h.units[i] = c.model_copy(update={"action": Action.RESTART, "reason": why})


def make_plan(
    desired: DesiredState,
    rendered: Rendered,
    observed: Mapping[str, Observed],
    unit_of: Mapping[str, str],
    target_unit: str,
    digest: str,
) -> Plan:
    hosts: list[HostPlan] = []
    for host, obs in observed.items():
        if obs.error:
            hosts.append(HostPlan(host=host, error=obs.error))
            continue
        if not rendered.for_host(host) and not obs.manifest:
            continue  # a declared host this deployment never used
        hosts.append(diff_host(desired, rendered, obs, unit_of, target_unit))
    peer_restarts(hosts, desired.kv_kind)
    return Plan(
        deployment=desired.name,
        spec_hash=digest,
        hosts=hosts,
    )


def stale_reasons(saved: Plan, fresh: Plan) -> list[str]:
    """Why a saved plan no longer applies: a host's files moved, or the spec renders differently."""
    out: list[str] = []
    if saved.spec_hash != fresh.spec_hash:
        out.append("the spec (or a secret) renders differently than when the plan was made")
    fresh_hosts = {h.host: h for h in fresh.hosts}
    for h in saved.hosts:
        now = fresh_hosts.get(h.host)
        if now is None:
            out.append(f"{h.host}: no longer part of the deployment")
            continue
        for path, sha in h.against.items():
            cur = now.against.get(path)
            if cur != sha:
                what = "manifest" if path == "@manifest" else path
                out.append(f"{h.host}: {what} changed since the plan ({_short(sha)} -> {_short(cur)})")
    for name in fresh_hosts.keys() - {h.host for h in saved.hosts}:
        out.append(f"{name}: joined the deployment after the plan was made")
    return out


def _short(sha: str | None) -> str:
    return "missing" if sha is None else sha[:12]


def unified_diff(path: str, old: str | None, new: str | None) -> str:
    a = (old or "").splitlines(keepends=True)
    b = (new or "").splitlines(keepends=True)
    return "".join(difflib.unified_diff(a, b, fromfile=f"{path} (host)", tofile=f"{path} (spec)"))
