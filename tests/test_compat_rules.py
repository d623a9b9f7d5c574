"""P/D compatibility at the spec boundary: located refusals, fingerprints, mixed GPUs, the transfer plan."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from disaggctl.cli import app
from disaggctl.compat import fingerprint as fp
from disaggctl.compile import compile_spec
from disaggctl.errors import SpecError
from disaggctl.loader import load_spec, load_text
from tests.plugins.paths import EXAMPLES

BASE = """\
name: demo
profiles: [b200]
model:
  path: meta-llama/Llama-3.1-70B-Instruct
  kv_cache_dtype: fp8
hosts:
  - {name: a, address: 10.0.0.1, gpus: 8}
  - {name: b, address: 10.0.0.2, gpus: 8}
prefill:
  tensor_parallel: 8
  hosts: {names: [a]}
decode:
  replicas: 4
  tensor_parallel: 2
  hosts: {names: [b]}
kv_transfer:
  kind: nixl
target:
  kind: systemd
"""


def errors(text: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        compile_spec(load_text(text, "spec.yaml"))
    return [i.format() for i in e.value.issues]


def test_tp_heavy_prefill_small_decode_plans_with_reads_and_nic_time() -> None:
    d = compile_spec(load_text(BASE, "spec.yaml"))
    assert d.compat is not None and d.compat.transfer is not None
    t = d.compat.transfer
    assert t.tp_ratio == -4
    assert t.reads == {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}
    assert t.kv_bytes_per_token == 80 * 8 * 128 * 2 * 1  # fp8 KV of Llama-3.1-70B
    (link,) = t.links
    assert link.kind == "nic" and link.gb_per_s == 400 / 8 and link.pairs == 4
    # each decode GPU receives half the prompt's KV over its own 50 GB/s NIC
    assert link.transfer_ms == pytest.approx(t.typical_prompt_bytes / 2 / 50e9 * 1e3, rel=1e-3)


def test_pairs_in_one_nvlink_domain_use_nvlink_the_others_the_nic() -> None:
    text = BASE.replace("prefill:\n  tensor_parallel: 8", "prefill:\n  tensor_parallel: 4")
    text = text.replace(
        "decode:\n  replicas: 4\n  tensor_parallel: 2\n  hosts: {names: [b]}",
        "decode:\n  replicas: 3\n  tensor_parallel: 4",
    )
    d = compile_spec(load_text(text, "spec.yaml"))
    assert d.compat and d.compat.transfer
    t = d.compat.transfer
    assert t.domains == {"prefill-0": "host:a", "decode-0": "host:a", "decode-1": "host:b", "decode-2": "host:b"}
    links = {link.kind: link for link in t.links}
    assert (links["nvlink"].pairs, links["nic"].pairs) == (1, 2)
    assert links["nvlink"].example == ["prefill-0", "decode-0"] and links["nic"].example == ["prefill-0", "decode-1"]
    assert links["nvlink"].gb_per_s == 900 and links["nvlink"].transfer_ms < links["nic"].transfer_ms


@pytest.mark.parametrize(
    "change,where,words",
    [
        (
            ("decode:\n  replicas: 4\n  tensor_parallel: 2", "decode:\n  replicas: 2\n  tensor_parallel: 3"),
            "decode.tensor_parallel",
            "do not divide each other",
        ),
        (
            ("decode:\n  replicas: 4\n", "decode:\n  replicas: 2\n  pipeline_parallel: 2\n"),
            "decode.pipeline_parallel",
            "cannot use pipeline parallelism",
        ),
        (
            ("prefill:\n  tensor_parallel: 8\n", "prefill:\n  tensor_parallel: 8\n  block_size: 32\n"),
            "decode.block_size",
            "not a multiple of prefill block_size 32",
        ),
        (
            ("decode:\n  replicas: 4\n", "decode:\n  replicas: 4\n  block_size: 32\n"),
            "decode.block_size",
            "while prefill TP 8 > decode TP 2",
        ),
    ],
)
def test_refusals_are_located(change: tuple[str, str], where: str, words: str) -> None:
    text = BASE.replace(*change)
    assert text != BASE
    errs = errors(text)
    assert any(where in e and words in e and "vLLM 0.32:" in e for e in errs), errs


def test_pipeline_parallel_prefill_is_refused_with_the_pull_connector() -> None:
    pp = BASE.replace("prefill:\n  tensor_parallel: 8\n", "prefill:\n  tensor_parallel: 4\n  pipeline_parallel: 2\n")
    errs = errors(pp)
    assert any(
        e.startswith("spec.yaml:") and "prefill.pipeline_parallel" in e and "NixlPushConnector" in e for e in errs
    )
    lmcache = pp.replace("kind: nixl", "kind: lmcache").replace(
        "replicas: 4\n  tensor_parallel: 2", "replicas: 2\n  tensor_parallel: 4"
    )
    assert compile_spec(load_text(lmcache, "spec.yaml")).compat is not None  # a NIXL rule only


@pytest.mark.parametrize(
    "args,where",
    [
        (["--kv-cache-dtype", "fp8_e5m2"], "decode.extra_args[0]"),
        (["--dtype=float16"], "decode.extra_args[0]"),
        (["--attention-backend", "TRITON_ATTN"], "decode.extra_args[0]"),
        (["--revision", "v2"], "decode.extra_args[0]"),
    ],
)
def test_a_role_that_would_hash_differently_is_refused_at_its_field(args: list[str], where: str) -> None:
    text = BASE.replace("  hosts: {names: [b]}\n", f"  hosts: {{names: [b]}}\n  extra_args: {json.dumps(args)}\n")
    errs = errors(text)
    assert any(e.startswith("spec.yaml:") and where in e and "differ in" in e for e in errs), errs


def test_fingerprint_is_a_pure_function_of_the_compiled_process() -> None:
    a = compile_spec(load_text(BASE, "spec.yaml"))
    b = compile_spec(load_text(BASE.replace("name: demo", "name: other"), "spec.yaml"))
    assert a.compat and b.compat
    assert {f.fingerprint for f in a.compat.fingerprints} == {f.fingerprint for f in b.compat.fingerprints}
    assert len({f.fingerprint for f in a.compat.fingerprints}) == 1
    c = compile_spec(
        load_text(BASE.replace("kv_cache_dtype: fp8", "kv_cache_dtype: auto\n  revision: abc123"), "spec.yaml")
    )
    assert c.compat and c.compat.fingerprints[0].fingerprint != a.compat.fingerprints[0].fingerprint
    assert c.compat.fingerprints[0].extra_factors["revision"] == "abc123"
    assert "--revision" in c.processes[0].argv


def test_speculative_factor_follows_vllms_hidden_state_speculators() -> None:
    argv = ["vllm", "serve", "m"]
    ngram = [*argv, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']
    eagle = [*argv, "--speculative-config", '{"method": "eagle3", "model": "d"}']
    assert fp.vllm_factors(ngram, "hopper", False)["speculative_config"] is None
    assert fp.vllm_factors(eagle, "hopper", False)["speculative_config"]["model"] == "d"


def test_mixed_gpu_example_pins_a_common_attention_backend() -> None:
    d = compile_spec(load_spec(EXAMPLES / "mixed-b200-h200.yaml"))
    serve = [p for p in d.processes if p.role.value != "router"]
    assert {p.host[:4] for p in serve} == {"b200", "h200"}
    for p in serve:
        assert fp.option(p.argv, "--attention-backend") == "FLASH_ATTN"
    assert any("pinned --attention-backend FLASH_ATTN" in w for w in d.placement.warnings)
    assert d.compat and len({f.fingerprint for f in d.compat.fingerprints}) == 1
    arch = {n.host: n.arch for i in d.placement.instances for n in i.nodes}
    assert arch == {"b200-01": "blackwell", "h200-01": "hopper", "h200-02": "hopper"}


def test_mixed_gpus_without_the_pin_would_not_hash_alike() -> None:
    d = compile_spec(load_spec(EXAMPLES / "mixed-b200-h200.yaml"))
    p = next(x for x in d.processes if x.role.value == "prefill")
    q = next(x for x in d.processes if x.role.value == "decode")
    strip = lambda argv: [a for i, a in enumerate(argv) if "--attention-backend" not in argv[max(0, i - 1) : i + 1]]  # noqa: E731
    assert fp.vllm_factors(strip(p.argv), "blackwell", False)["attn_backend_name"] == "FLASHINFER"
    assert fp.vllm_factors(strip(q.argv), "hopper", False)["attn_backend_name"] == "FLASH_ATTN"


def test_nvfp4_prefill_with_hopper_decode_is_refused() -> None:
    text = (EXAMPLES / "mixed-b200-h200.yaml").read_text().replace("quantization: fp8 ", "quantization: modelopt_fp4 ")
    errs = errors(text)
    assert any("model.quantization" in e and "NVFP4" in e and "h200" in e for e in errs), errs


def test_plan_json_carries_fingerprints_and_transfer() -> None:
    r = CliRunner().invoke(app, ["plan", "--offline", "--output", "json", str(EXAMPLES / "b200-hetero-tp.yaml")])
    assert r.exit_code == 0, r.output
    compat = json.loads(r.output)["compat"]
    assert {f["instance"] for f in compat["fingerprints"]} == {
        "prefill-0",
        "decode-0",
        "decode-1",
        "decode-2",
        "decode-3",
    }
    assert compat["transfer"]["tp_ratio"] == -4 and compat["transfer"]["links"][0]["kind"] == "nic"
    text = CliRunner().invoke(app, ["plan", "--offline", str(EXAMPLES / "b200-hetero-tp.yaml")]).output
    assert "KV transfer: prefill TP 8 -> decode TP 2 (tp_ratio -4): D0<-P0,1,2,3; D1<-P4,5,6,7" in text
    assert "nic: 4 P/D pair(s), 50 GB/s per GPU" in text


def test_hybrid_models_from_config_and_catalog() -> None:
    from disaggctl.catalog import CATALOG, from_hf_config

    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4, "num_key_value_heads": 2}
    assert not from_hf_config(base).hybrid
    swa = from_hf_config({**base, "layer_types": ["sliding_attention", "full_attention"] * 2})
    assert swa.hybrid and not swa.mamba
    mamba = from_hf_config({**base, "layers_block_type": ["mamba", "attention", "mamba", "mamba"]})
    assert mamba.hybrid and mamba.mamba
    assert CATALOG["gpt-oss-120b"].architecture.hybrid


def test_mamba_hybrids_may_read_replicated_heads_from_a_larger_prefill_tp() -> None:
    from disaggctl.compat.nixl import KvModel, Side, check_pair

    # plain attention: refused (replicated heads); Mamba hybrids use the 3-read transfer instead
    assert [r.code for r in check_pair(Side(8), Side(2), KvModel(kv_heads=4))] == ["replicated_kv"]
    assert check_pair(Side(8), Side(2), KvModel(kv_heads=4, hybrid=True, mamba=True)) == []
    assert check_pair(Side(8), Side(2), KvModel(kv_heads=4, mla=True)) == []


def test_local_target_fingerprints_the_environments_nixl_and_ucx() -> None:
    from importlib import metadata

    d = compile_spec(load_spec(EXAMPLES / "local-cpu.yaml"))
    assert d.compat
    extra = d.compat.fingerprints[0].extra_factors
    assert extra["nixl_version"] == metadata.version("nixl")
    assert str(extra["ucx_version"]).count(".") == 2  # e.g. 1.23.0, from the wheel's libucp
    remote = compile_spec(load_spec(EXAMPLES / "b200-1p1d-nixl.yaml"))
    assert remote.compat and "nixl_version" not in remote.compat.fingerprints[0].extra_factors
