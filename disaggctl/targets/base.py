"""What every target shares: the plan's closed set of actions, the one saved-plan format, the one
confirmation flow.

A target's plan is a list of `ProcessAction`s (one per process, in start order) plus the target's
own details (`SavedPlan.target`: systemd's per-host file and unit changes, Slurm's jobs, the local
process table). The per-process list is the seam for ordered executors (a rolling restart walks it
instance by instance); the details are what the target needs to refuse a stale saved plan.

    plan -o FILE        write_saved_plan(FILE, saved)       one JSON document, one `meta` block
    apply FILE          read_saved_plan(FILE) -> SavedPlan  the CLI rebuilds the context from meta
                        stale_reasons(saved, fresh)          the same checks for every target first
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from disaggctl.errors import DisaggError

if TYPE_CHECKING:
    from disaggctl.deployment import DesiredState, Process
    from disaggctl.targets import OpsContext

PLAN_FORMAT: Literal["disaggctl-plan"] = "disaggctl-plan"
PLAN_VERSION: Literal[2] = 2
TargetKind = Literal["systemd", "slurm", "local"]


class Action(StrEnum):
    """The closed set of things a plan does to a process, a file or a unit."""

    CREATE = "create"  # new: write / start it
    UPDATE = "update"  # its definition changed: rewrite it, restart what uses it
    RESTART = "restart"  # unchanged definition, but it must (re)start (not running, peers restarted)
    DELETE = "delete"  # no longer in the spec: stop and remove it
    UNCHANGED = "unchanged"


class ProcessAction(BaseModel):
    """What happens to one process of the deployment, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    process: str
    action: Action
    reason: str = ""
    role: str | None = None  # None: a process the spec dropped
    instance: str | None = None
    host: str = ""
    start_order: int = 0


class PlanMeta(BaseModel):
    """What `disaggctl apply plan.json` needs to rebuild the context, and what the plan was made for."""

    model_config = ConfigDict(extra="forbid")

    target: TargetKind
    deployment: str
    spec_file: str  # absolute
    profiles: list[str] = Field(default_factory=list)  # the --profile options only (the spec lists its own)
    topology_file: str | None = None
    spec_hash: str  # of what the spec renders to on this target: a saved plan applies only to the same
    created_at: str = ""


