"""Candidate layouts, their predicted performance, the SLA filter and the Pareto front.

A candidate is aggregated (every instance prefills and decodes) or disaggregated (x prefill
instances, y decode instances), with a TP/PP/DP shape per role, a weights precision, a KV-cache
dtype and a decode batch. The search evaluates every candidate with `perf` and keeps the ones
on the front of throughput per GPU against tokens per second per user.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from disaggctl.sizing.hardware import GpuSpec
from disaggctl.sizing.perf import (
    MULTI_ROUND_REUSE,
    Efficiency,
    ModelInfo,
    Perf,
    Precision,
    Shape,
    percentile_wait,
)

RHO_MAX = 0.95  # never plan a queue fuller than this
BATCH_LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
AGG_CHUNKS = (2048, 8192)
PP_CHOICES = (2, 4, 8)
DISAGG_MARGIN = 1.10  # disaggregation must beat aggregated serving by 10% per GPU to be recommended
LMCACHE_MULTI_ROUND = 0.3  # share of multi-round traffic from which LMCache (with CPU offload) is chosen


@dataclass(frozen=True)
class Workload:
    isl: int
    osl: int
    multi_round_share: float = 0.0

    @property
    def isl_eff(self) -> int:
        """Prompt tokens that must really be prefilled (earlier rounds' KV is reused)."""
        return max(1, round(self.isl * (1 - MULTI_ROUND_REUSE * self.multi_round_share)))

    @property
    def ctx(self) -> float:
        """Average cached context of a decoding sequence."""
        return self.isl + self.osl / 2


@dataclass(frozen=True)
class Sla:
    ttft_ms: float
    tpot_ms: float
    percentile: float = 90.0
    itl_ms: float | None = None  # inter-token latency at the percentile (aggregated prefill chunks stall it)

    def met(self, ttft_ms: float, tpot_ms: float, itl_ms: float) -> bool:
        return (ttft_ms <= self.ttft_ms * 1.0001 and tpot_ms <= self.tpot_ms
                and (self.itl_ms is None or itl_ms <= self.itl_ms))

    @property
    def q(self) -> float:
        return self.percentile / 100


@dataclass(frozen=True)
class Problem:
    model: ModelInfo
    gpu: GpuSpec
    gpus: int
    workload: Workload
    sla: Sla
    efficiency: Efficiency
    rate: float | None = None  # requests/s, open loop
    concurrency: int | None = None  # clients, closed loop
    weights: tuple[str, ...] = ()  # allowed weight precisions; empty: all that apply
    kv_dtypes: tuple[str, ...] = ("bf16", "fp8")
    modes: tuple[str, ...] = ("aggregated", "disaggregated")


@dataclass(frozen=True)
class RolePlan:
    tp: int
    pp: int
    dp: int
    replicas: int
    max_num_batched_tokens: int
    max_num_seqs: int

    @property
    def shape(self) -> Shape:
        return Shape(self.tp, self.pp, self.dp)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.replicas


@dataclass(frozen=True)
class Candidate:
    mode: str  # aggregated | disaggregated
    weights: str  # bf16 fp8 nvfp4 mxfp4
    kv_dtype: str  # bf16 fp8
    decode: RolePlan  # the aggregated instances when mode is aggregated
    prefill: RolePlan | None
    batch: int  # decode sequences per DP rank (per micro-batch with PP)
    ttft_ms: float
    tpot_ms: float
    request_rate: float
    output_tps: float
    gpus_used: int
    itl_ms: float = 0.0  # inter-token latency at the SLA percentile
    kv_link: str | None = None
    kv_transfer_ms: float | None = None
    meets_sla: bool = True
    local_prefill_threshold: int | None = None
    connector: str | None = None

    @property
    def tps_per_gpu(self) -> float:
        return self.output_tps / self.gpus_used

    @property
    def tps_per_user(self) -> float:
        return 1000.0 / self.tpot_ms

    @property
    def layout(self) -> str:
        if self.prefill is None:
            return f"{self.decode.replicas}x agg"
        return f"{self.prefill.replicas}P{self.decode.replicas}D"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(layout=self.layout, tps_per_gpu=self.tps_per_gpu, tps_per_user=self.tps_per_user)
        return d


@dataclass
class Result:
    problem: Problem
    candidates: list[Candidate]
    pareto: list[Candidate]
    best: Candidate | None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- enumeration


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


def role_shapes(perf: Perf, gpus: int, max_batched_tokens: int) -> list[Shape]:
    """Instance shapes whose weights and one request's KV fit; PP only where TP alone cannot fit."""
    model, gpu = perf.model, perf.gpu
    need = 2 * max_batched_tokens
    shapes: list[Shape] = []
    tps = tp_choices(model, gpu, gpus)
    for tp in tps:
        if perf.kv_capacity_tokens(Shape(tp), max_batched_tokens, 256) >= need:
            shapes.append(Shape(tp))
            continue
        if tp != tps[-1]:
            continue  # a larger TP fits before PP is worth its bubbles
        for pp in PP_CHOICES:
            if tp * pp <= gpus and perf.kv_capacity_tokens(Shape(tp, pp), max_batched_tokens, 256) >= need:
                shapes.append(Shape(tp, pp))
                break
    if perf.model.moe:
        # attention data parallel + expert parallel: DP ranks share the experts of the instance
        for tp in tps:
            for dp in _pow2_upto(min(gpus, gpu.nvlink_domain_gpus) // tp)[1:]:
                s = Shape(tp, 1, dp)
                if perf.kv_capacity_tokens(s, max_batched_tokens, 256) >= need:
                    shapes.append(s)
    return shapes


def _pow2_at_least(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, n))))


