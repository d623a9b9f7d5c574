"""Writing a recommendation as a spec: every shape the planner can produce must load."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from disaggctl.catalog import CATALOG
from disaggctl.loader import load_text
from disaggctl.sizing.fragment import build_spec, deployment_name, model_path, render, spec_quantization
from disaggctl.sizing.hardware import PROFILE_OF, load_gpu
from disaggctl.sizing.perf import DEFAULT_EFFICIENCY, ModelInfo
from disaggctl.sizing.search import Candidate, Problem, RolePlan, Sla, Workload, local_prefill_threshold, search


def _model(key: str) -> ModelInfo:
    e = CATALOG[key]
    return ModelInfo(e.key, e.hub_id, e.architecture, e.key)


def _cand(
    prefill: RolePlan | None, decode: RolePlan, connector: str | None = "nixl", weights: str = "fp8"
) -> Candidate:
    return Candidate(mode="disaggregated" if prefill else "aggregated", weights=weights, kv_dtype="fp8",
                     decode=decode, prefill=prefill, batch=decode.max_num_seqs, ttft_ms=100, tpot_ms=20,
                     request_rate=10, output_tps=1000, gpus_used=decode.gpus + (prefill.gpus if prefill else 0),
                     local_prefill_threshold=256 if prefill else None, connector=connector if prefill else None)


def test_wide_lmcache_deployments_get_port_ranges_that_do_not_overlap() -> None:
    c = _cand(RolePlan(2, 1, 1, 40, 8192, 16), RolePlan(2, 1, 1, 64, 2048, 128), connector="lmcache")
    spec = build_spec(_model("llama-3.1-8b"), load_gpu("h100"), Workload(4096, 256, 0.8), c)
    kv = spec["kv_transfer"]
    assert kv["alloc_port"] - kv["init_port"] >= 128 and kv["proxy_port"] - kv["alloc_port"] >= 128
    loaded = load_text(render(spec, "test"), "sized.yaml")
    assert loaded.spec.kv_transfer.kind == "lmcache" and loaded.spec.kv_offload.enabled
    assert loaded.spec.prefill.enable_prefix_caching and loaded.spec.decode.enable_prefix_caching


def test_moe_with_data_parallel_gets_expert_parallel_on_an_nvl72_rack() -> None:
    c = _cand(RolePlan(1, 1, 8, 2, 8192, 16), RolePlan(2, 1, 8, 2, 2048, 64), weights="nvfp4")
    model = _model("deepseek-v3")
    spec = build_spec(model, load_gpu("gb200"), Workload(4096, 1024), c)
    loaded = load_text(render(spec, "x"), "ds.yaml")
    s = loaded.spec
    assert s.prefill.expert_parallel and s.decode.expert_parallel and s.prefill.data_parallel == 8
    assert str(s.model.quantization) == "modelopt_fp4" and s.model.path == "nvidia/DeepSeek-V3-FP4"
    assert len(s.hosts) == 12 and {h.nvlink_domain for h in s.hosts} == {"nvl72-0"}
    assert s.profiles == ["gb200-nvl72"] and s.hardware.nvlink_domain_gpus == 72


def test_native_checkpoint_precisions_need_no_quantization_flag() -> None:
    assert spec_quantization(_model("deepseek-v3"), "fp8") == "none"  # an FP8 checkpoint
    assert spec_quantization(_model("llama-3.1-70b"), "fp8") == "fp8"  # online FP8
    assert spec_quantization(_model("gpt-oss-120b"), "mxfp4") == "none"
    assert spec_quantization(_model("llama-3.1-70b"), "bf16") == "none"
    assert model_path(_model("llama-3.1-70b"), "fp8") == "meta-llama/Llama-3.1-70B-Instruct"


def test_deployment_names_are_valid_spec_names() -> None:
    odd = ModelInfo("/models/My_Model.v2", "/models/My_Model.v2", CATALOG["llama-3.1-8b"].architecture)
    name = deployment_name(odd, load_gpu("b300"))
    assert name == "my-model-v2-b300"
    assert deployment_name(_model("llama-3.1-405b"), load_gpu("gb300")) == "llama-3-1-405b-gb300"


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(sorted(CATALOG)), st.sampled_from(sorted(PROFILE_OF)), st.sampled_from([8, 16, 32, 72]),
       st.integers(256, 16384), st.integers(16, 2048), st.floats(0, 1))
def test_every_recommendation_loads_as_a_spec(model: str, gpu: str, gpus: int, isl: int, osl: int,
                                              share: float) -> None:
    m, g = _model(model), load_gpu(gpu)
    wl = Workload(isl, osl, share)
    r = search(Problem(m, g, gpus, wl, Sla(5000, 100), DEFAULT_EFFICIENCY[gpu]))
    best = r.best or (r.pareto[-1] if r.pareto else None)
    if best is None:
        return  # nothing fits: the CLI refuses to write a spec
    loaded = load_text(render(build_spec(m, g, wl, best), "x"), "sized.yaml")
    assert loaded.spec.decode.replicas == best.decode.replicas
    assert str(loaded.spec.model.quantization) != "modelopt_fp4" or g.blackwell


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(sorted(CATALOG)), st.sampled_from(["h100", "b200", "b300"]),
       st.integers(512, 8192), st.integers(64, 1024))
def test_threshold_never_rises_with_a_faster_nic(model: str, gpu: str, isl: int, osl: int) -> None:
    m, g = _model(model), load_gpu(gpu)
    p = Problem(m, g, 32, Workload(isl, osl), Sla(1e6, 1e6), DEFAULT_EFFICIENCY[gpu], modes=("disaggregated",))
    c = search(p).best
    if c is None:
        return
    last = None
    for nic in (25, 100, 400, 1600, 6400):
        t = local_prefill_threshold(replace(p, gpu=g.with_links(nic_gbps=nic)), c)
        assert last is None or t <= last
        last = t
