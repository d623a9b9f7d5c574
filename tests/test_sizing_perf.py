"""The sizing performance model: published KV sizes and the physical limits no prediction may beat."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disaggctl.catalog import CATALOG, lookup
from disaggctl.sizing.hardware import PROFILE_OF, GpuSpec, gpu_key_from_name, load_gpu
from disaggctl.sizing.perf import DEFAULT_EFFICIENCY, Efficiency, ModelInfo, Perf, Precision, Shape
from disaggctl.sizing.search import tp_choices, weight_choices

KIB = 1024


def _model(key: str) -> ModelInfo:
    e = CATALOG[key]
    return ModelInfo(e.key, e.hub_id, e.architecture, e.key)


@pytest.mark.parametrize(
    ("model", "kib"),
    [("llama-3.1-8b", 128), ("llama-3.1-70b", 320), ("llama-3.1-405b", 504), ("qwen3-32b", 256)],
)
def test_kv_bytes_per_token_match_published_sizes(model: str, kib: int) -> None:
    arch = CATALOG[model].architecture
    assert arch.kv_bytes_per_token(2.0) == kib * KIB  # BF16
    assert arch.kv_bytes_per_token(1.0) == kib * KIB / 2  # FP8 halves it
    perf = Perf(_model(model), load_gpu("b200"), DEFAULT_EFFICIENCY["b200"], Precision("bf16", "bf16"))
    assert perf.kv_token == kib * KIB


def test_kv_transfer_of_a_long_70b_prompt_matches_the_reference_numbers() -> None:
    # REFERENCE.md: a 32k-token 70B prompt is ~10.7 GB: ~215 ms at 400 Gb/s over one link
    gpu = load_gpu("b200")
    perf = Perf(_model("llama-3.1-70b"), gpu, Efficiency(0.5, 0.7, link=1.0), Precision("bf16", "bf16"))
    t = perf.kv_transfer_time(32768, Shape(1), Shape(1), "nic")
    assert 0.210 < t - 0.001 < 0.220
    assert perf.kv_transfer_time(32768, Shape(1), Shape(1), "nvlink") < t / 10


def test_gpu_numbers_come_from_the_profiles() -> None:
    h100, gb200 = load_gpu("h100"), load_gpu("gb200")
    assert (h100.hbm_gb, h100.hbm_tbps, h100.bf16_tflops, h100.fp4_tflops) == (80, 3.35, 989, 0)
    assert gb200.profile == "gb200-nvl72" and gb200.nvlink_domain_gpus == 72 and gb200.blackwell
    assert not h100.blackwell
    assert set(PROFILE_OF) == {"h100", "h200", "b200", "b300", "gb200", "gb300"}


@pytest.mark.parametrize(
    ("name", "key"),
    [("NVIDIA GB200", "gb200"), ("NVIDIA B200", "b200"), ("NVIDIA H100 80GB HBM3", "h100"),
     ("NVIDIA H200", "h200"), ("NVIDIA GB300", "gb300"), ("NVIDIA B300 SXM6 AC", "b300"), ("Tesla T4", None)],
)
def test_gpu_key_from_nvml_name(name: str, key: str | None) -> None:
    assert gpu_key_from_name(name) == key


def test_efficiency_must_be_a_share() -> None:
    with pytest.raises(ValueError, match="compute"):
        Efficiency(compute=1.2, memory=0.5)
    with pytest.raises(ValueError, match="memory"):
        Efficiency(compute=0.5, memory=0)


# --------------------------------------------------------------------------- physical limits

PEAK = {"bf16": "bf16", "fp8": "fp8", "nvfp4": "fp4"}


def _peak(gpu: GpuSpec, weights: str) -> float:
    """Dense peak of the precision the weights are computed in (written out here, not taken from perf)."""
    if weights == "mxfp4":
        return gpu.peak_flops("fp4") if gpu.blackwell else gpu.peak_flops("bf16")
    return gpu.peak_flops(PEAK[weights])


@st.composite
def setups(draw: st.DrawFn) -> tuple[ModelInfo, GpuSpec, Efficiency, Precision, Shape]:
    model = _model(draw(st.sampled_from(sorted(CATALOG))))
    gpu = load_gpu(draw(st.sampled_from(sorted(PROFILE_OF))))
    eff = Efficiency(
        compute=draw(st.floats(0.01, 1.0)), memory=draw(st.floats(0.01, 1.0)), link=draw(st.floats(0.05, 1.0))
    )
    prec = Precision(draw(st.sampled_from(weight_choices(model, gpu))), draw(st.sampled_from(["bf16", "fp8"])))
    tp = draw(st.sampled_from(tp_choices(model, gpu, 72)))
    pp = draw(st.sampled_from([1, 2, 4]))
    dp = draw(st.sampled_from([1, 2, 4, 8])) if model.moe else 1
    return model, gpu, eff, prec, Shape(tp, pp, dp)


@settings(max_examples=300, deadline=None)
@given(setups(), st.integers(1, 131072), st.integers(1, 16), st.sampled_from([2048, 8192, 16384, 32768]))
def test_prefill_is_never_faster_than_peak_flops_allow(
    setup: tuple[ModelInfo, GpuSpec, Efficiency, Precision, Shape], isl: int, prompts: int, chunk: int
) -> None:
    model, gpu, eff, prec, shape = setup
    perf = Perf(model, gpu, eff, prec)
    flops = 2 * model.arch.active_b * 1e9 * isl * prompts
    bound = flops / (shape.gpus * _peak(gpu, prec.weights))
    assert perf.prefill_time(shape, isl, prompts, chunk) >= bound


@settings(max_examples=300, deadline=None)
@given(setups(), st.floats(1, 1024), st.floats(1, 131072))
def test_a_decode_step_is_never_faster_than_reading_the_weights_once(
    setup: tuple[ModelInfo, GpuSpec, Efficiency, Precision, Shape], batch: float, ctx: float
) -> None:
    model, gpu, eff, prec, shape = setup
    perf = Perf(model, gpu, eff, prec)
    # a dense model reads all of its weights each step; an MoE at least its active ones
    params = model.arch.active_b if model.moe else model.arch.params_b
    weights = params * 1e9 * prec.weight_bits / 8
    bound = weights / (shape.gpus * gpu.hbm_bytes_per_s)
    assert perf.decode_step(shape, batch, ctx) >= bound
    # and never faster than its FLOPs allow either
    assert perf.decode_step(shape, batch, ctx) >= 2 * model.arch.active_b * 1e9 * batch / (
        shape.tp * _peak(gpu, prec.weights))


@settings(max_examples=100, deadline=None)
@given(setups(), st.integers(16, 65536))
def test_kv_transfer_is_never_faster_than_the_links(
    setup: tuple[ModelInfo, GpuSpec, Efficiency, Precision, Shape], isl: int
) -> None:
    model, gpu, eff, prec, shape = setup
    perf = Perf(model, gpu, eff, prec)
    size = isl * model.arch.kv_bytes_per_token(prec.kv_bytes)
    for kind, rate in (("nic", gpu.nic_gbps * 1e9 / 8), ("nvlink", gpu.nvlink_gbps * 1e9)):
        assert perf.kv_transfer_time(isl, shape, shape, kind) >= size / (shape.tp * rate)


def test_memory_fit_refuses_a_model_larger_than_the_gpus() -> None:
    perf = Perf(_model("llama-3.1-405b"), load_gpu("h100"), DEFAULT_EFFICIENCY["h100"], Precision("bf16", "bf16"))
    # 405B in BF16 is 812 GB: not on one 80 GB GPU, nor on eight
    assert perf.kv_capacity_tokens(Shape(1), 8192, 256) == 0
    assert perf.kv_capacity_tokens(Shape(8), 8192, 256) == 0
    assert perf.kv_capacity_tokens(Shape(8, 2), 8192, 256) > 0


def test_more_kv_fits_in_fp8_than_bf16() -> None:
    m, g = _model("llama-3.1-70b"), load_gpu("h200")
    bf16 = Perf(m, g, DEFAULT_EFFICIENCY["h200"], Precision("fp8", "bf16")).kv_capacity_tokens(Shape(4), 8192, 256)
    fp8 = Perf(m, g, DEFAULT_EFFICIENCY["h200"], Precision("fp8", "fp8")).kv_capacity_tokens(Shape(4), 8192, 256)
    assert fp8 == pytest.approx(2 * bf16, rel=0.001)


def test_lookup_still_resolves_the_nvfp4_checkpoint_name() -> None:
    entry = lookup("nvidia/Llama-3.1-70B-Instruct-FP4")
    assert entry is not None and entry.key == "llama-3.1-70b"
