"""What `disaggctl size` prints: the three arms and the verdict, the Pareto front, the JSON document."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from disaggctl.sizing.fragment import spec_kv_dtype, spec_quantization
from disaggctl.sizing.plan import Candidate
from disaggctl.sizing.search import Result

VALIDATE_NOTE = ("prefill and decode run on different GPU types: they must use the same KV-cache dtype and the "
                 "same model/weights layout; check the pair with `disaggctl validate`")


def _role(r: Any) -> str:
    gpu = f" {r.gpu}" if r.gpu else ""
    return f"{r.replicas}x {r.shape.label}{gpu}"


def _row(c: Candidate, best: Candidate | None, mark: str = "") -> list[str]:
    pre = _role(c.prefill) if c.prefill else "-"
    dec = _role(c.decode) + (f" + {_role(c.also)}" if c.also else "")
    mark = mark or ("*" if best is not None and c is best else "")
    mode = "disagg" if c.prefill else ("agg-repl" if c.replicated else "agg")
    return [
        mark, mode, pre, dec, f"{c.weights}/{c.kv_dtype}", f"{c.batch:.0f}" if c.batch >= 10 else f"{c.batch:.1f}",
        f"{c.ttft_ms:.0f}", f"{c.tpot_ms:.1f}", f"{c.itl_ms:.1f}", f"{c.tps_per_gpu:.0f}", f"{c.tps_per_user:.0f}",
        f"{c.gpus_used}/{c.budget or c.gpus_used}", "yes" if c.meets_sla else "no",
    ]


_COLUMNS = ("", "mode", "prefill", "decode", "weights/KV", "batch", "TTFT ms", "TPOT ms", "ITL ms",
            "tok/s/GPU", "tok/s/user", "GPUs", "SLA")


def _table(title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for col in _COLUMNS:
        table.add_column(col, justify="right" if col.endswith(("ms", "GPU", "user", "GPUs", "batch")) else "left")
    return table


def spread(front: list[Candidate], top: int) -> list[Candidate]:
    """`top` points of the front, evenly spaced from the most interactive to the most efficient."""
    if len(front) <= top:
        return front
    if top == 1:
        return front[-1:]
    return [front[round(i * (len(front) - 1) / (top - 1))] for i in range(top)]


def _title(result: Result) -> str:
    p = result.problem
    fleet = " + ".join(f"{pool.gpus} x {pool.gpu.key}" for pool in p.pools)
    return (f"{p.model.name} on {fleet}: ISL {p.workload.isl} OSL {p.workload.osl}, "
            f"SLA p{p.sla.percentile:g} TTFT <= {p.sla.ttft_ms:g} ms, TPOT <= {p.sla.tpot_ms:g} ms"
            + (f", ITL <= {p.sla.itl_ms:g} ms" if p.sla.itl_ms else ""))


def print_table(result: Result, top: int, spec_out: Path | None) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 150))
    arms = result.arms
    if arms is not None:
        table = _table(f"Best layout of each kind (tokens/s per GPU of the {result.problem.budget}-GPU budget)\n"
                       + _title(result))
        for name, c in (("agg", arms.aggregated), ("agg-repl", arms.replicated), ("disagg", arms.disaggregated)):
            if c is not None:
                table.add_row(*_row(c, result.best, "*" if c is result.best else ""))
            else:
                table.add_row("", name, "-", "no layout meets the SLA", *([""] * 9))
        console.print(table)
        console.print(f"[bold]Verdict:[/bold] {arms.verdict}")
    front = _table("Pareto front: throughput per GPU vs tokens/s per user")
    for c in spread(result.pareto, top):
        front.add_row(*_row(c, result.best))
    console.print(front)
    e = result.problem.efficiency
    console.print(f"efficiency ({e.source}): compute {e.compute:.2f}, memory {e.memory:.2f}, link {e.link:.2f}")
    if result.best is not None:
        _print_best(console, result)
    for n in result.notes:
        console.print(f"[yellow]note:[/yellow] {n}")
    if spec_out is not None:
        console.print(f"wrote {spec_out}")


def _print_best(console: Any, result: Result) -> None:
    b = result.best
    assert b is not None
    p = result.problem
    console.print(f"[bold]Recommendation:[/bold] {b.mode} {b.layout}, weights {b.weights} "
                  f"(quantization: {spec_quantization(p.model, b.weights)}), KV cache {spec_kv_dtype(b.kv_dtype)}")
    if b.prefill is not None:
        console.print(f"  prefill: {_role(b.prefill)}, max_num_batched_tokens {b.prefill.max_num_batched_tokens}, "
                      f"max_num_seqs {b.prefill.max_num_seqs}")
    for role in (b.decode, b.also):
        if role is not None:
            console.print(f"  {'decode' if b.prefill else 'instances'}: {_role(role)}, max_num_batched_tokens "
                          f"{role.max_num_batched_tokens}, max_num_seqs {role.max_num_seqs}")
    if b.prefill is not None:
        console.print(f"  KV transfer: {b.connector} over {b.kv_link}, {b.kv_transfer_ms:.1f} ms per prompt; "
                      f"router local_prefill_threshold {b.local_prefill_threshold}")
    console.print(f"  predicted: TTFT {b.ttft_ms:.0f} ms, TPOT {b.tpot_ms:.1f} ms, ITL {b.itl_ms:.1f} ms, "
                  f"{b.output_tps:.0f} output tok/s ({b.tps_per_gpu:.0f} per budget GPU, {b.request_rate:.2f} req/s)")


def _best_dict(result: Result) -> dict[str, Any] | None:
    if result.best is None:
        return None
    p = result.problem
    best = result.best.to_dict()
    best["quantization"] = spec_quantization(p.model, result.best.weights)
    best["kv_cache_dtype"] = spec_kv_dtype(result.best.kv_dtype)
    return best


def to_json(result: Result) -> dict[str, Any]:
    p = result.problem
    return {
        "model": p.model.name,
        "gpu": p.gpu.key,
        "hardware_profile": p.gpu.profile,
        "gpus": p.gpus,
        "fleet": [{"gpu": pool.gpu.key, "gpus": pool.gpus, "efficiency": asdict(pool.efficiency)} for pool in p.pools],
        "budget_gpus": p.budget,
        "workload": asdict(p.workload),
        "sla": asdict(p.sla),
        "load": {"rate": p.rate, "concurrency": p.concurrency},
        "efficiency": asdict(p.efficiency),
        "arms": result.arms.to_dict() if result.arms else None,
        "recommendation": _best_dict(result),
        "pareto": [c.to_dict() for c in result.pareto],
        "candidates_evaluated": len(result.candidates),
        "notes": result.notes,
    }
