"""Sizing v2: pooled queueing, the three arms and the verdict, budget GPUs, KV links, mixed fleets."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from disaggctl.catalog import CATALOG
from disaggctl.sizing.candidates import Pair
from disaggctl.sizing.hardware import load_gpu
from disaggctl.sizing.perf import DEFAULT_EFFICIENCY, ModelInfo, Perf, Precision, Shape
from disaggctl.sizing.plan import Pool
from disaggctl.sizing.queueing import SERVICE_CV2, erlang_c, wait_quantile
from disaggctl.sizing.roles import Workload, agg_point, max_batch, prefill_role
from disaggctl.sizing.search import DISAGG_MARGIN, Problem, Sla, search


def _model(key: str) -> ModelInfo:
    e = CATALOG[key]
    return ModelInfo(e.key, e.hub_id, e.architecture, e.key)


def _problem(model: str = "llama-3.1-70b", gpu: str = "b200", gpus: int = 16, isl: int = 4096, osl: int = 512,
             **kw: object) -> Problem:
    sla = kw.pop("sla", Sla(2000, 50))
    return Problem(_model(model), load_gpu(gpu), gpus, Workload(isl, osl), sla,  # type: ignore[arg-type]
                   DEFAULT_EFFICIENCY[gpu], **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- queueing


def test_erlang_c_matches_textbook_values() -> None:
    assert erlang_c(1, 0.7) == pytest.approx(0.7)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # M/M/2 at a = 1 Erlang
    assert erlang_c(10, 5.0) == pytest.approx(0.0361, abs=5e-4)  # Erlang C tables
    assert erlang_c(4, 0.0) == 0.0 and erlang_c(4, 4.0) == 1.0


def test_one_server_is_the_old_mm1_percentile_scaled_by_allen_cunneen() -> None:
    rho, s, q = 0.8, 0.2, 0.9
    mm1 = s * math.log(rho / (1 - q)) / (1 - rho)
    assert wait_quantile(1, rho, s, q) == pytest.approx(mm1 * (1 + SERVICE_CV2) / 2)
    assert wait_quantile(1, 0.05, s, q) == 0.0  # fewer than 10% wait at all
    assert wait_quantile(1, 1.0, s, q) == math.inf


def test_a_pool_runs_fuller_than_separate_queues_at_the_same_percentile() -> None:
    p = _problem()
    perf = Perf(p.model, p.gpu, p.efficiency, Precision("fp8", "fp8"))
    pre = prefill_role(perf, Shape(2), 4096)
    budget = pre.latency_one * 3
    one = pre.capacity(budget, 0.9, 1)
    assert one > 0
    for x in (2, 4, 8, 16):
        pooled = pre.capacity(budget, 0.9, x)
        assert pooled > x * one  # pooling gain
        assert pre.latency(pooled / (x * pre.mu), 0.9, x) <= budget * 1.001
        assert pooled <= x * pre.mu  # never above the servers' capacity


# --------------------------------------------------------------------------- model


def test_kv_is_sized_by_the_average_live_sequence() -> None:
    p = _problem(isl=8192, osl=4096)
    perf = Perf(p.model, p.gpu, p.efficiency, Precision("fp8", "fp8"))
    cap = perf.kv_capacity_tokens(Shape(2), 2048, 1024)
    assert max_batch(perf, Shape(2), p.workload, 2048) == min(1024, int(cap // (8192 + 2048)))


def test_batches_are_not_limited_to_powers_of_two() -> None:
    r = search(_problem())
    assert r.best is not None
    pow2 = {float(1 << i) for i in range(12)}
    assert any(c.batch not in pow2 for c in r.candidates if c.meets_sla)
    # the recommended batch is the largest that meets the SLA: one more sequence breaks it
    b = r.best
    if b.prefill is None:
        perf = Perf(r.problem.model, r.problem.gpu, r.problem.efficiency, Precision(b.weights, b.kv_dtype))
        more = agg_point(perf, b.decode.shape, b.decode.max_num_batched_tokens, r.problem.workload, 0.9,
                         b.batch * 1.1, b.decode.replicas)
        assert more[2] == 0 or not r.problem.sla.met(more[1] * 1000, more[0] * 1000, more[3] * 1000)


def test_a_long_prompt_with_a_short_output_still_has_an_aggregated_layout() -> None:
    r = search(_problem(isl=32000, osl=16, sla=Sla(20000, 50)))
    assert r.arms is not None and (r.arms.aggregated or r.arms.replicated)


# --------------------------------------------------------------------------- arms and verdict


def test_three_arms_and_a_verdict_with_its_margin() -> None:
    r = search(_problem())
    a = r.arms
    assert a is not None and a.aggregated and a.replicated and a.disaggregated
    assert a.aggregated.decode.replicas == 1 and a.aggregated.prefill is None
    assert a.replicated.decode.replicas > 1 and a.replicated.prefill is None
    assert a.disaggregated.prefill is not None
    best_agg = max(a.aggregated.tps_per_gpu, a.replicated.tps_per_gpu)
    assert a.ratio is not None
    assert a.ratio == pytest.approx(a.disaggregated.tps_per_gpu / best_agg)
    assert f"{a.ratio:.2f}x" in a.verdict
    assert ("does not pay" in a.verdict) == (a.ratio <= 1)
    assert r.best is not None
    assert (r.best.mode == "disaggregated") == (a.ratio > DISAGG_MARGIN)
    assert set(a.to_dict()) >= {"aggregated", "replicated_aggregated", "disaggregated", "verdict"}


def test_throughput_is_per_gpu_of_the_budget() -> None:
    r = search(_problem(gpus=12))
    assert r.candidates
    for c in r.candidates:
        assert c.budget == 12 and c.gpus_used <= 12
        assert c.tps_per_gpu == pytest.approx(c.output_tps / 12)
    # a layout that leaves GPUs idle is charged for them
    idle = [c for c in r.candidates if c.gpus_used < 12]
    assert idle and all(c.tps_per_gpu < c.output_tps / c.gpus_used for c in idle)


def test_three_gpus_are_all_used_when_that_is_faster() -> None:
    r = search(_problem("llama-3.1-8b", "h100", 3, 4096, 256))
    assert r.arms is not None and r.arms.disaggregated is not None
    assert r.arms.disaggregated.gpus_used == 3


def test_prompts_below_the_local_prefill_threshold_are_not_sold_as_disaggregated() -> None:
    r = search(_problem("llama-3.1-8b", "h100", 8, 1, 1))
    assert r.best is not None and r.best.mode == "aggregated"
    assert any("would not run disaggregated" in n for n in r.notes)


# --------------------------------------------------------------------------- KV links


def test_kv_moves_over_nvlink_inside_a_domain_and_over_the_nic_across() -> None:
    p = _problem(gpus=16)  # two 8-GPU HGX domains
    perf = Perf(p.model, p.gpu, p.efficiency, Precision("fp8", "fp8"))
    pool = p.pools[0]
    pair = Pair(p, pool, pool, perf, perf)
    assert pair.link(2, 2, 2, 2) == "nvlink"  # 8 GPUs: one domain
    assert pair.link(6, 2, 2, 2) == "nvlink"  # 3P1D of TP2 in each domain
    assert pair.link(3, 4, 1, 4) == "nic"  # the second domain has no decode instance
    assert pair.link(1, 8, 1, 8) == "nic"  # one instance fills a domain
    nvl72 = replace(p, gpu=load_gpu("gb200"), gpus=72)
    pool72 = nvl72.pools[0]
    assert Pair(nvl72, pool72, pool72, perf, perf).link(36, 1, 9, 4) == "nvlink"
    r = search(p)
    assert all(c.kv_link in ("nvlink", "nic") for c in r.candidates if c.prefill)
    assert any(c.kv_link == "nvlink" and c.gpus_used > 8 for c in r.candidates if c.prefill)


# --------------------------------------------------------------------------- mixed fleets


def _mixed(prefill_on: str | None = "b200", **kw: object) -> Problem:
    h200 = Pool(load_gpu("h200"), 16, DEFAULT_EFFICIENCY["h200"])
    return _problem(gpu="b200", gpus=8, isl=8192, osl=512, second=h200, prefill_on=prefill_on,
                    **kw)  # type: ignore[arg-type]


def test_mixed_fleet_prefills_on_one_type_and_decodes_on_the_other() -> None:
    r = search(_mixed(modes=("disaggregated",)))
    b = r.best
    assert b is not None and b.prefill is not None
    assert (b.prefill.gpu, b.decode.gpu) == ("b200", "h200")
    assert b.kv_link == "nic" and b.budget == 24
    assert b.prefill.gpus <= 8 and b.decode.gpus <= 16
    assert any("disaggctl validate" in n and "same KV-cache dtype" in n for n in r.notes)


def test_mixed_fleet_replicated_arm_uses_both_gpu_types() -> None:
    r = search(_mixed(prefill_on=None, modes=("aggregated",)))
    assert r.arms is not None and r.arms.replicated is not None
    both = r.arms.replicated
    assert both.also is not None and {both.decode.gpu, both.also.gpu} == {"b200", "h200"}
    assert both.gpus_used > 16 and both.tps_per_gpu == pytest.approx(both.output_tps / 24)


def test_nvfp4_is_not_offered_when_one_role_is_hopper() -> None:
    r = search(_mixed())
    assert r.candidates and all(c.weights != "nvfp4" for c in r.candidates)


def test_prefill_peak_depends_on_generation_and_precision() -> None:
    from disaggctl.sizing.perf import LOW_PRECISION_FACTOR

    for gpu, gen in (("h100", "hopper"), ("b200", "blackwell"), ("gb200", "blackwell")):
        g = load_gpu(gpu)
        eff = DEFAULT_EFFICIENCY[gpu]
        for weights, compute in (("bf16", "bf16"), ("fp8", "fp8")):
            perf = Perf(_model("llama-3.1-70b"), g, eff, Precision(weights, "bf16"))
            assert perf.peak == pytest.approx(g.peak_flops(compute) * eff.compute * LOW_PRECISION_FACTOR[gen][compute])
            assert perf.peak < g.peak_flops(compute)
    # GB200 reaches a smaller share of its peak in prefill than B200 (docs/sizing.md: the reference data)
    assert DEFAULT_EFFICIENCY["gb200"].compute < DEFAULT_EFFICIENCY["b200"].compute


def test_a_step_is_between_the_roofline_and_the_sum_of_its_parts() -> None:
    p = _problem("llama-3.1-8b", "h100", 8)
    perf = Perf(p.model, p.gpu, p.efficiency, Precision("bf16", "bf16"))
    shape = Shape(1)
    for batch in (1, 64, 512):
        ctx = 1024.0
        kv = (batch * ctx + batch) * perf.kv_token / perf.kv_shards(shape)
        mem = (perf.weights_read(shape, batch) + kv) / perf.bw
        comp = (batch * perf.flops_per_token + 2 * perf.attn_coef * ctx * batch) / perf.peak
        fixed = perf.comm_time(shape, batch) + 0.4e-3
        t = perf.decode_step(shape, batch, ctx)
        assert max(mem, comp) + fixed < t <= mem + comp + fixed + 1e-12 or min(mem, comp) == 0
