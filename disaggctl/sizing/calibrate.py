"""Fit the efficiency factors of a cluster from measured benchmark results, and store them.

Input: `vllm bench serve --save-result` JSON (one object, a list of them, or JSON lines). The
run's settings come from the file (`--metadata gpu=b200 tp=8 ...` lands as top-level keys) or
from defaults the caller passes. The memory efficiency is fitted to the measured TPOT (or ITL),
the compute efficiency to the measured TTFT, by a grid search on the log error; both stay in
(0, 1], so calibrated predictions still never beat the hardware.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from disaggctl.errors import DisaggError
from disaggctl.sizing.hardware import GpuSpec
from disaggctl.sizing.perf import DEFAULT_EFFICIENCY, Efficiency, ModelInfo, Perf, Precision, Shape
from disaggctl.sizing.search import Workload, agg_point, disagg_closed_loop, prefill_role

GRID = [0.02 * (1 / 0.02) ** (i / 159) for i in range(160)]  # log-spaced 0.02 .. 1.0
STORE_VERSION = 1


@dataclass(frozen=True)
class Measurement:
    """One benchmark run: the layout it ran on and what it measured."""

    model: str
    gpu: str
    isl: int
    osl: int
    concurrency: float
    tp: int = 1
    pp: int = 1
    dp: int = 1
    replicas: int = 1
    mode: str = "aggregated"
    prefill_tp: int = 1
    prefill_replicas: int = 1
    weights: str = "bf16"
    kv_dtype: str = "bf16"
    max_num_batched_tokens: int = 8192
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    output_tps: float | None = None
    source: str = ""


# --------------------------------------------------------------------------- reading results

_ALIASES = {
    "tp": ("tp", "tensor_parallel", "tensor_parallel_size", "decode_tp"),
    "pp": ("pp", "pipeline_parallel", "pipeline_parallel_size"),
    "dp": ("dp", "data_parallel", "data_parallel_size"),
    "replicas": ("replicas", "decode_replicas"),
    "prefill_tp": ("prefill_tp",),
    "prefill_replicas": ("prefill_replicas",),
    "concurrency": ("concurrency", "max_concurrency"),
    "isl": ("isl", "input_len", "random_input_len"),
    "osl": ("osl", "output_len", "random_output_len"),
    "weights": ("weights", "quantization", "precision"),
    "kv_dtype": ("kv_dtype", "kv_cache_dtype"),
    "model": ("model", "model_id"),
    "gpu": ("gpu",),
    "mode": ("mode",),
    "max_num_batched_tokens": ("max_num_batched_tokens",),
}
_WEIGHTS = {"none": "bf16", "auto": "bf16", "bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8",
            "modelopt_fp4": "nvfp4", "nvfp4": "nvfp4", "fp4": "nvfp4", "mxfp4": "mxfp4"}
_KV = {"auto": "bf16", "bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8"}


def _pick(rec: dict[str, Any], defaults: dict[str, Any], key: str) -> Any:
    for k in _ALIASES[key]:
        if rec.get(k) not in (None, "", "inf"):
            return rec[k]
    return defaults.get(key)


def _metric(rec: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        v = rec.get(k)
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return None


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise DisaggError(f"--calibrate: cannot read {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DisaggError(
                f"--calibrate: {path} is neither JSON nor JSON lines ({e.msg}, line {e.lineno})"
            ) from None
    recs = data if isinstance(data, list) else [data]
    if not recs or not all(isinstance(r, dict) for r in recs):
        raise DisaggError(f"--calibrate: {path} must hold a benchmark result object or a list of them")
    return recs


def read_measurements(path: Path, defaults: dict[str, Any]) -> list[Measurement]:
    """Measurements from a result file; `defaults` fill settings the file does not record."""
    out: list[Measurement] = []
    for i, rec in enumerate(_records(path)):
        where = f"{path.name}[{i}]"
        completed = rec.get("completed") or rec.get("num_prompts")
        isl = _pick(rec, defaults, "isl")
        osl = _pick(rec, defaults, "osl")
        if isl is None and completed and rec.get("total_input_tokens"):
            isl = rec["total_input_tokens"] / completed
        if osl is None and completed and rec.get("total_output_tokens"):
            osl = rec["total_output_tokens"] / completed
        missing = [k for k, v in (("model", _pick(rec, defaults, "model")), ("gpu", _pick(rec, defaults, "gpu")),
                                  ("isl", isl), ("osl", osl), ("concurrency", _pick(rec, defaults, "concurrency")))
                   if v is None]
        if missing:
            raise DisaggError(
                f"--calibrate: {where} does not say {', '.join(missing)}; record them with "
                "`vllm bench serve --metadata gpu=b200 tp=8 ...` or pass --model/--gpu/--isl/--osl/--concurrency"
            )
        try:
            m = Measurement(
                model=str(_pick(rec, defaults, "model")),
                gpu=str(_pick(rec, defaults, "gpu")).lower(),
                isl=round(float(isl)),
                osl=round(float(osl)),
                concurrency=float(_pick(rec, defaults, "concurrency")),
                tp=int(_pick(rec, defaults, "tp") or 1),
                pp=int(_pick(rec, defaults, "pp") or 1),
                dp=int(_pick(rec, defaults, "dp") or 1),
                replicas=int(_pick(rec, defaults, "replicas") or 1),
                mode=str(_pick(rec, defaults, "mode") or "aggregated"),
                prefill_tp=int(_pick(rec, defaults, "prefill_tp") or 1),
                prefill_replicas=int(_pick(rec, defaults, "prefill_replicas") or 1),
                weights=_WEIGHTS.get(str(_pick(rec, defaults, "weights") or "bf16").lower(), "bf16"),
                kv_dtype=_KV.get(str(_pick(rec, defaults, "kv_dtype") or "auto").lower(), "bf16"),
                max_num_batched_tokens=int(_pick(rec, defaults, "max_num_batched_tokens") or 8192),
                ttft_ms=_metric(rec, "median_ttft_ms", "mean_ttft_ms"),
                tpot_ms=_metric(rec, "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms", "median_itl_ms"),
                output_tps=_metric(rec, "output_throughput"),
                source=where,
            )
        except (TypeError, ValueError) as e:
            raise DisaggError(f"--calibrate: {where} has a setting that is not a number: {e}") from None
        if m.mode not in ("aggregated", "disaggregated"):
            raise DisaggError(f"--calibrate: {where} mode must be aggregated or disaggregated (got {m.mode!r})")
        if m.ttft_ms is None and m.tpot_ms is None and m.output_tps is None:
            raise DisaggError(
                f"--calibrate: {where} has no mean_ttft_ms, mean_tpot_ms, mean_itl_ms or output_throughput"
            )
        out.append(m)
    return out


# --------------------------------------------------------------------------- predicting a measured run


def predict(model: ModelInfo, gpu: GpuSpec, eff: Efficiency, m: Measurement) -> tuple[float, float, float]:
    """(median TTFT ms, TPOT ms, output tokens/s) the model predicts for the run `m` describes."""
    perf = Perf(model, gpu, eff, Precision(m.weights, m.kv_dtype))
    wl = Workload(m.isl, m.osl)
    q = 0.5  # benchmarks report medians and means; compare with the model's median
    shape = Shape(m.tp, m.pp, m.dp)
    if m.mode == "aggregated":
        b = m.concurrency / (m.replicas * shape.pp * shape.dp)
        tpot, ttft, rate, _ = agg_point(perf, shape, max(m.max_num_batched_tokens, math.ceil(b) + 1), wl, q, b)
        if rate <= 0:  # the batch cannot keep its prompts prefilled: prompts queue, decode runs alone
            tpot = perf.decode_step(shape, b, wl.ctx)
            ttft = perf.prefill_time(shape, m.isl, 1, m.max_num_batched_tokens)
            rate = shape.pp * shape.dp * b / (m.osl * tpot + ttft)
        return ttft * 1000, tpot * 1000, rate * m.replicas * m.osl
    pre = prefill_role(perf, Shape(m.prefill_tp), m.isl)
    kind = perf.link_kind(m.prefill_tp * m.prefill_replicas + shape.gpus * m.replicas)
    ttft, tpot, rate, _ = disagg_closed_loop(perf, pre, shape, m.prefill_replicas, m.replicas, m.concurrency,
                                             wl, q, kind)
    return ttft * 1000, tpot * 1000, rate * m.osl


def _error(model: ModelInfo, gpu: GpuSpec, eff: Efficiency, ms: list[Measurement]) -> tuple[float, float]:
    """(squared log error of TTFT, of TPOT and throughput) over the measurements."""
    e_ttft = e_tpot = 0.0
    for m in ms:
        ttft, tpot, tps = predict(model, gpu, eff, m)
        if m.ttft_ms is not None:
            e_ttft += math.log(ttft / m.ttft_ms) ** 2
        if m.tpot_ms is not None:
            e_tpot += math.log(tpot / m.tpot_ms) ** 2
        elif m.output_tps is not None:
            e_tpot += math.log(tps / m.output_tps) ** 2
    return e_ttft, e_tpot


@dataclass(frozen=True)
class Fit:
    efficiency: Efficiency
    before: float  # RMS log error with the starting factors
    after: float
    samples: int
    at_limit: bool  # a factor hit 1.0: the measurements are as fast as the model can go


def fit(models: dict[str, ModelInfo], gpu: GpuSpec, ms: list[Measurement], start: Efficiency) -> Fit:
    """Joint grid search of (compute, memory) on the summed squared log error, coarse then fine.

    TTFT mostly constrains the compute factor and TPOT the memory factor, but a step that mixes
    prefill and decode depends on both, so they are fitted together.
    """

    def total(eff: Efficiency) -> float:
        e_ttft, e_tpot = 0.0, 0.0
        for m in ms:
            a, b = _error(models[m.model], gpu, eff, [m])
            e_ttft += a
            e_tpot += b
        return e_ttft + e_tpot

    def search(cs: list[float], ms_: list[float]) -> tuple[float, float]:
        best = min((total(replace(start, compute=c, memory=m)), c, m) for c in cs for m in ms_)
        return best[1], best[2]

    has_ttft = any(m.ttft_ms is not None for m in ms)
    coarse = [*GRID[::8], GRID[-1]]
    c0, m0 = search(coarse if has_ttft else [start.compute], coarse)

    def around(v: float) -> list[float]:
        i = min(range(len(GRID)), key=lambda j: abs(GRID[j] - v))
        return GRID[max(0, i - 8): i + 9]

    c1, m1 = search(around(c0) if has_ttft else [start.compute], around(m0))
    eff = replace(start, compute=c1, memory=m1, source="calibrated")
    n = max(1, len(ms))
    return Fit(eff, math.sqrt(total(start) / n), math.sqrt(total(eff) / n), len(ms),
               at_limit=eff.memory >= GRID[-1] or (has_ttft and eff.compute >= GRID[-1]))


# --------------------------------------------------------------------------- the store


def default_store_path() -> Path:
    env = os.environ.get("DISAGGCTL_CALIBRATION")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "disaggctl" / "calibration.json"


def _read_store(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"version": STORE_VERSION, "clusters": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DisaggError(f"calibration file {path} is unreadable ({e}); fix or delete it") from None
    if not isinstance(data, dict) or not isinstance(data.get("clusters"), dict):
        raise DisaggError(f"calibration file {path} has no clusters: mapping; fix or delete it")
    return data


def save(path: Path, cluster: str, gpu: str, result: Fit) -> None:
    """Record the fitted factors under `cluster` (written atomically)."""
    data = _read_store(path)
    e = result.efficiency
    data["clusters"][cluster] = {
        "gpu": gpu,
        "compute": round(e.compute, 4),
        "memory": round(e.memory, 4),
        "link": e.link,
        "samples": result.samples,
        "rms_log_error_before": round(result.before, 4),
        "rms_log_error_after": round(result.after, 4),
        "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def efficiency_for(gpu: str, cluster: str | None, path: Path) -> tuple[Efficiency, str | None]:
    """Stored factors of `cluster` (default: the GPU type) or the defaults, and a note when it matters."""
    name = cluster or gpu
    entry = _read_store(path)["clusters"].get(name)
    default = DEFAULT_EFFICIENCY[gpu]
    if entry is None:
        return default, (f"no calibration named {cluster!r} in {path}; using default factors" if cluster else None)
    if entry.get("gpu") != gpu:
        raise DisaggError(f"calibration {name!r} in {path} was fitted on {entry.get('gpu')}, not {gpu}",)
    try:
        eff = Efficiency(compute=float(entry["compute"]), memory=float(entry["memory"]),
                         link=float(entry.get("link", default.link)), source=f"calibrated:{name}")
    except (KeyError, TypeError, ValueError) as e:
        raise DisaggError(f"calibration {name!r} in {path} is malformed ({e}); rerun size --calibrate") from None
    return eff, None