def prefill_budget(isl: int) -> int:
    """max_num_batched_tokens of a prefill instance: a whole prompt per step, 8k..32k."""
    return min(32768, max(8192, _pow2_at_least(isl)))


# --------------------------------------------------------------------------- one role


@dataclass(frozen=True)
class PrefillRole:
    shape: Shape
    max_batched_tokens: int
    max_seqs: int
    latency_one: float  # seconds to prefill one prompt alone
    latency_full: float  # seconds for a full step of batched prompts
    service: float  # seconds of instance time per prompt under load
    mu: float  # prompts/s one instance sustains

    def latency(self, rho: float, q: float) -> float:
        base = self.latency_one + rho * (self.latency_full - self.latency_one)
        return base + percentile_wait(rho, self.service, q)

    def capacity(self, budget_s: float, q: float) -> float:
        """Largest prompts/s per instance whose quantile-q prefill latency stays within budget."""
        if self.latency(0.0, q) > budget_s:
            return 0.0
        lo, hi = 0.0, RHO_MAX
        if self.latency(hi, q) <= budget_s:
            return hi * self.mu
        for _ in range(30):
            mid = (lo + hi) / 2
            if self.latency(mid, q) <= budget_s:
                lo = mid
            else:
                hi = mid
        return lo * self.mu


