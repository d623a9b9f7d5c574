"""Core commands: validate, schema, render, plan, apply, status, destroy, logs."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from disaggctl.inputs import OutputFormat, RoleName

if TYPE_CHECKING:
    from disaggctl.deployment import DesiredState
    from disaggctl.loader import LoadedSpec
    from disaggctl.targets import Backend, OpsContext
    from disaggctl.topology import TopologyFile

SPEC = typer.Argument(..., help="The cluster spec (YAML).", metavar="SPEC")
PROFILE = typer.Option([], "--profile", "-p", help="Profile merged under the spec (repeatable).")
TOPOLOGY = typer.Option(None, "--topology", "-t", help="Topology file from `disaggctl probe`/`topology`.")
DEGRADED = typer.Option(False, "--allow-degraded", help="Place onto GPUs/hosts the probe reported as degraded.")
YES = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")


def _load(spec: Path, profiles: list[str]) -> LoadedSpec:
    from disaggctl.loader import load_spec

    return load_spec(spec, profiles)


def _topology(path: Path | None) -> TopologyFile | None:
    if path is None:
        return None
    from disaggctl.inputs import read_topology

    return read_topology(path)


def _compile(loaded: LoadedSpec, topology: TopologyFile | None, allow_degraded: bool) -> DesiredState:
    from disaggctl.compile import compile_spec
    from disaggctl.input_checks import desired_checks

    desired = compile_spec(loaded, topology, allow_degraded=allow_degraded)
    desired_checks(loaded, desired)
    return desired


def _context(spec: Path, profiles: list[str], topology: Path | None, allow_degraded: bool, **kw: Any) -> OpsContext:
    from rich.console import Console

    from disaggctl.targets import OpsContext

    loaded = _load(spec, profiles)
    topo = _topology(topology)
    desired = _compile(loaded, topo, allow_degraded)
    options: dict[str, object] = {
        "profiles": list(profiles),
        "topology_file": str(topology) if topology else None,
        "spec_file": str(spec),
    }
    return OpsContext(
        loaded=loaded,
        desired=desired,
        console=Console(stderr=kw.pop("stderr", False)),
        topology=topo,
        options=options,
        **kw,
    )


def _backend(ctx: OpsContext) -> Backend:
    """The backend of the spec's target kind (imported only when a command needs it)."""
    from disaggctl.targets import get_backend

    return get_backend(ctx.spec.target.kind)


def plan_json(desired: DesiredState) -> dict[str, Any]:
    """The machine-readable plan: every process with host, role, argv (a list) and env."""
    from disaggctl.compat.plan_output import plan_fragment

    return {
        "name": desired.name,
        "vllm_version": desired.vllm_version,
        "model": desired.model_name,
        "kv_transfer": desired.kv_kind,
        "router_url": desired.router_url,
        "config_dir": desired.config_dir,
        "processes": [
            {
                "name": p.name,
                "instance": p.instance,
                "role": p.role.value,
                "host": p.host,
                "address": p.address,
                "gpus": p.gpus,
                "numa_node": p.numa_node,
                "http_port": p.http_port,
                "node_rank": p.node_rank,
                "argv": p.argv,
                "env": p.env,
                "files": p.files,
            }
            for p in desired.processes
        ],
        "files": {h: [{"name": f.name, "sha256": f.sha256} for f in fs] for h, fs in desired.files.items()},
        "ports": {h: {str(k): v for k, v in ports.items()} for h, ports in desired.placement.ports.items()},
        "warnings": desired.placement.warnings,
        "compat": plan_fragment(desired),
    }


