"""The search: every candidate, the SLA filter, the three arms, the verdict and the Pareto front.

The arms (docs/sizing.md, "Three arms"): the best aggregated layout (one vLLM instance), the
best replicated-aggregated layout (several aggregated instances behind the router; on a mixed
fleet, instances on both GPU types) and the best disaggregated layout (x prefill and y decode
instances). The verdict is the disaggregated arm's throughput per budget GPU over the best
aggregated one's; disaggregation is recommended from DISAGG_MARGIN on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from disaggctl.sizing.candidates import (
    BATCH_LADDER,
    candidates,
    precisions,
    role_shapes,
    tp_choices,
    weight_choices,
)
from disaggctl.sizing.perf import Perf, Precision
from disaggctl.sizing.plan import Candidate, Pool, Problem, RolePlan, Sla
from disaggctl.sizing.roles import (
    RHO_MAX,
    Workload,
    _pow2_at_least,
    agg_point,
    disagg_closed_loop,
    prefill_budget,
    prefill_role,
)

__all__ = [
    "BATCH_LADDER", "RHO_MAX", "Arms", "Candidate", "Pool", "Problem", "Result", "RolePlan", "Sla", "Workload",
    "agg_point", "disagg_closed_loop", "floors", "local_prefill_threshold", "pareto", "prefill_role",
    "search", "tp_choices", "weight_choices",
]

DISAGG_MARGIN = 1.05  # disaggregation must beat aggregated serving by 5% per GPU to be recommended
LMCACHE_MULTI_ROUND = 0.3  # share of multi-round traffic from which LMCache (with CPU offload) is chosen


@dataclass(frozen=True)
class Arms:
    """The best SLA-meeting layout of each kind and the verdict between them."""

    aggregated: Candidate | None
    replicated: Candidate | None
    disaggregated: Candidate | None
    ratio: float | None  # disaggregated over the best aggregated (tokens/s per budget GPU; GPUs with --rate)
    verdict: str

    def to_dict(self) -> dict[str, object]:
        def one(c: Candidate | None) -> dict[str, object] | None:
            return None if c is None else c.to_dict()

        return {"aggregated": one(self.aggregated), "replicated_aggregated": one(self.replicated),
                "disaggregated": one(self.disaggregated), "disaggregation_ratio": self.ratio,
                "verdict": self.verdict}


@dataclass
class Result:
    problem: Problem
    candidates: list[Candidate]
    pareto: list[Candidate]
    best: Candidate | None
    notes: list[str] = field(default_factory=list)
    arms: Arms | None = None


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other one beats on both throughput per GPU and tokens/s per user."""
    ordered = sorted(cands, key=lambda c: (-c.tps_per_user, -c.tps_per_gpu))
    front: list[Candidate] = []
    best_gpu = -1.0
    for c in ordered:
        if c.tps_per_gpu > best_gpu * 1.0001:
            front.append(c)
            best_gpu = c.tps_per_gpu
    return front


def _score(c: Candidate) -> tuple[float, float, float]:
    return (c.tps_per_gpu, -c.gpus_used, c.tps_per_user)


def _best(cands: list[Candidate]) -> Candidate | None:
    return max(cands, key=_score) if cands else None


def _combine(a: Candidate, b: Candidate) -> Candidate:
    """Aggregated instances on both GPU types of a mixed fleet, behind one router."""
    return replace(
        a, also=b.decode, request_rate=a.request_rate + b.request_rate, output_tps=a.output_tps + b.output_tps,
        gpus_used=a.gpus_used + b.gpus_used, ttft_ms=max(a.ttft_ms, b.ttft_ms), tpot_ms=max(a.tpot_ms, b.tpot_ms),
        itl_ms=max(a.itl_ms, b.itl_ms),
    )


def _ratio(problem: Problem, dis: Candidate, agg: Candidate) -> float:
    if problem.rate is not None:  # the same load: fewer GPUs is better
        return agg.gpus_used / dis.gpus_used
    return dis.tps_per_gpu / agg.tps_per_gpu


