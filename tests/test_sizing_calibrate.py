"""Calibration: reading benchmark results, fitting efficiency factors, and predictions moving with them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from disaggctl.catalog import CATALOG
from disaggctl.errors import DisaggError
from disaggctl.sizing import calibrate
from disaggctl.sizing.calibrate import Measurement, efficiency_for, fit, predict, read_measurements, save
from disaggctl.sizing.errors import SizingInputError
from disaggctl.sizing.hardware import load_gpu
from disaggctl.sizing.perf import DEFAULT_EFFICIENCY, Efficiency, ModelInfo
from disaggctl.sizing.search import Problem, Sla, Workload, search

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "calibration" / "b200-llama-3.1-70b-fp8.json"
M70 = ModelInfo("llama-3.1-70b", CATALOG["llama-3.1-70b"].hub_id, CATALOG["llama-3.1-70b"].architecture,
                "llama-3.1-70b")
B200 = load_gpu("b200")


def _runs(scale_ttft: float, scale_tpot: float, mode: str = "aggregated") -> list[Measurement]:
    """Measurements `scale` x slower (or faster, below 1) than the default factors predict."""
    out = []
    for c in (4, 16, 64, 256):
        m = Measurement(model="llama-3.1-70b", gpu="b200", isl=2048, osl=256, concurrency=c, tp=4, replicas=2,
                        weights="fp8", kv_dtype="fp8", mode=mode, prefill_tp=2, prefill_replicas=2)
        ttft, tpot, _ = predict(M70, B200, DEFAULT_EFFICIENCY["b200"], m)
        out.append(replace(m, ttft_ms=ttft * scale_ttft, tpot_ms=tpot * scale_tpot))
    return out


def _best(eff: Efficiency) -> tuple[float, float]:
    p = Problem(M70, B200, 16, Workload(4096, 512), Sla(1e6, 1e6), eff, modes=("disaggregated",),
                weights=("fp8",), kv_dtypes=("fp8",))
    r = search(p)
    c = r.best
    assert c is not None
    return c.ttft_ms, c.tpot_ms


@pytest.mark.parametrize("mode", ["aggregated", "disaggregated"])
def test_slower_measurements_make_predictions_slower(mode: str) -> None:
    start = DEFAULT_EFFICIENCY["b200"]
    result = fit({"llama-3.1-70b": M70}, B200, _runs(1.6, 1.6, mode), start)
    e = result.efficiency
    assert e.memory < start.memory and e.compute < start.compute
    assert result.after < result.before
    for m in _runs(1.6, 1.6, mode):
        _, tpot, _ = predict(M70, B200, e, m)
        assert tpot > predict(M70, B200, start, m)[1]
        assert m.tpot_ms is not None and abs(tpot / m.tpot_ms - 1) < 0.25


def test_faster_measurements_make_predictions_faster() -> None:
    start = DEFAULT_EFFICIENCY["b200"]
    e = fit({"llama-3.1-70b": M70}, B200, _runs(0.8, 0.8), start).efficiency
    assert e.memory > start.memory and e.compute > start.compute
    t0, p0 = _best(start)
    t1, p1 = _best(e)
    assert p1 < p0 and t1 < t0


def test_fit_recovers_the_factors_that_produced_the_runs() -> None:
    truth = replace(DEFAULT_EFFICIENCY["b200"], compute=0.38, memory=0.58)
    ms = []
    for i, m in enumerate(_runs(1, 1)):
        ttft, tpot, _ = predict(M70, B200, truth, m)
        noise = 1 + 0.03 * (-1) ** i  # 3% noise
        ms.append(replace(m, ttft_ms=ttft * noise, tpot_ms=tpot / noise))
    r = fit({"llama-3.1-70b": M70}, B200, ms, DEFAULT_EFFICIENCY["b200"])
    assert r.efficiency.compute == pytest.approx(0.38, rel=0.1)
    assert r.efficiency.memory == pytest.approx(0.58, rel=0.1)
    assert not r.at_limit and r.after < r.before


def test_the_example_results_read_and_fit() -> None:
    # examples/calibration (vllm bench serve records of one B200 x 8 deployment) reads and fits
    ms = read_measurements(EXAMPLE, {"model": None})
    assert {m.concurrency for m in ms} == {8, 32, 128}
    assert all(m.tp == 8 and m.weights == "fp8" and m.kv_dtype == "fp8" and m.isl == 1024 for m in ms)
    r = fit({ms[0].model: M70}, B200, ms, DEFAULT_EFFICIENCY["b200"])
    assert r.after < r.before and not r.at_limit


def test_measurements_beyond_the_hardware_stop_at_full_efficiency() -> None:
    r = fit({"llama-3.1-70b": M70}, B200, _runs(0.05, 0.05), DEFAULT_EFFICIENCY["b200"])
    assert r.at_limit and r.efficiency.memory <= 1.0 and r.efficiency.compute <= 1.0


def _bench(**kw: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "model_id": "meta-llama/Llama-3.1-8B-Instruct", "max_concurrency": 16, "completed": 100,
        "total_input_tokens": 100 * 1000, "total_output_tokens": 100 * 200, "mean_ttft_ms": 80.0,
        "median_ttft_ms": 70.0, "mean_tpot_ms": 9.0, "mean_itl_ms": 9.1, "output_throughput": 1700.0,
        "request_rate": "inf", "gpu": "h100", "tp": "2",
    }
    rec.update(kw)
    return rec


def test_reads_vllm_bench_json_list_and_lines(tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    one.write_text(json.dumps(_bench()))
    (m,) = read_measurements(one, {})
    assert (m.model, m.gpu, m.isl, m.osl, m.concurrency, m.tp) == (
        "meta-llama/Llama-3.1-8B-Instruct", "h100", 1000, 200, 16, 2)
    assert (m.ttft_ms, m.tpot_ms, m.output_tps) == (70.0, 9.0, 1700.0)
    lines = tmp_path / "runs.jsonl"
    lines.write_text(json.dumps(_bench()) + "\n" + json.dumps(_bench(max_concurrency=64, tp=4)) + "\n")
    assert [m.concurrency for m in read_measurements(lines, {})] == [16, 64]
    # settings the file lacks come from the defaults
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([_bench(gpu=None, max_concurrency=None)]))
    (m,) = read_measurements(bare, {"gpu": "h100", "concurrency": 8})
    assert m.concurrency == 8 and m.gpu == "h100"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (_bench(gpu=None), "gpu"),
        (_bench(max_concurrency=None), "concurrency"),
        (_bench(mean_ttft_ms=None, median_ttft_ms=None, mean_tpot_ms=None, mean_itl_ms=None,
                output_throughput=None), "no median_ttft_ms, mean_tpot_ms"),
        (_bench(tp="eight"), r"tp: must be a number \(got 'eight'\)"),
        (_bench(tp=0), r"tp: must be finite and > 0"),
        (_bench(tp=2.5), r"tp: must be a whole number"),
        (_bench(tp=True), r"tp: must be a number \(got true\)"),
        (_bench(tp=1e300), r"tp: 1e\+300 is beyond any real run"),
        (_bench(max_concurrency=float("inf")), r"concurrency: must be finite"),
        (_bench(max_concurrency=-4), r"concurrency: must be finite and > 0"),
        (_bench(mean_ttft_ms=float("nan")), r"mean_ttft_ms: must be finite"),
        (_bench(median_ttft_ms=0), r"median_ttft_ms: must be finite and > 0"),
        (_bench(output_throughput="fast"), r"output_throughput: must be a number"),
        (_bench(model=["x"]), r"model: must be a non-empty string"),
        (_bench(completed=0, total_input_tokens=100), "completed: must be finite and > 0"),
        (_bench(mode="hybrid"), "mode"),
        ([1, 2], "result object"),
    ],
)
def test_bad_results_are_explained(tmp_path: Path, record: Any, message: str) -> None:
    f = tmp_path / "r.json"
    f.write_text(json.dumps(record))
    with pytest.raises(SizingInputError, match=message) as e:
        read_measurements(f, {})
    assert e.value.exit_code == 2


def test_unreadable_results_are_explained(tmp_path: Path) -> None:
    with pytest.raises(DisaggError, match="cannot read"):
        read_measurements(tmp_path / "missing.json", {})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DisaggError, match="neither JSON"):
        read_measurements(bad, {})


def test_store_round_trip_per_cluster(tmp_path: Path) -> None:
    store = tmp_path / "sub" / "calibration.json"
    assert efficiency_for("b200", None, store) == (DEFAULT_EFFICIENCY["b200"], None)
    r = fit({"llama-3.1-70b": M70}, B200, _runs(1.5, 1.5), DEFAULT_EFFICIENCY["b200"])
    save(store, "lab-a", "b200", r)
    eff, note = efficiency_for("b200", "lab-a", store)
    assert note is None and eff.source == "calibrated:lab-a"
    assert eff.memory == pytest.approx(r.efficiency.memory, abs=1e-4)
    # another cluster of the same GPU type keeps the defaults, and says so
    eff, note = efficiency_for("b200", "lab-b", store)
    assert eff == DEFAULT_EFFICIENCY["b200"] and note and "lab-b" in note
    with pytest.raises(DisaggError, match="fitted on b200"):
        efficiency_for("h100", "lab-a", store)
    data = json.loads(store.read_text())
    assert data["clusters"]["lab-a"]["samples"] == 4


def test_corrupt_store_is_explained(tmp_path: Path) -> None:
    store = tmp_path / "c.json"
    store.write_text("[]")
    with pytest.raises(DisaggError, match="clusters"):
        efficiency_for("b200", None, store)
    store.write_text(json.dumps({"clusters": {"b200": {"gpu": "b200", "compute": 3, "memory": 0.5}}}))
    with pytest.raises(DisaggError, match="malformed"):
        efficiency_for("b200", None, store)


def test_default_store_path_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DISAGGCTL_CALIBRATION", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert calibrate.default_store_path() == tmp_path / "disaggctl" / "calibration.json"
    monkeypatch.setenv("DISAGGCTL_CALIBRATION", str(tmp_path / "x.json"))
    assert calibrate.default_store_path() == tmp_path / "x.json"