def print_plan_table(desired: DesiredState, show_commands: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table

    from disaggctl.quoting import shell_line

    console = Console()
    table = Table(title=f"{desired.name}: {len(desired.processes)} processes, router {desired.router_url}")
    for col in ("process", "role", "host", "GPUs", "port", "NUMA"):
        table.add_column(col)
    for p in desired.processes:
        table.add_row(
            p.name,
            p.role.value,
            f"{p.host} ({p.address})",
            ",".join(map(str, p.gpus)) or "-",
            str(p.http_port or "-"),
            "-" if p.numa_node is None else str(p.numa_node),
        )
    console.print(table)
    for w in desired.placement.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    from disaggctl.compat.plan_output import plan_rows

    for row in plan_rows(desired):
        console.print(row, highlight=False, markup=False, soft_wrap=True)
    if show_commands:
        for p in desired.processes:
            env = " ".join(f"{k}={v}" for k, v in p.env.items())
            console.print(f"[bold]{p.name}[/] on {p.host}:", highlight=False)
            console.print(
                f"  {shell_line([f'{k}={v}' for k, v in p.env.items()])} {shell_line(p.argv)}"
                if env
                else f"  {shell_line(p.argv)}",
                highlight=False,
                soft_wrap=True,
            )


def validate(
    spec: Path = SPEC,
    profile: list[str] = PROFILE,
    topology: Path | None = TOPOLOGY,
    allow_degraded: bool = DEGRADED,
) -> None:
    """Check a spec (schema, cross-field rules and placement). Exit 2 with file:line:col on errors."""
    from disaggctl.gcpause import no_cyclic_gc
    from disaggctl.input_checks import render_check

    with no_cyclic_gc(last=True):  # one-shot: nothing to collect (disaggctl/gcpause.py)
        loaded = _load(spec, profile)
        desired = _compile(loaded, _topology(topology), allow_degraded)
        render_check(loaded, desired)
    for w in desired.placement.warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"{spec}: OK ({len(desired.placement.instances)} instances, {len(desired.processes)} processes)")


def schema(
    markdown: bool = typer.Option(False, "--markdown", help="Print the spec reference (docs/spec-reference.md)."),
) -> None:
    """Print the JSON Schema of the cluster spec (for editors), or the Markdown reference."""
    from disaggctl.docgen import spec_json_schema, spec_reference_markdown

    if markdown:
        sys.stdout.write(spec_reference_markdown())
    else:
        sys.stdout.write(json.dumps(spec_json_schema(), indent=2) + "\n")


def render(
    spec: Path = SPEC,
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one subfolder per host."),
    profile: list[str] = PROFILE,
    topology: Path | None = TOPOLOGY,
    allow_degraded: bool = DEGRADED,
) -> None:
    """Write every artifact (units, batch scripts, LMCache YAML, router config) per host."""
    from disaggctl.errors import DisaggError, SpecError
    from disaggctl.gcpause import no_cyclic_gc
    from disaggctl.input_checks import located_render_error
    from disaggctl.inputs import output_dir, writing
    from disaggctl.render import render as do_render
    from disaggctl.render.output import write_rendered

    output_dir(out, "render output folder")
    with no_cyclic_gc(last=True):  # one-shot: nothing to collect (disaggctl/gcpause.py)
        loaded = _load(spec, profile)
        desired = _compile(loaded, _topology(topology), allow_degraded)
        try:  # secrets: placeholders (their values are written by apply only)
            rendered = do_render(desired, loaded.spec)
        except SpecError:
            raise
        except DisaggError as e:
            raise located_render_error(loaded, e) from None
        with writing(out, "render output folder"):
            written = write_rendered(rendered, out)
    typer.echo(f"wrote {len(written)} files under {out}")


def _check_plan_out(offline: bool, out_file: str | None) -> None:
    """`plan -o FILE` saves what runs on the hosts now: refused with --offline; the file must be writable."""
    if offline and out_file:
        from disaggctl.errors import file_error

        raise file_error(
            out_file, "--out", "--offline cannot save a plan: a saved plan records what runs on the hosts now",
            "run `disaggctl plan SPEC -o FILE` without --offline (--output json > FILE keeps the process list)",
        )
    if out_file:
        from disaggctl.inputs import output_file

        output_file(out_file, "plan file")


FORCE_UNLOCK_HELP = (
    "Break the deployment's lock (systemd: held by another apply/destroy, or left by a killed one) and take it."
)


