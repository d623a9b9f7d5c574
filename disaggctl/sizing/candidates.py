"""Enumerate candidate layouts: aggregated instances on a GPU pool, or prefill and decode pools.

Every candidate is evaluated with `perf` (step times) and `roles` (load and queueing). Batches
are the ladder 1, 2, 4 ... 1024 (points for the Pareto front) plus, per shape, the largest
batch that meets the SLA, found by bisection (any value, not a power of two); under --rate or
--concurrency the batch follows from the load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from disaggctl.sizing.hardware import GpuSpec
from disaggctl.sizing.perf import ModelInfo, Perf, Precision, Shape
from disaggctl.sizing.plan import Candidate, Pool, Problem, RolePlan
from disaggctl.sizing.roles import (
    RHO_MAX,
    PrefillRole,
    _pow2_at_least,
    agg_point,
    disagg_closed_loop,
    largest_batch,
    max_batch,
    prefill_budget,
    prefill_role,
)

BATCH_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
AGG_CHUNKS = (2048, 8192)
PP_CHOICES = (2, 4, 8)
DECODE_TOKENS = 2048  # max_num_batched_tokens a decode instance is sized with
SPLITS_EXHAUSTIVE = 16  # up to this many prefill instances every xPyD split is tried


def weight_choices(model: ModelInfo, gpu: GpuSpec, allowed: tuple[str, ...] = ()) -> list[str]:
    """Precisions worth trying: the checkpoint's own and lower ones; NVFP4 only on Blackwell."""
    bits = model.arch.weight_bits
    if bits < 8:  # an MXFP4 checkpoint (gpt-oss) is served as published
        out = ["mxfp4"]
    else:
        out = (["bf16"] if bits >= 16 else []) + ["fp8"]
        if gpu.blackwell and gpu.fp4_tflops > 0:
            out.append("nvfp4")
    return [w for w in out if not allowed or w in allowed]


def _pow2_upto(n: int) -> list[int]:
    return [1 << i for i in range(n.bit_length()) if 1 << i <= n]


def tp_choices(model: ModelInfo, gpu: GpuSpec, gpus: int) -> list[int]:
    """TP sizes inside one NVLink domain that divide the heads (vLLM's divisibility rules)."""
    a = model.arch
    out = []
    for tp in _pow2_upto(min(gpus, gpu.nvlink_domain_gpus)):
        if a.attention_heads % tp:
            continue
        if a.kv_latent_dim is None and a.kv_heads % tp and tp % a.kv_heads:
            continue
        out.append(tp)
    return out


