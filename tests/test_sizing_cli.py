"""`disaggctl size` through typer's CliRunner: table, JSON, --spec-out, --calibrate, --topology, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from disaggctl.commands.size import register
from disaggctl.compile import compile_spec
from disaggctl.loader import load_spec
from disaggctl.topology import HostTopology, TopologyFile, dump_topology, from_count

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "calibration" / "b200-llama-3.1-70b-fp8.json"


@pytest.fixture(autouse=True)
def _own_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never read or write the real ~/.config/disaggctl/calibration.json."""
    monkeypatch.setenv("DISAGGCTL_CALIBRATION", str(tmp_path / "default-calibration.json"))


@pytest.fixture
def app() -> typer.Typer:
    a = typer.Typer()

    @a.callback()
    def main() -> None:
        """Keep `size` a subcommand."""

    register(a)
    return a


def run(app: typer.Typer, *args: str, store: Path | None = None) -> Any:
    argv = ["size", *args]
    if store is not None:
        argv += ["--calibration-file", str(store)]
    return CliRunner().invoke(app, argv)


def as_json(app: typer.Typer, *args: str, store: Path | None = None) -> dict[str, Any]:
    r = run(app, *args, "--output", "json", store=store)
    assert r.exit_code == 0, r.output
    data: dict[str, Any] = json.loads(r.stdout)
    return data


BASE = ("--model", "llama-3.1-70b", "--gpu", "b200", "--gpus", "16")


def test_table_shows_the_front_and_the_recommendation(app: typer.Typer, tmp_path: Path) -> None:
    r = run(app, *BASE, "--isl", "8192", "--osl", "256", "--itl", "25", "--percentile", "99",
            store=tmp_path / "c.json")
    assert r.exit_code == 0, r.output
    assert "Pareto front" in r.output and "tok/s/GPU" in r.output
    assert "Best layout of each kind" in r.output and "Verdict: disaggregation gives" in r.output
    assert "Recommendation: disaggregated" in r.output
    assert "local_prefill_threshold" in r.output and "max_num_batched_tokens" in r.output


def test_json_output(app: typer.Typer, tmp_path: Path) -> None:
    d = as_json(app, *BASE, "--isl", "8192", "--osl", "256", "--ttft", "3000", "--tpot", "40", "--itl", "20",
                "--mode", "disaggregated", store=tmp_path / "c")
    rec = d["recommendation"]
    assert d["gpu"] == "b200" and d["hardware_profile"] == "b200" and d["gpus"] == 16
    assert d["sla"] == {"ttft_ms": 3000.0, "tpot_ms": 40.0, "percentile": 90.0, "itl_ms": 20.0}
    assert rec["mode"] == "disaggregated" and rec["layout"].endswith("D")
    assert rec["ttft_ms"] <= 3000 and rec["tpot_ms"] <= 40 and rec["itl_ms"] <= 20
    assert rec["prefill"]["max_num_batched_tokens"] >= 8192 and rec["decode"]["max_num_seqs"] >= 1
    assert rec["quantization"] in ("none", "fp8", "modelopt_fp4") and rec["kv_cache_dtype"] in ("auto", "fp8")
    assert rec["local_prefill_threshold"] > 0
    assert d["pareto"] and all("tps_per_gpu" in p for p in d["pareto"])


def test_summarization_gets_more_prefill_than_chat_through_the_cli(app: typer.Typer, tmp_path: Path) -> None:
    def ratio(isl: str, osl: str) -> float:
        rec = as_json(app, *BASE, "--isl", isl, "--osl", osl, "--mode", "disaggregated",
                      store=tmp_path / "c")["recommendation"]
        prefill = rec["prefill"]["tp"] * rec["prefill"]["replicas"]
        decode = rec["decode"]["tp"] * rec["decode"]["replicas"]
        return float(prefill / decode)

    assert ratio("8192", "256") > ratio("1024", "1024")


def test_workload_profile_sets_isl_and_osl(app: typer.Typer, tmp_path: Path) -> None:
    d = as_json(app, *BASE, "--workload", "summarization", store=tmp_path / "c")
    assert d["workload"] == {"isl": 8192, "osl": 256, "multi_round_share": 0.0}
    d = as_json(app, *BASE, "--workload", "multi-round-qa", "--osl", "128", store=tmp_path / "c")
    assert d["workload"] == {"isl": 4096, "osl": 128, "multi_round_share": 0.8}


def test_faster_nic_lowers_the_threshold(app: typer.Typer, tmp_path: Path) -> None:
    def thr(nic: str) -> int:
        d = as_json(app, *BASE, "--mode", "disaggregated", "--nic-gbps", nic, store=tmp_path / "c")
        return int(d["recommendation"]["local_prefill_threshold"])

    assert thr("100") > thr("400") >= thr("1600")
    assert thr("100") > thr("1600")