def verdict_text(problem: Problem, ratio: float | None, dis: Candidate | None, agg: Candidate | None) -> str:
    unit = "fewer GPUs for the same --rate" if problem.rate is not None else "more tokens/s per GPU"
    if ratio is None:
        if dis is None and agg is None:
            return "no layout meets the SLA"
        return "only disaggregated serving meets the SLA" if agg is None else \
            "only aggregated serving meets the SLA" if "disaggregated" in problem.modes else "aggregated only (--mode)"
    if ratio > DISAGG_MARGIN:
        return f"disaggregation gives {ratio:.2f}x {unit} at this SLA"
    if ratio > 1:
        return (f"disaggregation gives only {ratio:.2f}x {unit}, below the {DISAGG_MARGIN:.2f}x that pays "
                "for the router hop and KV transfer: aggregated recommended")
    return f"disaggregation does not pay: {ratio:.2f}x"


def arms(problem: Problem, ok: list[Candidate]) -> Arms:
    agg_all = [c for c in ok if c.mode == "aggregated"]
    single = _best([c for c in agg_all if not c.replicated])
    repl = _best([c for c in agg_all if c.replicated])
    if problem.second is not None and problem.rate is None and problem.concurrency is None:
        per_pool = [_best([c for c in agg_all if c.decode.gpu == p.gpu.key]) for p in problem.pools]
        if per_pool[0] and per_pool[1]:
            both = _combine(per_pool[0], per_pool[1])
            repl = both if repl is None or both.tps_per_gpu > repl.tps_per_gpu else repl
    dis = _best([c for c in ok if c.mode == "disaggregated"])
    if dis and problem.workload.multi_round_share >= LMCACHE_MULTI_ROUND:
        # LMCache (P/D plus CPU offload of earlier rounds) needs equal TP: worth a 10% cost
        same = _best([c for c in ok if c.prefill and c.prefill.tp == c.decode.tp and c.prefill.pp == c.decode.pp == 1])
        if same and same.tps_per_gpu * DISAGG_MARGIN >= dis.tps_per_gpu:
            dis = same
    agg = _best([c for c in (single, repl) if c])
    ratio = _ratio(problem, dis, agg) if dis and agg else None
    return Arms(single, repl, dis, ratio, verdict_text(problem, ratio, dis, agg))


def local_prefill_threshold(problem: Problem, c: Candidate, cap: int = 32768) -> int:
    """Prompt length below which prefilling on the decode instance beats shipping KV.

    Local prefill delays the running decode step by step(B + s) - step(B); the remote path costs
    the KV transfer of s tokens plus the per-request hop. The threshold is the first s where the
    delay exceeds the transfer: a faster link lowers it.
    """
    if c.prefill is None:
        return cap
    pool = next((p for p in problem.pools if p.gpu.key == c.decode.gpu), problem.pools[0])
    perf = Perf(problem.model, pool.gpu, pool.efficiency, Precision(c.weights, c.kv_dtype))
    ds, ps = c.decode.shape, c.prefill.shape
    wl = problem.workload
    kind = c.kv_link or perf.link_kind(problem.gpus)
    base = perf.decode_step(ds, c.batch, wl.ctx)
    s = 16
    while s < cap:
        delay = perf.mixed_step(ds, c.batch, wl.ctx, s, s) - base
        if delay > perf.kv_transfer_time(s, ps, ds, kind):
            return s
        s += 16 if s < 1024 else 128
    return cap


def _finish(problem: Problem, c: Candidate) -> Candidate:
    """Fill the router threshold, decode token budget and connector of a chosen candidate."""
    if c.prefill is None:
        return c
    thr = local_prefill_threshold(problem, c)
    d = c.decode
    tokens = _pow2_at_least(max(d.max_num_batched_tokens, d.max_num_seqs + min(thr, 16384)))
    same_tp = c.prefill.tp == d.tp and c.prefill.pp == d.pp == 1
    connector = "lmcache" if same_tp and problem.workload.multi_round_share >= LMCACHE_MULTI_ROUND else "nixl"
    return replace(c, local_prefill_threshold=thr, connector=connector,
                   decode=replace(d, max_num_batched_tokens=tokens))


def _same(a: Candidate, b: Candidate) -> bool:
    def key(c: Candidate) -> tuple[object, ...]:
        return (c.mode, c.weights, c.kv_dtype, c.batch, c.decode, c.prefill, c.also)

    return key(a) == key(b)


