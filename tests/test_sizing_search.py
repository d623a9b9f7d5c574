"""The sizing search: SLA filter, Pareto front, xPyD ratios, NVFP4 rules and the local-prefill threshold."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disaggctl.catalog import CATALOG
from disaggctl.sizing.errors import CapacityError, SlaUnreachableError
from disaggctl.sizing.hardware import PROFILE_OF, load_gpu
from disaggctl.sizing.outcome import check_outcome
from disaggctl.sizing.perf import DEFAULT_EFFICIENCY, ModelInfo, Perf, Precision
from disaggctl.sizing.search import (
    Candidate,
    Problem,
    Sla,
    Workload,
    floors,
    local_prefill_threshold,
    pareto,
    search,
)


def _model(key: str) -> ModelInfo:
    e = CATALOG[key]
    return ModelInfo(e.key, e.hub_id, e.architecture, e.key)


def _problem(model: str = "llama-3.1-70b", gpu: str = "b200", gpus: int = 16, isl: int = 1024, osl: int = 1024,
             **kw: object) -> Problem:
    g = load_gpu(gpu)
    sla = kw.pop("sla", Sla(2000, 50))
    return Problem(_model(model), g, gpus, Workload(isl, osl, float(kw.pop("share", 0.0))),  # type: ignore[arg-type]
                   sla, DEFAULT_EFFICIENCY[gpu], **kw)  # type: ignore[arg-type]


def _ratio(c: Candidate) -> float:
    assert c.prefill is not None
    return c.prefill.gpus / c.decode.gpus


def test_recommendation_meets_the_sla_and_is_on_the_front() -> None:
    r = search(_problem())
    assert r.best is not None and r.best.meets_sla
    assert r.best.ttft_ms <= 2000 and r.best.tpot_ms <= 50
    assert any(c is r.best for c in r.pareto)
    assert r.best.gpus_used <= 16


def test_pareto_front_has_no_dominated_point() -> None:
    r = search(_problem(isl=4096, osl=512))
    front = r.pareto
    assert len(front) >= 3
    for a in front:
        for b in r.candidates:
            if b.meets_sla:
                assert not (b.tps_per_gpu > a.tps_per_gpu * 1.001 and b.tps_per_user > a.tps_per_user * 1.001)
    # sorted from the most interactive to the most efficient
    assert [c.tps_per_user for c in front] == sorted((c.tps_per_user for c in front), reverse=True)
    assert pareto([]) == []


@pytest.mark.parametrize(("model", "gpu", "gpus"), [("llama-3.1-70b", "b200", 16), ("llama-3.1-8b", "h100", 8),
                                                    ("qwen3-32b", "h200", 16), ("llama-3.1-70b", "gb200", 36)])
def test_summarization_gets_more_prefill_than_chat(model: str, gpu: str, gpus: int) -> None:
    summ = search(_problem(model, gpu, gpus, 8192, 256, modes=("disaggregated",))).best
    chat = search(_problem(model, gpu, gpus, 1024, 1024, modes=("disaggregated",))).best
    assert summ is not None and chat is not None
    assert _ratio(summ) > _ratio(chat)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(sorted(CATALOG)), st.sampled_from(["h100", "h200"]), st.sampled_from([8, 16, 32]),
    st.integers(64, 16384), st.integers(16, 2048),
)
def test_nvfp4_is_never_recommended_on_hopper(model: str, gpu: str, gpus: int, isl: int, osl: int) -> None:
    r = search(_problem(model, gpu, gpus, isl, osl, sla=Sla(10000, 200)))
    assert all(c.weights != "nvfp4" for c in r.candidates)
    assert r.best is None or r.best.weights != "nvfp4"


def test_nvfp4_is_considered_on_blackwell() -> None:
    r = search(_problem(gpu="b200"))
    assert any(c.weights == "nvfp4" for c in r.candidates)
    only_fp8 = search(_problem(gpu="b200", weights=("fp8",)))
    assert only_fp8.best is not None and {c.weights for c in only_fp8.candidates} == {"fp8"}


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(sorted(CATALOG)), st.sampled_from(sorted(PROFILE_OF)), st.sampled_from([8, 16, 24, 72]),
    st.integers(128, 32768), st.integers(16, 4096),
)
def test_no_candidate_beats_the_hardware(model: str, gpu: str, gpus: int, isl: int, osl: int) -> None:
    p = _problem(model, gpu, gpus, isl, osl)
    g = p.gpu
    m = p.model.arch
    for c in search(p).candidates:
        bits = Precision(c.weights, c.kv_dtype).weight_bits
        params = m.active_b if p.model.moe else m.params_b
        inst = c.decode.shape.gpus
        assert c.tpot_ms / 1000 >= params * 1e9 * bits / 8 / (inst * g.hbm_bytes_per_s)
        pre = c.prefill.shape.gpus if c.prefill else inst
        peak = max(g.bf16_tflops, g.fp8_tflops, g.fp4_tflops) * 1e12
        assert c.ttft_ms / 1000 >= 2 * m.active_b * 1e9 * p.workload.isl_eff / (pre * peak)
        assert c.gpus_used <= gpus


def test_local_prefill_threshold_falls_as_the_link_gets_faster() -> None:
    p = _problem(modes=("disaggregated",))
    best = search(p).best
    assert best is not None and best.prefill is not None and best.kv_link == "nic"
    thresholds = []
    for nic in (50, 100, 200, 400, 800, 1600):
        q = replace(p, gpu=p.gpu.with_links(nic_gbps=nic))
        thresholds.append(local_prefill_threshold(q, best))
    assert thresholds == sorted(thresholds, reverse=True)
    assert thresholds[0] > thresholds[-1]
    # NVLink (one NVL72 domain) is faster still
    nvl = local_prefill_threshold(p, replace(best, kv_link="nvlink"))
    assert nvl <= thresholds[-1]


def test_local_prefill_wins_exactly_below_the_threshold() -> None:
    p = _problem(modes=("disaggregated",))
    c = search(p).best
    assert c is not None and c.prefill is not None and c.kv_link is not None
    thr = local_prefill_threshold(p, c)
    perf = Perf(p.model, p.gpu, p.efficiency, Precision(c.weights, c.kv_dtype))
    ctx = p.workload.ctx
    base = perf.decode_step(c.decode.shape, c.batch, ctx)

    def local_delay(s: int) -> float:
        return perf.mixed_step(c.decode.shape, c.batch, ctx, s, s) - base

    def remote(s: int) -> float:
        return perf.kv_transfer_time(s, c.prefill.shape, c.decode.shape, c.kv_link)  # type: ignore[union-attr,arg-type]

    assert 16 < thr < 32768
    assert local_delay(thr) > remote(thr)
    assert all(local_delay(s) <= remote(s) for s in range(16, thr, 16))


def test_prefill_chunks_stall_aggregated_decoding_and_an_itl_target_prefers_disaggregation() -> None:
    loose = search(_problem(isl=8192, osl=256)).best
    assert loose is not None and loose.mode == "aggregated"
    assert loose.itl_ms > loose.tpot_ms  # steps that carry an 8k prompt's chunk take longer
    # at p99 nearly every sequence meets a chunked step; disaggregated decode never carries one
    tight = search(_problem(isl=8192, osl=256, sla=Sla(2000, 50, 99, loose.itl_ms * 0.5))).best
    assert tight is not None and tight.mode == "disaggregated"
    assert tight.itl_ms <= loose.itl_ms * 0.5


def test_recommended_disaggregated_layout_fills_the_router_and_limits() -> None:
    r = search(_problem(isl=8192, osl=256, sla=Sla(2000, 50, 99, 25)))
    b = r.best
    assert b is not None and b.mode == "disaggregated" and b.prefill is not None
    assert b.local_prefill_threshold is not None and b.connector == "nixl"
    assert b.decode.tp >= b.prefill.tp  # NIXL's rule
    assert b.prefill.max_num_batched_tokens >= 8192
    assert b.decode.max_num_batched_tokens >= b.decode.max_num_seqs + min(b.local_prefill_threshold, 16384)
    assert b.decode.max_num_seqs >= b.batch


def test_multi_round_traffic_with_equal_tp_uses_lmcache() -> None:
    r = search(_problem(isl=4096, osl=256, share=0.8, modes=("disaggregated",)))
    b = r.best
    assert b is not None and b.prefill is not None
    assert b.connector == "lmcache" and b.prefill.tp == b.decode.tp and b.decode.pp == 1
    # reused prefixes need less prefill than the same prompts without reuse
    fresh = search(_problem(isl=4096, osl=256, modes=("disaggregated",))).best
    assert fresh is not None and fresh.connector == "nixl" and _ratio(b) < _ratio(fresh)


def test_rate_mode_serves_the_rate_within_the_gpus() -> None:
    r = search(_problem(rate=20.0))
    assert r.best is not None
    assert all(c.request_rate == 20.0 and c.gpus_used <= 16 for c in r.candidates)
    huge = _problem(rate=1e6)
    r_huge = search(huge)
    assert r_huge.best is None and not r_huge.candidates
    with pytest.raises(CapacityError, match=r"load beyond capacity: --rate 1e\+06 req/s, but 16 x b200 serve at most"):
        check_outcome(huge, r_huge)


def test_concurrency_mode_follows_littles_law() -> None:
    r = search(_problem(concurrency=64))
    assert r.candidates
    for c in r.candidates:
        if c.mode == "disaggregated":
            # clients = rate x (mean ttft + osl x tpot); the reported TTFT is a p90, so at least that
            assert c.request_rate * (c.ttft_ms + 1024 * c.tpot_ms) / 1000 >= 64 * 0.999
            assert c.request_rate <= 64 / (1024 * c.tpot_ms / 1000)


def test_tighter_tpot_target_gives_more_tokens_per_user() -> None:
    loose = search(_problem(sla=Sla(2000, 50))).best
    tight = search(_problem(sla=Sla(2000, 8))).best
    assert loose is not None and tight is not None
    assert tight.tpot_ms <= 8 < loose.tpot_ms
    assert tight.tps_per_gpu < loose.tps_per_gpu


def test_impossible_sla_reports_the_best_achievable_latencies() -> None:
    p = _problem(sla=Sla(1, 0.5))
    r = search(p)
    assert r.best is None and r.pareto and all(not c.meets_sla for c in r.pareto)
    ttft, tpot = floors(p)
    assert 1 < ttft < 2000 and 0.5 < tpot < 50
    with pytest.raises(SlaUnreachableError, match=rf"best achievable .* TTFT {ttft:.0f} ms and TPOT {tpot:.1f} ms"):
        check_outcome(p, r)
    assert SlaUnreachableError.exit_code == 4


def test_moe_model_gets_expert_parallel_shapes() -> None:
    r = search(_problem("deepseek-v3", "gb200", 72, 4096, 1024))
    assert r.best is not None
    assert any(c.decode.dp > 1 for c in r.candidates)
    assert r.best.weights in ("fp8", "nvfp4")  # an FP8 checkpoint is never served as BF16