def test_hopper_never_gets_nvfp4(app: typer.Typer, tmp_path: Path) -> None:
    d = as_json(app, "--model", "llama-3.1-70b", "--gpu", "h100", "--gpus", "16", store=tmp_path / "c")
    assert d["recommendation"]["weights"] != "nvfp4"
    assert all(p["weights"] != "nvfp4" for p in d["pareto"])
    r = run(app, "--model", "llama-3.1-70b", "--gpu", "h200", "--gpus", "8", "--quantization", "nvfp4")
    assert r.exit_code == 2 and "Blackwell" in r.output


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (("--isl", "8192", "--osl", "256", "--itl", "25", "--percentile", "99"), "disaggregated"),
        (("--isl", "1024", "--osl", "1024", "--mode", "aggregated"), "aggregated"),
        (("--isl", "4096", "--osl", "256", "--multi-round-share", "0.8", "--mode", "disaggregated"), "disaggregated"),
    ],
)
def test_spec_out_validates(app: typer.Typer, tmp_path: Path, args: tuple[str, ...], expect: str) -> None:
    out = tmp_path / "sized.yaml"
    d = as_json(app, *BASE, *args, "--spec-out", str(out), store=tmp_path / "c")
    loaded = load_spec(out)
    spec = loaded.spec
    rec = d["recommendation"]
    # what `disaggctl validate` checks beyond the loader: placement on the hosts, compilation
    desired = compile_spec(loaded)
    instances = desired.placement.instances
    assert len(instances) == rec["decode"]["replicas"] + (rec["prefill"] or {}).get("replicas", 0)
    assert not any("validate" in n for n in d["notes"])
    assert rec["mode"] == expect
    assert spec.profiles == ["b200"] and spec.hardware.gpu == "b200"  # the hardware profile merged in
    assert spec.model.catalog == "llama-3.1-70b" and spec.target.kind == "systemd"
    assert sum(h.gpus or 0 for h in spec.hosts) == rec["gpus_used"]
    assert spec.decode.tensor_parallel == rec["decode"]["tp"] and spec.decode.replicas == rec["decode"]["replicas"]
    assert spec.decode.max_num_seqs == rec["decode"]["max_num_seqs"]
    assert spec.model.kv_cache_dtype == rec["kv_cache_dtype"]
    assert str(spec.model.quantization) == rec["quantization"]
    if expect == "aggregated":
        assert spec.prefill.replicas == 0
        assert spec.router.local_prefill_threshold >= 1024 + 1024
    else:
        assert spec.prefill.replicas == rec["prefill"]["replicas"]
        assert spec.prefill.max_num_batched_tokens == rec["prefill"]["max_num_batched_tokens"]
        assert spec.router.local_prefill_threshold == rec["local_prefill_threshold"]
        assert spec.kv_transfer.kind == rec["connector"] == ("lmcache" if "--multi-round-share" in args else "nixl")
        assert spec.kv_offload.enabled == (rec["connector"] == "lmcache")


def test_spec_out_for_a_config_json_model_and_an_nvl72_rack(app: typer.Typer, tmp_path: Path) -> None:
    cfg = tmp_path / "mymodel"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
        "intermediate_size": 14336, "vocab_size": 128256,
    }))
    out = tmp_path / "s.yaml"
    r = run(app, "--model", str(cfg / "config.json"), "--gpu", "gb200", "--gpus", "16", "--spec-out", str(out),
            store=tmp_path / "c")
    assert r.exit_code == 0, r.output
    loaded = load_spec(out)
    compile_spec(loaded)
    spec = loaded.spec
    assert spec.model.architecture is not None and spec.model.architecture.kv_heads == 8
    assert spec.model.path == str(cfg)
    assert spec.profiles == ["gb200-nvl72"]
    assert {h.nvlink_domain for h in spec.hosts} == {"nvl72-0"} and all(h.gpus == 4 for h in spec.hosts)


def test_topology_gives_gpu_type_count_and_hosts(app: typer.Typer, tmp_path: Path) -> None:
    topo = TopologyFile(hosts={
        "gpu-a": from_count(8, name="NVIDIA H200"),
        "gpu-b": from_count(8, name="NVIDIA H200"),
    })
    path = tmp_path / "topo.json"
    path.write_text(dump_topology(topo))
    out = tmp_path / "s.yaml"
    d = as_json(app, "--model", "llama-3.1-8b", "--topology", str(path), "--spec-out", str(out),
                store=tmp_path / "c")
    assert d["gpu"] == "h200" and d["gpus"] == 16
    loaded = load_spec(out)
    compile_spec(loaded)
    assert {h.name for h in loaded.spec.hosts} <= {"gpu-a", "gpu-b"}
    mixed = TopologyFile(hosts={"a": from_count(8, name="NVIDIA H200"), "b": from_count(8, name="NVIDIA B200")})
    path.write_text(dump_topology(mixed))
    r = run(app, "--model", "llama-3.1-8b", "--topology", str(path))
    assert r.exit_code == 2 and "pass --gpu" in r.output
    path.write_text(dump_topology(TopologyFile(hosts={"a": HostTopology()})))
    r = run(app, "--model", "llama-3.1-8b", "--topology", str(path))
    assert r.exit_code == 2 and "no usable GPUs" in r.output