def prefill_role(perf: Perf, shape: Shape, isl: int) -> PrefillRole:
    m = prefill_budget(isl)
    k = max(1, m // isl)  # prompts batched per step when they are short
    one = perf.prefill_time(shape, isl, 1, m)
    full = perf.prefill_time(shape, isl, k, m)
    service = full / k / (shape.pp * shape.dp)
    return PrefillRole(shape, m, min(256, max(16, 2 * k)), one, full, service, 1 / service)


def max_batch(perf: Perf, shape: Shape, wl: Workload, max_batched_tokens: int) -> int:
    """Largest decode batch per DP rank whose full contexts fit in the KV cache."""
    cap = perf.kv_capacity_tokens(shape, max_batched_tokens, 1024)
    return min(BATCH_LADDER[-1], cap // (wl.isl + wl.osl))


# --------------------------------------------------------------------------- candidates


def _disagg(problem: Problem, perf: Perf, pre: PrefillRole, dshape: Shape, batch: int) -> Iterator[Candidate]:
    wl, sla, n = problem.workload, problem.sla, problem.gpus
    tpot = perf.decode_step(dshape, batch, wl.ctx)
    kind = perf.link_kind(n)
    t_kv = perf.kv_transfer_time(wl.isl, pre.shape, dshape, kind)
    budget = sla.ttft_ms / 1000 - t_kv - tpot
    per_dec = dshape.pp * dshape.dp * batch / (wl.osl * tpot)  # requests/s one decode instance finishes
    gp, gd = pre.shape.gpus, dshape.gpus
    if gp + gd > n:
        return
    cap = pre.capacity(budget, sla.q)
    meets = cap > 0 and tpot * 1000 <= sla.tpot_ms
    per_pre = cap if cap > 0 else pre.mu * 0.5  # best effort when the TTFT target cannot be met

    def cand(x: int, y: int, rate: float, ttft: float, tpot_s: float, b: int, gate: bool = True) -> Candidate:
        d_tokens = _pow2_at_least(max(1024, dshape.pp * b + 256))
        return Candidate(
            mode="disaggregated", weights=perf.prec.weights, kv_dtype=perf.prec.kv,
            decode=RolePlan(dshape.tp, dshape.pp, dshape.dp, y, d_tokens, dshape.pp * b),
            prefill=RolePlan(pre.shape.tp, pre.shape.pp, pre.shape.dp, x, pre.max_batched_tokens, pre.max_seqs),
            batch=b, ttft_ms=ttft * 1000, tpot_ms=tpot_s * 1000, request_rate=rate, output_tps=rate * wl.osl,
            gpus_used=x * gp + y * gd, kv_link=kind, kv_transfer_ms=t_kv * 1000, itl_ms=tpot_s * 1000,
            meets_sla=(meets or not gate) and sla.met(ttft * 1000, tpot_s * 1000, tpot_s * 1000),
        )

    if problem.concurrency is not None:
        c = problem.concurrency
        for x in range(1, (n - gd) // gp + 1):
            y = (n - x * gp) // gd
            b = math.ceil(c / (y * dshape.pp * dshape.dp))
            if _pow2_at_least(b) != batch:
                continue  # every x lands on exactly one ladder rung: evaluate it there
            ttft, tp_s, rate, _ = disagg_closed_loop(perf, pre, dshape, x, y, c, wl, sla.q, kind)
            yield cand(x, y, rate, ttft, tp_s, b, gate=False)  # judged on its own TTFT and TPOT
        return
    if problem.rate is not None:
        lam = problem.rate
        y = math.ceil(lam / per_dec)
        x = math.ceil(lam / per_pre)
        if x * gp + y * gd > n:
            return
        ttft = pre.latency(lam / (x * pre.mu), sla.q) + t_kv + tpot
        yield cand(x, y, lam, ttft, tpot, batch)
        return
    # throughput mode: the xPyD split that balances prefill and decode within n GPUs
    best: tuple[float, int, int, int] | None = None
    x_star = n * per_dec / (per_pre * gd + per_dec * gp)
    for x in {max(1, math.floor(x_star) + d) for d in (-1, 0, 1, 2)}:
        y_max = (n - x * gp) // gd
        if y_max < 1:
            continue
        y = min(y_max, max(1, math.ceil(x * per_pre / per_dec - 1e-9)))
        rate = min(x * per_pre, y * per_dec)
        key = (rate, -(x * gp + y * gd), x, y)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        return
    rate, _, x, y = best
    ttft = pre.latency(rate / (x * pre.mu), sla.q) + t_kv + tpot
    yield cand(x, y, rate, ttft, tpot, batch)


def agg_point(
    perf: Perf, shape: Shape, chunk: int, wl: Workload, q: float, b: float
) -> tuple[float, float, float, float]:
    """(tpot, ttft, requests/s, itl at quantile q) of one aggregated instance, b sequences per DP rank.

    Chunked prefill: the scheduler fills a step with up to r = min(chunk - b, isl) prompt tokens
    whenever prompts wait. To keep the batch full, b x isl / osl prompt tokens must be prefilled
    per decode token, so a share f = b x isl / (osl x r) of the steps carry a chunk and take
    t_mixed(b, r); the others take t_decode(b). A new prompt needs ceil(isl / (chunk - b)) such steps.
    """
    isl = wl.isl_eff
    room = chunk - b
    if room <= 0:
        return math.inf, math.inf, 0.0, math.inf
    r = min(room, isl)
    share = b * isl / (wl.osl * r)
    if share > 1:
        return math.inf, math.inf, 0.0, math.inf
    full = perf.mixed_step(shape, b, wl.ctx, r, isl)
    plain = perf.decode_step(shape, b, wl.ctx)
    tpot = share * full + (1 - share) * plain
    rho = share * full / tpot  # share of the time spent on prompt chunks
    if rho > RHO_MAX:
        return math.inf, math.inf, 0.0, math.inf
    service = math.ceil(isl / room) * full
    ttft = service + percentile_wait(rho, service, q)
    itl = full if share > 1 - q else plain
    return tpot, ttft, shape.pp * shape.dp * b / (wl.osl * tpot), itl


def disagg_closed_loop(
    perf: Perf, pre: PrefillRole, dshape: Shape, x: int, y: int, clients: float, wl: Workload, q: float, kind: str
) -> tuple[float, float, float, float]:
    """(ttft, tpot, requests/s, KV transfer s) of x prefill and y decode instances under `clients` clients.

    Closed loop (Little's law): clients = rate x (ttft + osl x tpot); prefill saturates at x mu.
    """
    t_kv = perf.kv_transfer_time(wl.isl, pre.shape, dshape, kind)
    tpot = perf.decode_step(dshape, clients / (y * dshape.pp * dshape.dp), wl.ctx)
    rate = clients / (pre.latency_one + t_kv + tpot + wl.osl * tpot)
    rate = min(rate, x * pre.mu * RHO_MAX)
    ttft = max(pre.latency(rate / (x * pre.mu), q) + t_kv + tpot, clients / rate - wl.osl * tpot)
    return ttft, tpot, rate, t_kv


def _aggregated(problem: Problem, perf: Perf, shape: Shape, chunk: int, batch: int) -> Iterator[Candidate]:
    wl, sla, n = problem.workload, problem.sla, problem.gpus
    if batch >= chunk or shape.gpus > n:
        return
    replicas_all = n // shape.gpus

    def cand(r: int, rate: float, ttft: float, tpot: float, itl: float, b: int) -> Candidate:
        return Candidate(
            mode="aggregated", weights=perf.prec.weights, kv_dtype=perf.prec.kv,
            decode=RolePlan(shape.tp, shape.pp, shape.dp, r, chunk, shape.pp * b), prefill=None, batch=b,
            ttft_ms=ttft * 1000, tpot_ms=tpot * 1000, request_rate=rate, output_tps=rate * wl.osl,
            gpus_used=r * shape.gpus, itl_ms=itl * 1000,
            meets_sla=sla.met(ttft * 1000, tpot * 1000, itl * 1000),
        )

    if problem.concurrency is not None:
        b_exact = problem.concurrency / (replicas_all * shape.pp * shape.dp)
        if _pow2_at_least(b_exact) != batch:
            return
        tpot, ttft, rate, itl = agg_point(perf, shape, chunk, wl, sla.q, b_exact)
        if rate > 0:
            yield cand(replicas_all, rate * replicas_all, ttft, tpot, itl, batch)
        return
    tpot, ttft, rate, itl = agg_point(perf, shape, chunk, wl, sla.q, batch)
    if rate <= 0:
        return
    if problem.rate is not None:
        r = math.ceil(problem.rate / rate)
        if r > replicas_all:
            return
        yield cand(r, problem.rate, ttft, tpot, itl, batch)
        return
    yield cand(replicas_all, rate * replicas_all, ttft, tpot, itl, batch)


def _candidates(problem: Problem, prec: Precision) -> Iterator[Candidate]:
    perf = Perf(problem.model, problem.gpu, problem.efficiency, prec)
    wl, n = problem.workload, problem.gpus
    if "aggregated" in problem.modes:
        for chunk in AGG_CHUNKS:
            for shape in role_shapes(perf, n, chunk):
                top = max_batch(perf, shape, wl, chunk)
                for b in BATCH_LADDER:
                    if b > top:
                        break
                    yield from _aggregated(problem, perf, shape, chunk, b)
    if "disaggregated" in problem.modes and n >= 2:
        m = prefill_budget(wl.isl_eff)
        pres = [prefill_role(perf, s, wl.isl_eff) for s in role_shapes(perf, n, m)
                if perf.kv_capacity_tokens(s, m, 256) >= m + wl.isl]
        decs = role_shapes(perf, n, 2048)
        for ds in decs:
            top = max_batch(perf, ds, wl, 2048)
            for pre in pres:
                if pre.shape.tp > ds.tp:
                    continue  # NIXL: decode TP must be >= prefill TP
                for b in BATCH_LADDER:
                    if b > top:
                        break
                    yield from _disagg(problem, perf, pre, ds, b)


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


def local_prefill_threshold(problem: Problem, c: Candidate, cap: int = 32768) -> int:
    """Prompt length below which prefilling on the decode instance beats shipping KV.

    Local prefill delays the running decode step by step(B + s) - step(B); the remote path costs
    the KV transfer of s tokens plus the per-request hop. The threshold is the first s where the
    delay exceeds the transfer: a faster link lowers it.
    """
    if c.prefill is None:
        return cap
    perf = Perf(problem.model, problem.gpu, problem.efficiency, Precision(c.weights, c.kv_dtype))
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
    from dataclasses import replace

    if c.prefill is None:
        return c
    thr = local_prefill_threshold(problem, c)
    d = c.decode
    tokens = _pow2_at_least(max(d.max_num_batched_tokens, d.max_num_seqs + min(thr, 16384)))
    same_tp = c.prefill.tp == d.tp and c.prefill.pp == d.pp == 1
    connector = "lmcache" if same_tp and problem.workload.multi_round_share >= LMCACHE_MULTI_ROUND else "nixl"
    decode = replace(d, max_num_batched_tokens=tokens)
    return replace(c, local_prefill_threshold=thr, connector=connector, decode=decode)


def search(problem: Problem) -> Result:
    weights = weight_choices(problem.model, problem.gpu, problem.weights)
    notes: list[str] = []
    if not weights:
        notes.append("no weight precision applies to this model and GPU with the given --quantization")
    cands: list[Candidate] = []
    for w in weights:
        for kv in problem.kv_dtypes:
            cands.extend(_candidates(problem, Precision(w, kv)))
    ok = [c for c in cands if c.meets_sla]
    front = pareto(ok if ok else cands)
    best: Candidate | None = None
    if ok:
        def score(c: Candidate) -> tuple[float, float, float]:
            return (c.tps_per_gpu, c.output_tps, c.tps_per_user)

        agg = [c for c in ok if c.mode == "aggregated"]
        dis = [c for c in ok if c.mode == "disaggregated"]
        best_agg = max(agg, key=score) if agg else None
        best_dis = max(dis, key=score) if dis else None
        if best_dis and problem.workload.multi_round_share >= LMCACHE_MULTI_ROUND:
            # LMCache (P/D plus CPU offload of earlier rounds) needs equal TP: worth a 10% cost
            same = [c for c in dis if c.prefill and c.prefill.tp == c.decode.tp and c.prefill.pp == c.decode.pp == 1]
            alt = max(same, key=score) if same else None
            if alt and alt.tps_per_gpu * DISAGG_MARGIN >= best_dis.tps_per_gpu:
                best_dis = alt
        if best_agg and best_dis:
            best = best_dis if best_dis.tps_per_gpu > DISAGG_MARGIN * best_agg.tps_per_gpu else best_agg
        else:
            best = best_agg or best_dis
        best = _finish(problem, best) if best else None
        front = [best if best and _same(c, best) else c for c in front]
    elif cands:
        notes.append("no candidate meets the SLA; the table shows the closest ones")
    else:
        notes.append("the model does not fit on these GPUs with any layout")
    thr = best.local_prefill_threshold if best else None
    if thr is not None and thr >= problem.workload.isl:
        notes.append(
            f"typical prompts ({problem.workload.isl} tokens) are below the local-prefill threshold "
            f"({thr}): most requests would prefill on decode"
        )
    if best and best.weights == "nvfp4":
        notes.append("NVFP4 needs an NVFP4 checkpoint (quantization modelopt_fp4), e.g. from nvidia/ on the Hub")
    return Result(problem, cands, front, best, notes)


def _same(a: Candidate, b: Candidate) -> bool:
    return (a.mode, a.weights, a.kv_dtype, a.batch, a.decode.shape, a.decode.replicas,
            a.prefill.shape if a.prefill else None, a.prefill.replicas if a.prefill else None) == (
        b.mode, b.weights, b.kv_dtype, b.batch, b.decode.shape, b.decode.replicas,
        b.prefill.shape if b.prefill else None, b.prefill.replicas if b.prefill else None)