def role_shapes(perf: Perf, gpus: int, max_batched_tokens: int, need_tokens: int) -> list[Shape]:
    """Instance shapes whose weights plus the KV of one `need_tokens` sequence fit; PP only where TP cannot."""
    model, gpu = perf.model, perf.gpu

    def fits(s: Shape) -> bool:
        return perf.kv_capacity_tokens(s, max_batched_tokens, 256) >= need_tokens

    shapes: list[Shape] = []
    tps = tp_choices(model, gpu, gpus)
    for tp in tps:
        if fits(Shape(tp)):
            shapes.append(Shape(tp))
            continue
        if tp != tps[-1]:
            continue  # a larger TP fits before PP is worth its bubbles
        for pp in PP_CHOICES:
            if tp * pp <= gpus and fits(Shape(tp, pp)):
                shapes.append(Shape(tp, pp))
                break
    if model.moe:
        # attention data parallel + expert parallel: DP ranks share the experts of the instance
        for tp in tps:
            for dp in _pow2_upto(min(gpus, gpu.nvlink_domain_gpus) // tp)[1:]:
                if fits(Shape(tp, 1, dp)):
                    shapes.append(Shape(tp, 1, dp))
    return shapes


def precisions(problem: Problem) -> list[Precision]:
    """Weight precisions every GPU pool supports, times the allowed KV dtypes."""
    per_pool = [weight_choices(problem.model, p.gpu, problem.weights) for p in problem.pools]
    common = [w for w in per_pool[0] if all(w in other for other in per_pool[1:])]
    return [Precision(w, kv) for w in common for kv in problem.kv_dtypes]


# --------------------------------------------------------------------------- aggregated


def _agg_cand(problem: Problem, perf: Perf, shape: Shape, chunk: int, r: int, b: float,
              point: tuple[float, float, float, float]) -> Candidate:
    tpot, ttft, rate, itl = point
    sla = problem.sla
    return Candidate(
        mode="aggregated", weights=perf.prec.weights, kv_dtype=perf.prec.kv,
        decode=RolePlan(shape.tp, shape.pp, shape.dp, r, chunk, shape.pp * max(1, math.ceil(b)), perf.gpu.key),
        prefill=None, batch=b, ttft_ms=ttft * 1000, tpot_ms=tpot * 1000, request_rate=rate * r,
        output_tps=rate * r * problem.workload.osl, gpus_used=r * shape.gpus, budget=problem.budget,
        itl_ms=itl * 1000, meets_sla=sla.met(ttft * 1000, tpot * 1000, itl * 1000),
    )


def aggregated(problem: Problem, pool: Pool, prec: Precision) -> Iterator[Candidate]:
    """One instance (the aggregated arm) and as many replicas as fit (the replicated arm), per shape."""
    perf = Perf(problem.model, pool.gpu, pool.efficiency, prec)
    wl = problem.workload
    for chunk in AGG_CHUNKS:
        for shape in role_shapes(perf, pool.gpus, chunk, wl.isl + wl.osl):
            top = min(max_batch(perf, shape, wl, chunk), chunk - 1)
            if top <= 0:
                continue
            r_all = pool.gpus // shape.gpus
            if problem.concurrency is not None:
                for r in sorted({1, r_all}):
                    b = problem.concurrency / (r * shape.pp * shape.dp)
                    point = agg_point(perf, shape, chunk, wl, problem.sla.q, b, r) if b <= top else None
                    if point and point[2] > 0:
                        yield _agg_cand(problem, perf, shape, chunk, r, b, point)
            elif problem.rate is not None:
                yield from _agg_rate(problem, perf, shape, chunk, top, r_all)
            else:
                yield from _agg_throughput(problem, perf, shape, chunk, top, r_all)


def _agg_throughput(problem: Problem, perf: Perf, shape: Shape, chunk: int, top: int,
                    r_all: int) -> Iterator[Candidate]:
    wl, sla = problem.workload, problem.sla
    for r in sorted({1, r_all}):
        def meets(b: float, r: int = r) -> bool:
            p = agg_point(perf, shape, chunk, wl, sla.q, b, r)
            return p[2] > 0 and sla.met(p[1] * 1000, p[0] * 1000, p[3] * 1000)

        best = largest_batch(meets, float(top))
        batches = [float(b) for b in BATCH_LADDER if b <= top]
        if best > 0:
            batches.append(best)
        for b in batches:
            point = agg_point(perf, shape, chunk, wl, sla.q, b, r)
            if point[2] > 0:
                yield _agg_cand(problem, perf, shape, chunk, r, b, point)


def _agg_rate(problem: Problem, perf: Perf, shape: Shape, chunk: int, top: int, r_all: int) -> Iterator[Candidate]:
    """Fewest replicas that carry --rate within the SLA (and all of them): the batch follows from the load."""
    wl, sla, lam = problem.workload, problem.sla, float(problem.rate or 0)

    def point(b: float, r: int) -> tuple[float, float, float, float]:
        return agg_point(perf, shape, chunk, wl, sla.q, b, r)

    feasible = largest_batch(lambda b: point(b, 1)[2] > 0, float(top))
    if feasible <= 0:
        return
    per_inst_max = point(feasible, 1)[2]
    r_min = math.ceil(lam / per_inst_max - 1e-9)
    if r_min > r_all:
        return
    for r in range(r_min, r_all + 1):
        share = lam / r

        def under(b: float, r: int = r, share: float = share) -> bool:
            return 0 < point(b, r)[2] < share

        b = largest_batch(under, feasible)
        b = min(feasible, b * 1.0001) if b > 0 else feasible
        p = point(b, r)
        if p[2] <= 0:
            continue
        c = _agg_cand(problem, perf, shape, chunk, r, b, (p[0], p[1], share, p[3]))
        if c.meets_sla or r in (r_min, r_all):
            yield c
        if c.meets_sla and r < r_all:
            yield from _agg_rate_all(problem, perf, shape, chunk, feasible, r_all, point)
            return


def _agg_rate_all(problem: Problem, perf: Perf, shape: Shape, chunk: int, feasible: float, r_all: int,
                  point: Callable[[float, int], tuple[float, float, float, float]]) -> Iterator[Candidate]:
    """All replicas carrying --rate: the replicated arm at its lowest load per instance."""
    share = float(problem.rate or 0) / r_all
    b = largest_batch(lambda b: 0 < point(b, r_all)[2] < share, feasible)
    p = point(min(feasible, b * 1.0001) if b > 0 else feasible, r_all)
    if p[2] > 0:
        yield _agg_cand(problem, perf, shape, chunk, r_all, b, (p[0], p[1], share, p[3]))


# --------------------------------------------------------------------------- disaggregated


@dataclass(frozen=True)
class Pair:
    """The prefill pool and the decode pool of a disaggregated layout (one pool when both are the same)."""

    problem: Problem
    pre_pool: Pool
    dec_pool: Pool
    perf_p: Perf
    perf_d: Perf

    @property
    def shared(self) -> bool:
        return self.pre_pool is self.dec_pool

    def max_prefill(self, gp: int, gd: int) -> int:
        return (self.pre_pool.gpus - (gd if self.shared else 0)) // gp

    def decode_room(self, x: int, gp: int, gd: int) -> int:
        """Decode instances that fit next to x prefill instances."""
        free = self.dec_pool.gpus - (x * gp if self.shared else 0)
        return max(0, free // gd)

    def link(self, x: int, gp: int, y: int, gd: int) -> str:
        """NVLink when each NVLink domain can hold its share of prefill and decode instances, else the NIC."""
        if self.pre_pool.gpu.key != self.dec_pool.gpu.key or not self.shared:
            return "nic"
        domain = self.dec_pool.gpu.nvlink_domain_gpus
        used = x * gp + y * gd
        if used <= domain:
            return "nvlink"
        d = math.ceil(used / domain)
        if x >= d and y >= d and math.ceil(x / d) * gp + math.ceil(y / d) * gd <= domain:
            return "nvlink"
        return "nic"

    def t_kv(self, pre: PrefillRole, ds: Shape, kind: str) -> float:
        return self.perf_d.kv_transfer_time(self.problem.workload.isl, pre.shape, ds, kind)


def role_pairs(problem: Problem) -> list[tuple[Pool, Pool]]:
    """(prefill pool, decode pool): the same pool, and across GPU types in a mixed fleet."""
    pools = problem.pools
    out = [(p, p) for p in pools if p.gpus >= 2]
    if len(pools) == 2:
        a, b = pools
        out += [(x, y) for x, y in ((a, b), (b, a))]
    if problem.prefill_on and len(pools) == 2:
        out = [(p, d) for p, d in out if p.gpu.key == problem.prefill_on and d is not p]
    return out


def _decode_batches(perf: Perf, ds: Shape, problem: Problem, top: int) -> list[float]:
    wl = problem.workload
    out = [float(b) for b in BATCH_LADDER if b <= top]
    limit = problem.sla.tpot_ms / 1000
    best = math.floor(largest_batch(lambda b: perf.decode_step(ds, b, wl.ctx) <= limit, float(top)))
    if best >= 1 and best not in out:
        out.append(float(best))
    return out


def disaggregated(problem: Problem, pre_pool: Pool, dec_pool: Pool, prec: Precision) -> Iterator[Candidate]:
    perf_p = Perf(problem.model, pre_pool.gpu, pre_pool.efficiency, prec)
    perf_d = Perf(problem.model, dec_pool.gpu, dec_pool.efficiency, prec)
    pair = Pair(problem, pre_pool, dec_pool, perf_p, perf_d)
    wl = problem.workload
    need = wl.isl + wl.osl
    m = prefill_budget(wl.isl_eff)
    pres = [prefill_role(perf_p, s, wl.isl_eff) for s in role_shapes(perf_p, pre_pool.gpus, m, need)]
    for ds in role_shapes(perf_d, dec_pool.gpus, DECODE_TOKENS, need):
        top = max_batch(perf_d, ds, wl, DECODE_TOKENS)
        if top < 1:
            continue
        batches = _decode_batches(perf_d, ds, problem, top)
        for pre in pres:
            if pre.shape.tp > ds.tp or pair.max_prefill(pre.shape.gpus, ds.gpus) < 1:
                continue  # NIXL: decode TP must be >= prefill TP
            if problem.concurrency is not None:
                yield from _disagg_closed(pair, pre, ds, top)
                continue
            for b in batches:
                yield from _disagg_open(pair, pre, ds, b)


def _disagg_cand(pair: Pair, pre: PrefillRole, ds: Shape, b: float, x: int, y: int, rate: float,
                 ttft: float, tpot: float, kind: str, t_kv: float, gate: bool = True) -> Candidate:
    p, wl = pair.problem, pair.problem.workload
    d_tokens = _pow2_at_least(max(1024, ds.pp * b + 256))
    seqs = ds.pp * max(1, math.ceil(b))
    return Candidate(
        mode="disaggregated", weights=pair.perf_d.prec.weights, kv_dtype=pair.perf_d.prec.kv,
        decode=RolePlan(ds.tp, ds.pp, ds.dp, y, d_tokens, seqs, pair.dec_pool.gpu.key),
        prefill=RolePlan(pre.shape.tp, pre.shape.pp, pre.shape.dp, x, pre.max_batched_tokens, pre.max_seqs,
                         pair.pre_pool.gpu.key),
        batch=b, ttft_ms=ttft * 1000, tpot_ms=tpot * 1000, request_rate=rate, output_tps=rate * wl.osl,
        gpus_used=x * pre.shape.gpus + y * ds.gpus, budget=p.budget, kv_link=kind, kv_transfer_ms=t_kv * 1000,
        itl_ms=tpot * 1000, meets_sla=gate and p.sla.met(ttft * 1000, tpot * 1000, tpot * 1000),
    )


def _splits(pair: Pair, gp: int, gd: int, per_pre: float, per_dec: float) -> list[int]:
    """Prefill instance counts to try: all of them when few, else around the balance point."""
    top = pair.max_prefill(gp, gd)
    if top <= SPLITS_EXHAUSTIVE:
        return list(range(1, top + 1))
    n = pair.pre_pool.gpus
    x_star = n * per_dec / (per_pre * gd + per_dec * gp) if pair.shared else per_dec * pair.decode_room(0, gp, gd)
    if not pair.shared:
        x_star = x_star / per_pre
    return sorted({min(top, max(1, math.floor(x_star) + d)) for d in (-2, -1, 0, 1, 2, 3)})


def _disagg_open(pair: Pair, pre: PrefillRole, ds: Shape, b: float) -> Iterator[Candidate]:
    p = pair.problem
    wl, sla = p.workload, p.sla
    tpot = pair.perf_d.decode_step(ds, b, wl.ctx)
    per_dec = ds.pp * ds.dp * b / (wl.osl * tpot)  # requests/s one decode instance finishes
    gp, gd = pre.shape.gpus, ds.gpus
    best: tuple[float, int, int, int, str, float] | None = None
    for x in _splits(pair, gp, gd, pre.mu * RHO_MAX, per_dec):
        y_max = pair.decode_room(x, gp, gd)
        if y_max < 1:
            continue
        kind = pair.link(x, gp, y_max, gd)
        t_kv = pair.t_kv(pre, ds, kind)
        cap = pre.capacity(sla.ttft_ms / 1000 - t_kv - tpot, sla.q, x)
        if p.rate is not None:
            y = math.ceil(p.rate / per_dec - 1e-9)
            if cap < p.rate or y > y_max:
                continue
            rate = p.rate
        else:
            if cap <= 0:
                continue
            y = min(y_max, max(1, math.ceil(cap / per_dec - 1e-9)))
            rate = min(cap, y * per_dec)
        key = (rate, -(x * gp + y * gd), x, y, kind, t_kv)
        if best is None or key[:2] > best[:2]:
            best = key
            if p.rate is not None:
                break  # the fewest prefill instances that carry the rate
    if best is None:
        yield from _disagg_best_effort(pair, pre, ds, b, tpot, per_dec)
        return
    rate, _, x, y, kind, t_kv = best
    ttft = pre.latency(rate / (x * pre.mu), sla.q, x) + t_kv + tpot
    yield _disagg_cand(pair, pre, ds, b, x, y, rate, ttft, tpot, kind, t_kv)


def _disagg_best_effort(pair: Pair, pre: PrefillRole, ds: Shape, b: float, tpot: float,
                        per_dec: float) -> Iterator[Candidate]:
    """A layout that misses the TTFT target at half load: shown when nothing meets the SLA."""
    if pair.problem.rate is not None:
        return
    gp, gd = pre.shape.gpus, ds.gpus
    x = max(1, min(pair.max_prefill(gp, gd), round(pair.max_prefill(gp, gd) / 2)))
    y = pair.decode_room(x, gp, gd)
    if y < 1:
        return
    kind = pair.link(x, gp, y, gd)
    t_kv = pair.t_kv(pre, ds, kind)
    rate = min(x * pre.mu * 0.5, y * per_dec)
    ttft = pre.latency(rate / (x * pre.mu), pair.problem.sla.q, x) + t_kv + tpot
    yield _disagg_cand(pair, pre, ds, b, x, y, rate, ttft, tpot, kind, t_kv, gate=False)


def _disagg_closed(pair: Pair, pre: PrefillRole, ds: Shape, top: int) -> Iterator[Candidate]:
    p = pair.problem
    clients = float(p.concurrency or 0)
    gp, gd = pre.shape.gpus, ds.gpus
    for x in range(1, pair.max_prefill(gp, gd) + 1):
        y = pair.decode_room(x, gp, gd)
        if y < 1:
            break
        b = clients / (y * ds.pp * ds.dp)
        if b > top:
            continue
        kind = pair.link(x, gp, y, gd)
        t_kv = pair.t_kv(pre, ds, kind)
        ttft, tpot, rate = disagg_closed_loop(pair.perf_d, pre, ds, x, y, clients, p.workload, p.sla.q, t_kv)
        yield _disagg_cand(pair, pre, ds, b, x, y, rate, ttft, tpot, kind, t_kv)


def candidates(problem: Problem) -> Iterator[Candidate]:
    for prec in precisions(problem):
        if "aggregated" in problem.modes:
            for pool in problem.pools:
                yield from aggregated(problem, pool, prec)
        if "disaggregated" in problem.modes and problem.budget >= 2:
            for pre_pool, dec_pool in role_pairs(problem):
                yield from disaggregated(problem, pre_pool, dec_pool, prec)