def test_calibrate_then_size_uses_the_fitted_factors(app: typer.Typer, tmp_path: Path) -> None:
    store = tmp_path / "cal.json"
    before = as_json(app, *BASE, "--isl", "1024", "--osl", "256", "--quantization", "fp8", store=store)
    r = run(app, "--calibrate", str(EXAMPLE), "--gpu", "b200", store=store)
    assert r.exit_code == 0, r.output
    assert "calibrated b200" in r.output and "RMS log error" in r.output
    assert json.loads(store.read_text())["clusters"]["b200"]["gpu"] == "b200"
    after = as_json(app, *BASE, "--isl", "1024", "--osl", "256", "--quantization", "fp8", store=store)
    assert before["efficiency"]["source"] == "default"
    assert after["efficiency"]["source"] == "calibrated:b200"
    stored = json.loads(store.read_text())["clusters"]["b200"]
    assert (after["efficiency"]["compute"], after["efficiency"]["memory"]) == (stored["compute"], stored["memory"])
    assert after["efficiency"] != before["efficiency"]
    assert after["recommendation"]["tps_per_gpu"] != before["recommendation"]["tps_per_gpu"]
    # another GPU type is untouched; a named cluster is kept apart
    h100 = as_json(app, "--model", "llama-3.1-70b", "--gpu", "h100", "--gpus", "8", store=store)
    assert h100["efficiency"]["source"] == "default"
    r = run(app, "--calibrate", str(EXAMPLE), "--gpu", "b200", "--cluster", "lab", "--output", "json", store=store)
    assert r.exit_code == 0 and json.loads(r.stdout)["cluster"] == "lab"
    lab = as_json(app, *BASE, "--cluster", "lab", store=store)
    assert lab["efficiency"]["source"] == "calibrated:lab"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("--model", "llama-9", "--gpu", "b200", "--gpus", "8"), 2, "not in the built-in catalog"),
        (("--model", "llama-3.1-8b", "--gpus", "8"), 2, "--gpu is required"),
        (("--model", "llama-3.1-8b", "--gpu", "b200"), 2, "--gpus is required"),
        (("--gpu", "b200", "--gpus", "8"), 2, "--model is required"),
        (("--model", "llama-3.1-8b", "--gpu", "b200", "--gpus", "8", "--rate", "1", "--concurrency", "4"), 2,
         "not both"),
        (("--model", "llama-3.1-8b", "--gpu", "b200", "--gpus", "8", "--workload", "b200"), 2, "workload profile"),
        (("--model", "llama-3.1-8b", "--gpu", "a100", "--gpus", "8"), 2, "a100"),
        (("--gpu", "b200", "--calibrate", "/nonexistent.json"), 2, "cannot read"),
    ],
)
def test_bad_input_is_explained(app: typer.Typer, args: tuple[str, ...], code: int, message: str) -> None:
    r = run(app, *args)
    assert r.exit_code == code, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_too_big_a_model_says_so(app: typer.Typer, tmp_path: Path) -> None:
    r = run(app, "--model", "llama-3.1-405b", "--gpu", "h100", "--gpus", "2", "--spec-out", str(tmp_path / "x"))
    assert r.exit_code == 3, r.output
    assert "does not fit: llama-3.1-405b needs 406 GB of weights" in r.output and "2 x h100" in r.output
    assert not (tmp_path / "x").exists()


def test_rate_and_concurrency_modes(app: typer.Typer, tmp_path: Path) -> None:
    d = as_json(app, *BASE, "--rate", "10", store=tmp_path / "c")
    assert d["recommendation"]["request_rate"] == 10 and d["load"]["rate"] == 10
    d = as_json(app, *BASE, "--concurrency", "64", store=tmp_path / "c")
    assert d["load"]["concurrency"] == 64 and d["recommendation"] is not None


def test_the_disaggctl_app_has_the_size_command(tmp_path: Path) -> None:
    from disaggctl.cli import app as real

    r = CliRunner().invoke(real, ["size", "--help"])
    assert r.exit_code == 0 and "--spec-out" in r.output and "--calibrate" in r.output
    r = CliRunner().invoke(real, ["size", "--model", "llama-3.1-8b", "--gpu", "h100", "--gpus", "8", "-o", "json",
                                  "--calibration-file", str(tmp_path / "c.json")])
    assert r.exit_code == 0 and json.loads(r.stdout)["recommendation"]["weights"] in ("bf16", "fp8")