def search(problem: Problem) -> Result:
    notes: list[str] = []
    if not precisions(problem):
        notes.append("no weight precision applies to this model and these GPUs with the given --quantization")
    cands = list(candidates(problem))
    ok = [c for c in cands if c.meets_sla]
    front = pareto(ok if ok else cands)
    result = Result(problem, cands, front, None, notes)
    if not ok:
        return result
    a = arms(problem, ok)
    result.arms = a
    agg = _best([c for c in (a.aggregated, a.replicated) if c])
    if a.disaggregated and (agg is None or (a.ratio or 0) > DISAGG_MARGIN):
        best: Candidate | None = a.disaggregated
    else:
        best = agg
    best = _finish(problem, best) if best else None
    if best is not None and best.prefill is not None and agg is not None \
            and (best.local_prefill_threshold or 0) >= problem.workload.isl:
        # the router would prefill these prompts on the decode instances: that is aggregated serving
        result.notes.append(
            f"typical prompts ({problem.workload.isl} tokens) are below the best disaggregated layout's "
            f"local-prefill threshold ({best.local_prefill_threshold}): its decode instances would prefill "
            "them, so it would not run disaggregated; aggregated recommended")
        a = replace(a, verdict=a.verdict.split(":")[0] + ": prompts would prefill locally; aggregated recommended")
        best = agg
    if best is not None and a.disaggregated is not None and _same(best, a.disaggregated):
        a = replace(a, disaggregated=best)
    result.arms = a
    result.best = best
    result.pareto = [best if best and _same(c, best) else c for c in front]
    if best is not None and not any(c is best for c in result.pareto):
        result.pareto.append(best)
    _notes(problem, result)
    return result


def _notes(problem: Problem, result: Result) -> None:
    best = result.best
    thr = best.local_prefill_threshold if best else None
    if best and best.prefill and thr is not None and thr >= problem.workload.isl:
        result.notes.append(
            f"typical prompts ({problem.workload.isl} tokens) are below the local-prefill threshold "
            f"({thr}): most requests would prefill on the decode instances"
        )
    if result.arms and result.arms.ratio is not None and problem.rate is None:
        result.notes.append(f"throughput per GPU counts all {problem.budget} GPUs of the budget, idle ones included")
    if best and best.weights == "nvfp4":
        result.notes.append("NVFP4 needs an NVFP4 checkpoint (quantization modelopt_fp4), e.g. from nvidia/ on the Hub")
    if best and best.prefill and best.prefill.gpu != best.decode.gpu:
        result.notes.append(
            f"prefill on {best.prefill.gpu}, decode on {best.decode.gpu}: both roles must use the same KV-cache "
            "dtype and the same model/weights layout; check the pair with `disaggctl validate`"
        )


# --------------------------------------------------------------------------- diagnosis


def floors(problem: Problem) -> tuple[float, float]:
    """(best TTFT, best TPOT) in ms any layout reaches for one request on an idle deployment."""
    wl = problem.workload
    ttft = tpot = math.inf
    need = wl.isl + wl.osl
    for prec in precisions(problem):
        for pool in problem.pools:
            perf = Perf(problem.model, pool.gpu, pool.efficiency, prec)
            m = prefill_budget(wl.isl_eff)
            for s in role_shapes(perf, pool.gpus, m, need):
                step = perf.decode_step(s, 1, wl.ctx)
                tpot = min(tpot, step)
                ttft = min(ttft, perf.prefill_time(s, wl.isl_eff, 1, m) + step)
    return ttft * 1000, tpot * 1000


def min_fit(problem: Problem) -> tuple[float, float, float]:
    """(weights GB, KV GB of one ISL+OSL sequence, usable GB per GPU) at the smallest precision tried."""
    wl = problem.workload
    best = (math.inf, math.inf, 0.0)
    for prec in precisions(problem) or [Precision("bf16", "bf16")]:
        pool = max(problem.pools, key=lambda p: p.gpu.hbm_gb)
        perf = Perf(problem.model, pool.gpu, pool.efficiency, prec)
        kv = (wl.isl + wl.osl) * perf.kv_token / 1e9
        if perf.w_total / 1e9 + kv < best[0] + best[1]:
            best = (perf.w_total / 1e9, kv, pool.gpu.hbm_bytes * 0.9 / 1e9)
    return best
