"""The one `disaggctl status` report of every target (docs/status.md documents the JSON schema).

A target fills one `ProcessStatus` per process of the spec (and per deployed process the spec
dropped); `print_status` shows it as text, `--output json` prints `StatusReport` as JSON.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from disaggctl.targets.invariants import InvariantCheck

if TYPE_CHECKING:
    from disaggctl.targets import OpsContext

STATUS_VERSION: Literal[1] = 1


class ProcessStatus(BaseModel):
    """One process (prefill/decode instance or router) as the target sees it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The process name (`decode-0`, `prefill-1`, `router`).")
    role: str | None = Field(description="prefill, decode or router; null for a process the spec dropped.")
    instance: str | None = Field(default=None, description="The instance it belongs to (`decode-0`).")
    host: str = Field(default="", description="Where it runs (spec host, Slurm node list, or `localhost`).")
    state: str = Field(
        description="The target's own words: `active/running` (systemd), `running`/`failed`/`stopped` (local), "
        "the Slurm job state; `not deployed` or `unreachable` on every target."
    )
    running: bool = Field(description="The target reports the process as running.")
    healthy: bool | None = Field(description="Its /health answered 200; null when it was not checked.")
    health: str = Field(default="-", description="`ok`, the failure (`HTTP 503`, `connection refused`) or `-`.")
    pid: int | None = Field(default=None, description="Main process id where the target knows it.")
    restarts: int | None = Field(default=None, description="Restarts since it was started by disaggctl.")
    port: int | None = Field(default=None, description="Its HTTP port.")
    gpus: list[int] = Field(default_factory=list, description="GPU indices it uses on its host.")
    cores: str | None = Field(default=None, description="CPU cores it is bound to (local CPU runs).")
    unit: str | None = Field(default=None, description="systemd unit, or Slurm job id, that runs it.")
    log: str | None = Field(default=None, description="Its log file, where it is a file.")
    drift: list[str] = Field(default_factory=list, description="How it differs from the spec; empty when it matches.")


class StatusReport(BaseModel):
    """`disaggctl status --output json`: the same shape for systemd, Slurm and local."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = Field(default=STATUS_VERSION, description="Schema version.")
    deployment: str = Field(description="The spec's `name`.")
    target: Literal["systemd", "slurm", "local"] = Field(description="The spec's `target.kind`.")
    deployed: bool = Field(description="Anything of this deployment runs or is installed.")
    healthy: bool = Field(
        description="Every process runs, is healthy and matches the spec, and with `--check` no invariant "
        "is violated (status exits 0)."
    )
    endpoint: str | None = Field(description="The router's URL where known.")
    processes: list[ProcessStatus] = Field(default_factory=list, description="One entry per process.")
    notes: list[str] = Field(default_factory=list, description="What the operator should know or do next.")
    checks: list[InvariantCheck] = Field(
        default_factory=list, description="`status --check` only: the P/D invariants (docs/status.md)."
    )
    detail: dict[str, Any] = Field(
        default_factory=dict,
        description="Target-specific facts: `jobs` (Slurm), `supervisor_pid` and `state_dir` (local).",
    )


def print_status(ctx: OpsContext, report: StatusReport) -> None:
    """JSON on stdout with --output json; else one line per process (no table: nothing is cut)."""
    if ctx.output == "json":
        sys.stdout.write(report.model_dump_json(indent=2) + "\n")
        return
    from rich.markup import escape

    c = ctx.console
    head = f"[bold]{escape(report.deployment)}[/bold] ({report.target})"
    if report.endpoint:
        head += f" router {escape(report.endpoint)}"
    c.print(head + ("" if report.deployed else ": not deployed"), highlight=False)
    for p in report.processes:
        state = f"[green]{escape(p.state)}[/green]" if p.running else f"[red]{escape(p.state)}[/red]"
        health = p.health if p.healthy is not False else f"[red]{escape(p.health)}[/red]"
        where = [f"on {p.host}" if p.host else "", f"port {p.port}" if p.port else ""]
        where += [f"GPUs {','.join(map(str, p.gpus))}" if p.gpus else "", f"cores {p.cores}" if p.cores else ""]
        where += [f"pid {p.pid}" if p.pid else "", f"restarts {p.restarts}" if p.restarts else ""]
        where += [escape(p.unit) if p.unit else ""]
        drift = f"  [yellow]drift: {escape('; '.join(p.drift))}[/yellow]" if p.drift else ""
        c.print(
            f"  {escape(p.name):<12} {state}  health {health}  {escape(' '.join(w for w in where if w))}{drift}",
            highlight=False,
            soft_wrap=True,
        )
    for n in report.notes:
        c.print(f"[yellow]{escape(n)}[/yellow]", highlight=False, soft_wrap=True)
    for chk in report.checks:
        verdict = {True: "[green]ok[/green]", False: "[red]FAILED[/red]", None: "[yellow]unknown[/yellow]"}[chk.ok]
        c.print(f"  check {escape(chk.name):<25} {verdict}  {escape(chk.detail)}", highlight=False, soft_wrap=True)


def with_checks(report: StatusReport, checks: list[InvariantCheck]) -> StatusReport:
    """The report with `status --check`'s invariants; a violated one makes it unhealthy."""
    healthy = report.healthy and all(c.ok is not False for c in checks)
    return report.model_copy(update={"checks": checks, "healthy": healthy})


def status_exit(report: StatusReport) -> int:
    return 0 if report.healthy else 1


def status_schema_markdown() -> str:
    """The field tables of docs/status.md, generated from the models' descriptions."""
    out: list[str] = []
    tables = (
        (StatusReport, "The report"),
        (ProcessStatus, "`processes[]`: one per process"),
        (InvariantCheck, "`checks[]`: one per invariant (`status --check`)"),
    )
    for model, title in tables:
        out += [f"### {title}", "", "| field | type | meaning |", "|---|---|---|"]
        for name, f in model.model_fields.items():
            ann = str(f.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
            ann = ann.replace("disaggctl.targets.status.", "").replace("disaggctl.targets.invariants.", "")
            ann = ann.replace(" | None", " or null")
            out.append(f"| `{name}` | `{ann}` | {f.description or ''} |")
        out.append("")
    return "\n".join(out)