class SavedPlan(BaseModel):
    """The one plan document of every target: `plan --output json` prints it, `plan -o FILE` saves it."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["disaggctl-plan"] = PLAN_FORMAT
    version: Literal[2] = PLAN_VERSION
    meta: PlanMeta
    changed: bool  # anything at all changes (also a file no process reads, a job to cancel)
    actions: list[ProcessAction] = Field(default_factory=list)
    target: dict[str, Any] = Field(default_factory=dict)  # the target's own details (see each target)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def plan_meta(ctx: OpsContext, target: TargetKind, spec_hash: str) -> PlanMeta:
    """The metadata block: the spec file and the CLI's --profile/--topology options as given."""
    opts = ctx.options
    profiles = opts.get("profiles")
    topo = opts.get("topology_file")
    return PlanMeta(
        target=target,
        deployment=ctx.desired.name,
        spec_file=os.path.abspath(ctx.loaded.file),
        profiles=[str(p) for p in profiles] if isinstance(profiles, list) else [],
        topology_file=str(topo) if topo else None,
        spec_hash=spec_hash,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def write_saved_plan(path: str, saved: SavedPlan) -> None:
    """Atomically: a half-written plan is never applied."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(saved.to_json())
    os.replace(tmp, p)


def read_saved_plan(path: str | Path) -> SavedPlan:
    """A saved plan, bounded and located like every input file; a wrong shape names the field."""
    from pydantic import ValidationError

    from disaggctl.inputs import model_issues, read_saved_plan_data

    data = read_saved_plan_data(path)
    try:
        return SavedPlan.model_validate(data)
    except ValidationError as e:
        raise model_issues(e, str(path), "saved plan") from None


def stale_reasons(saved: SavedPlan, fresh: SavedPlan) -> list[str]:
    """The checks every target makes before applying a saved plan (targets add their own after)."""
    out: list[str] = []
    if saved.meta.target != fresh.meta.target or saved.meta.deployment != fresh.meta.deployment:
        out.append(f"it was made for {saved.meta.target} deployment {saved.meta.deployment}")
    elif saved.meta.spec_hash != fresh.meta.spec_hash:
        out.append(
            "the spec (or a secret) renders differently than when the plan was made "
            f"(another script/table: hash {saved.meta.spec_hash[:12]}, now {fresh.meta.spec_hash[:12]})"
        )
    return out


class StalePlan(DisaggError):
    """A saved plan that no longer describes what apply would do: nothing was changed."""

    def __init__(self, path: str, reasons: list[str]) -> None:
        self.reasons = reasons
        lines = "\n".join(f"  {r}" for r in reasons)
        super().__init__(
            f"the saved plan {path} is stale; nothing was changed:\n{lines}\nrun `disaggctl plan -o FILE` again"
        )


def check_saved_plan(
    plan_file: str | None, fresh: SavedPlan, target_reasons: Callable[[SavedPlan], list[str]] | None = None
) -> None:
    """Raise StalePlan when `plan_file` (if any) no longer matches `fresh`. target_reasons: the
    target's own checks of the saved plan's `target` details (what it observed then vs now)."""
    if not plan_file:
        return
    saved = read_saved_plan(plan_file)
    reasons = stale_reasons(saved, fresh) or (target_reasons(saved) if target_reasons else [])
    if reasons:
        raise StalePlan(plan_file, reasons)


def confirm(ctx: OpsContext, question: str, plan_file: str | None = None) -> bool:
    """The one confirmation: -y or a saved plan (reviewed when it was made) needs none; without a
    terminal it refuses rather than waits."""
    if ctx.yes or plan_file:
        return True
    if not sys.stdin.isatty():
        raise DisaggError("refusing to change anything without confirmation: stdin is not a terminal; pass -y")
    from rich.prompt import Confirm

    return bool(Confirm.ask(question, default=False, console=ctx.console))


def emit_plan(ctx: OpsContext, saved: SavedPlan, out_file: str | None) -> None:
    """`--output json` prints the plan document (stdout stays pure JSON); `-o FILE` saves it."""
    if ctx.output == "json":
        sys.stdout.write(saved.to_json())
    if out_file:
        write_saved_plan(out_file, saved)
        if ctx.output != "json":
            ctx.console.print(f"Saved the plan to {out_file}; apply it with `disaggctl apply {out_file}`.")


def finish_plan(
    ctx: OpsContext,
    saved: SavedPlan,
    show: Callable[[], None],
    out_file: str | None,
    detailed_exitcode: bool,
    failed: bool = False,
) -> int:
    """The end of every target's `plan`: the target's text view (`show`) or the JSON document, the
    saved file, and the exit code."""
    if ctx.output != "json":
        show()
    emit_plan(ctx, saved, out_file)
    return plan_exit(saved, detailed_exitcode, failed)


def plan_exit(saved: SavedPlan, detailed_exitcode: bool, failed: bool = False) -> int:
    """1 when the plan could not be made everywhere, 2 for changes with --detailed-exitcode, else 0."""
    if failed:
        return 1
    return 2 if detailed_exitcode and saved.changed else 0


def select_processes(desired: DesiredState, role: str | None, instance: int | None) -> list[Process]:
    """The processes `logs --role --instance` names (every target selects the same way)."""
    procs = [
        p
        for p in desired.processes
        if (role is None or p.role.value == role) and (instance is None or p.instance == f"{p.role.value}-{instance}")
    ]
    if not procs:
        raise DisaggError(f"no process matches --role {role} --instance {instance}")
    return procs
