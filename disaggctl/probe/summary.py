"""Human summary of probed topologies (rich tables), for `probe` and `topology --output text`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from disaggctl.topology import Gpu, HostTopology


def _ranges(values: list[int]) -> str:
    if not values:
        return "-"
    out, start, prev = [], values[0], values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(out)


def _fabric(g: Gpu) -> str:
    if not g.fabric_state or g.fabric_state == "not_supported":
        return "-"
    text = g.fabric_state if g.fabric_status in (None, "success") else f"{g.fabric_state}/{g.fabric_status}"
    if g.in_nvl_domain:
        text += f" clique {g.clique_id}"
    if g.fabric_health and g.fabric_health != "healthy":
        text += f" ({g.fabric_health})"
    return text


def _cell(value: object) -> str:
    return "?" if value is None else str(value)


def gpu_table(topo: HostTopology) -> Table:
    bad = topo.bad_gpus
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("GPU", "model", "arch", "memory", "NUMA", "CPUs", "NVLink", "peers", "fabric", "MIG"):
        t.add_column(col, no_wrap=col in ("model", "CPUs", "peers"), overflow="ellipsis")
    for g in topo.gpus:
        links = f"{g.nvlink_active}/{len(g.nvlinks)}" if g.nvlinks else ("yes" if g.nvlink_peers else "-")
        mem = f"{g.memory_total_mib / 1024:.0f} GiB" if g.memory_total_mib else "?"
        style = "red" if g.index in bad else ""
        t.add_row(
            str(g.index), (g.name or "?").removeprefix("NVIDIA "),
            f"{_cell(g.architecture)} {g.compute_capability or ''}".strip(), mem,
            _cell(g.numa_node), _cell(g.cpu_affinity), links, _ranges(g.nvlink_peers), _fabric(g),
            {True: "on", False: "off", None: "?"}[g.mig_enabled], style=style,
        )
    return t


def print_host(console: Console, name: str, topo: HostTopology | None, error: str | None = None) -> None:
    head = Text(name, style="bold")
    if topo is not None:
        bits = [f"{len(topo.gpus)} GPU", f"driver {topo.driver_version or '?'}"]
        if topo.cuda_driver_version:
            bits.append(f"CUDA {topo.cuda_driver_version}")
        if topo.source:
            bits.append(f"via {topo.source}")
        head.append("  " + ", ".join(bits), style="dim")
    console.print(head)
    if error:
        console.print(Text(f"  error: {error}", style="red"))
    if topo is None:
        return
    if topo.gpus:
        console.print(gpu_table(topo))
    if topo.nics:
        nics = ", ".join(
            f"{n.ucx_name} numa {_cell(n.numa_node)} {n.state or '?'}"
            + (f" {n.rate_gbps:g} Gb/s" if n.rate_gbps else "")
            for n in topo.nics
        )
        console.print(f"  RDMA NICs: {nics}")
    else:
        console.print("  RDMA NICs: none found", style="dim")
    for p in topo.problems:
        if error and p.code == "no_gpus":
            continue  # the error line above already says it
        style = "red" if p.severity == "error" else "yellow"
        console.print(Text(f"  {p.severity}: [{p.code}] {p.message}", style=style))
    for w in [] if error else topo.warnings:
        console.print(Text(f"  note: {w}", style="dim"))