def plan(
    spec: Path = SPEC,
    profile: list[str] = PROFILE,
    topology: Path | None = TOPOLOGY,
    allow_degraded: bool = DEGRADED,
    offline: bool = typer.Option(False, "--offline", help="Do not contact hosts: show what would run."),
    output: OutputFormat = typer.Option(OutputFormat.text, "--output", help="text or json."),
    diff: bool = typer.Option(False, "--diff", help="Show unified diffs of changed files."),
    out_file: str | None = typer.Option(None, "--out", "-o", help="Save the plan to apply it later."),
    detailed_exitcode: bool = typer.Option(False, "--detailed-exitcode", help="Exit 2 when there are changes."),
) -> None:
    """Show what would run and (unless --offline) what would change on the hosts."""
    _check_plan_out(offline, out_file)
    if offline:
        from disaggctl.gcpause import no_cyclic_gc

        with no_cyclic_gc(last=True):  # one-shot: nothing to collect (disaggctl/gcpause.py)
            loaded = _load(spec, profile)
            desired = _compile(loaded, _topology(topology), allow_degraded)
            if output == "json":
                from disaggctl.jsontext import dumps_indent2

                sys.stdout.write(dumps_indent2(plan_json(desired)) + "\n")
            else:
                print_plan_table(desired)
        return
    ctx = _context(spec, profile, topology, allow_degraded, output=output, diff=diff)
    raise typer.Exit(_backend(ctx).plan(ctx, out_file, detailed_exitcode))


def apply(
    spec: Path = typer.Argument(..., help="The cluster spec, or a plan saved with `plan -o plan.json`."),
    plan_file: str | None = typer.Option(None, "--plan", help="Apply exactly this saved plan (plan -o FILE)."),
    profile: list[str] = PROFILE,
    topology: Path | None = TOPOLOGY,
    allow_degraded: bool = DEGRADED,
    yes: bool = YES,
    force_unlock: bool = typer.Option(False, "--force-unlock", help=FORCE_UNLOCK_HELP),
) -> None:
    """Push files, start decode, prefill and router, and wait until a request flows end to end."""
    if spec.suffix == ".json":  # `apply plan.json`: the plan names its spec, profiles and topology
        from disaggctl.targets.base import read_saved_plan

        plan_file = str(spec)
        meta = read_saved_plan(spec).meta
        spec = Path(meta.spec_file)
        profile = list(meta.profiles) or profile
        topology = Path(meta.topology_file) if meta.topology_file else topology

    elif plan_file is not None:
        from disaggctl.targets.base import read_saved_plan

        read_saved_plan(plan_file)
    ctx = _context(spec, profile, topology, allow_degraded, yes=yes)
    ctx.options["force_unlock"] = force_unlock
    raise typer.Exit(_backend(ctx).apply(ctx, plan_file))


def status(
    spec: Path = SPEC,
    profile: list[str] = PROFILE,
    topology: Path | None = TOPOLOGY,
    allow_degraded: bool = DEGRADED,
    output: OutputFormat = typer.Option(OutputFormat.text, "--output", help="text or json."),
    check: bool = typer.Option(
        False,
        "--check",
        help="Also check that P/D really happens (engines' and router's metrics, fingerprints); exit 1 if not.",
    ),
) -> None:
    """Show each instance's state, health, GPUs, ports and drift from the spec."""
    ctx = _context(spec, profile, topology, allow_degraded, output=output)
    ctx.options["check"] = check
    raise typer.Exit(_backend(ctx).status(ctx))


def destroy(
    spec: Path = SPEC,
    profile: list[str] = PROFILE,
    topology: Path | None = TOPOLOGY,
    allow_degraded: bool = DEGRADED,
    yes: bool = YES,
    force_unlock: bool = typer.Option(False, "--force-unlock", help=FORCE_UNLOCK_HELP),
) -> None:
    """Stop and remove exactly what disaggctl owns for this deployment."""
    ctx = _context(spec, profile, topology, allow_degraded, yes=yes)
    ctx.options["force_unlock"] = force_unlock
    raise typer.Exit(_backend(ctx).destroy(ctx))


def logs(
    spec: Path = SPEC,
    role: RoleName | None = typer.Option(None, "--role", help="prefill, decode or router."),
    instance: int | None = typer.Option(None, "--instance", min=0, help="Instance number within the role."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep following."),
    lines: int = typer.Option(100, "--lines", "-n", min=0, help="Lines of history."),
    profile: list[str] = PROFILE,
    topology: Path | None = TOPOLOGY,
    allow_degraded: bool = DEGRADED,
) -> None:
    """Show (or follow) the logs of the deployment's processes."""
    ctx = _context(spec, profile, topology, allow_degraded)
    raise typer.Exit(_backend(ctx).logs(ctx, role.value if role else None, instance, follow, lines))


COMMANDS: list[Callable[..., None]] = [validate, schema, render, plan, apply, status, destroy, logs]


def register(app: typer.Typer) -> None:
    for command in COMMANDS:
        app.command()(command)
