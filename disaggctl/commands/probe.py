"""`disaggctl probe` (NVML over SSH) and `disaggctl topology` (recorded captures -> topology file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from disaggctl.inputs import OutputFormat


def _env(pairs: list[str]) -> dict[str, str]:
    from disaggctl.errors import DisaggError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise DisaggError(f"--agent-env {pair!r}: expected NAME=VALUE")
        out[key] = value
    return out


def register(app: typer.Typer) -> None:
    @app.command("probe")
    def probe(
        spec: Annotated[Path | None, typer.Argument(help="Cluster spec whose hosts to probe.")] = None,
        out: Annotated[Path, typer.Option("-o", "--out", help="Topology file to write.")] = Path("topology.json"),
        local: Annotated[bool, typer.Option("--local", help="Probe this machine instead of the spec's hosts.")] = False,
        host: Annotated[list[str], typer.Option("--host", help="Probe only these spec hosts (repeatable).")] = [],  # noqa: B006
        allow_degraded: Annotated[
            bool, typer.Option("--allow-degraded", help="Exit 0 even when hosts have problems (missing GPUs, ...).")
        ] = False,
        python: Annotated[str | None, typer.Option("--python", help="Python on the hosts (default python3).")] = None,
        agent_env: Annotated[
            list[str], typer.Option("--agent-env", help="NAME=VALUE set for the agent (repeatable).")
        ] = [],  # noqa: B006
        mode: Annotated[str, typer.Option("--mode", help="auto (NVML, else nvidia-smi), nvml or smi.")] = "auto",
        timeout: Annotated[float, typer.Option("--timeout", min=0.001, max=86400, help="Seconds per host.")] = 120.0,
    ) -> None:
        """Probe GPUs, NVLink, NVL72 fabric and RDMA NICs of every host (NVML over SSH) into a topology file."""
        from rich.console import Console

        from disaggctl.errors import DisaggError
        from disaggctl.inputs import output_file, write_text
        from disaggctl.probe import remote
        from disaggctl.probe.summary import print_host
        from disaggctl.topology import TopologyFile, dump_topology

        if mode not in ("auto", "nvml", "smi"):
            raise DisaggError(f"--mode {mode!r}: expected auto, nvml or smi")
        output_file(out, "topology file")
        env = _env(agent_env)
        if local:
            results = [remote.probe_local(python=python, env=env, mode=mode, timeout=timeout)]
        else:
            if spec is None:
                raise DisaggError("probe needs a SPEC (or --local to probe this machine)")
            from disaggctl.loader import load_spec

            loaded = load_spec(spec)
            unknown = [h for h in host if h not in {x.name for x in loaded.spec.hosts}]
            if unknown:
                raise DisaggError(f"--host {', '.join(unknown)}: not a host of {spec}")
            results = remote.probe_hosts(loaded.spec, host or None, python=python or "python3", env=env,
                                         mode=mode, timeout=timeout)
        console = Console()
        topo_file = TopologyFile()
        for r in results:
            print_host(console, r.host, r.topology, r.error)
            if r.topology is not None:
                topo_file.hosts[r.host] = r.topology
        write_text(out, dump_topology(topo_file), "topology file")
        failed = [r.host for r in results if not r.ok]
        degraded = [r.host for r in results
                    if r.ok and r.topology and any(p.severity == "error" for p in r.topology.problems)]
        console.print(f"wrote {out} ({len(topo_file.hosts)} of {len(results)} hosts)")
        if failed:
            console.print(f"[red]failed: {', '.join(failed)}[/red]")
        if degraded:
            console.print(f"[yellow]with problems: {', '.join(degraded)}[/yellow]"
                          + ("" if allow_degraded else " (--allow-degraded to accept)"))
        if failed or (degraded and not allow_degraded):
            raise typer.Exit(1)

    @app.command("topology")
    def topology(
        files: Annotated[list[Path], typer.Argument(help="Captures: nvidia-smi -q -x XML, -q text, topo -m, ...")],
        output: Annotated[OutputFormat, typer.Option("--output", help="json or text.")] = OutputFormat.text,
        out: Annotated[Path | None, typer.Option("-o", "--out", help="Write the topology JSON to this file.")] = None,
        host: Annotated[str | None, typer.Option("--host", help="One host of this name from all files.")] = None,
        gpus: Annotated[int | None, typer.Option("--gpus", min=1, max=1024, help="GPUs each host should have.")] = None,
    ) -> None:
        """Turn recorded nvidia-smi captures into a topology file (one host per file stem, or --host)."""
        from disaggctl.inputs import output_file, write_text
        from disaggctl.probe.captures import topology_from_files
        from disaggctl.topology import dump_topology

        if out is not None:
            output_file(out, "topology file")
        topo_file = topology_from_files(files, host=host, expected_gpus=gpus)
        text = dump_topology(topo_file)
        if out is not None:
            write_text(out, text, "topology file")
        if output == "json":
            typer.echo(text, nl=False)
            return
        from rich.console import Console

        from disaggctl.probe.summary import print_host

        console = Console()
        for name, topo in topo_file.hosts.items():
            print_host(console, name, topo)
        if out is not None:
            console.print(f"wrote {out}")

