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
from disaggctl.sizing.errors import SizingInputError
from disaggctl.sizing.hardware import GpuSpec
from disaggctl.sizing.inputs import finite_positive
from disaggctl.sizing.perf import DEFAULT_EFFICIENCY, Efficiency, ModelInfo, Perf, Precision, Shape
from disaggctl.sizing.roles import Workload, agg_point, disagg_closed_loop, prefill_role

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


def _metric(rec: dict[str, Any], where: str, *keys: str) -> float | None:
    """The first of `keys` the record has; every one it has must be a finite positive number."""
    found = [finite_positive(rec[k], f"--calibrate: {where}.{k}") for k in keys if rec.get(k) is not None]
    return found[0] if found else None


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise SizingInputError(f"--calibrate: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SizingInputError(f"--calibrate: {path} is not a text (JSON) file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise SizingInputError(
                f"--calibrate: {path}:{e.lineno}:{e.colno}: neither JSON nor JSON lines ({e.msg})"
            ) from None
    recs = data if isinstance(data, list) else [data]
    if not recs or not all(isinstance(r, dict) for r in recs):
        raise SizingInputError(f"--calibrate: {path} must hold a benchmark result object or a list of them")
    return recs


# upper bounds that keep every later computation finite (and catch unit mistakes)
_LIMITS = {"isl": 10_000_000, "osl": 10_000_000, "concurrency": 10_000_000, "tp": 1024, "pp": 1024, "dp": 1024,
           "replicas": 100_000, "prefill_tp": 1024, "prefill_replicas": 100_000,
           "max_num_batched_tokens": 10_000_000}


def _setting(rec: dict[str, Any], defaults: dict[str, Any], key: str, where: str, default: float | None = None,
             value: Any = None) -> float:
    v = value if value is not None else _pick(rec, defaults, key)
    if v is None:
        if default is None:
            raise SizingInputError(f"--calibrate: {where} does not say {key}")
        return default
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise SizingInputError(f"--calibrate: {where}.{key}: must be a number (got {v!r})") from None
    integer = key not in ("isl", "osl", "concurrency")
    x = finite_positive(v, f"--calibrate: {where}.{key}", integer=integer)
    if x > _LIMITS[key]:
        raise SizingInputError(f"--calibrate: {where}.{key}: {v!r} is beyond any real run (max {_LIMITS[key]})")
    return x


def _text(rec: dict[str, Any], defaults: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    v = _pick(rec, defaults, key)
    if v is None and default is not None:
        return default
    if not isinstance(v, str) or not v.strip():
        raise SizingInputError(f"--calibrate: {where}.{key}: must be a non-empty string (got {json.dumps(v)})")
    return v


def _lengths(rec: dict[str, Any], defaults: dict[str, Any], where: str) -> tuple[float, float]:
    completed = rec["completed"] if rec.get("completed") is not None else rec.get("num_prompts")
    out = []
    for key, total in (("isl", "total_input_tokens"), ("osl", "total_output_tokens")):
        v = _pick(rec, defaults, key)
        if v is None and completed is not None and rec.get(total) is not None:
            n = finite_positive(completed, f"--calibrate: {where}.completed")
            v = finite_positive(rec[total], f"--calibrate: {where}.{total}") / n
        if v is None:
            raise SizingInputError(
                f"--calibrate: {where} does not say {key}; record it with `vllm bench serve --metadata "
                f"{key}=...` or pass --{key}")
        out.append(_setting(rec, defaults, key, where, value=v))
    return out[0], out[1]


def _measurement(rec: dict[str, Any], defaults: dict[str, Any], where: str) -> Measurement:
    isl, osl = _lengths(rec, defaults, where)

    def n(key: str) -> int:
        return int(_setting(rec, defaults, key, where, 1.0))

    m = Measurement(
        model=_text(rec, defaults, "model", where), gpu=_text(rec, defaults, "gpu", where).lower(),
        isl=max(1, round(isl)), osl=max(1, round(osl)),
        concurrency=_setting(rec, defaults, "concurrency", where),
        tp=n("tp"), pp=n("pp"), dp=n("dp"), replicas=n("replicas"), mode=_text(rec, defaults, "mode", where,
                                                                              "aggregated"),
        prefill_tp=n("prefill_tp"), prefill_replicas=n("prefill_replicas"),
        weights=_WEIGHTS.get(_text(rec, defaults, "weights", where, "bf16").lower(), "bf16"),
        kv_dtype=_KV.get(_text(rec, defaults, "kv_dtype", where, "auto").lower(), "bf16"),
        max_num_batched_tokens=int(_setting(rec, defaults, "max_num_batched_tokens", where, 8192.0)),
        ttft_ms=_metric(rec, where, "median_ttft_ms", "mean_ttft_ms"),
        tpot_ms=_metric(rec, where, "mean_tpot_ms", "median_tpot_ms", "mean_itl_ms", "median_itl_ms"),
        output_tps=_metric(rec, where, "output_throughput"),
        source=where,
    )
    if m.mode not in ("aggregated", "disaggregated"):
        raise SizingInputError(f"--calibrate: {where}.mode must be aggregated or disaggregated (got {m.mode!r})")
    if m.ttft_ms is None and m.tpot_ms is None and m.output_tps is None:
        raise SizingInputError(
            f"--calibrate: {where} has no median_ttft_ms, mean_tpot_ms, mean_itl_ms or output_throughput")
    return m


def read_measurements(path: Path, defaults: dict[str, Any]) -> list[Measurement]:
    """Measurements from a result file; `defaults` fill settings the file does not record.

    Every number is checked (finite, > 0, whole where it must be, within real-world bounds) before
    anything is fitted or saved: a bad record is a SizingInputError (exit 2) naming it.
    """
    return [_measurement(rec, defaults, f"{path.name}[{i}]") for i, rec in enumerate(_records(path))]


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
    t_kv = perf.kv_transfer_time(m.isl, pre.shape, shape, kind)
    ttft, tpot, rate = disagg_closed_loop(perf, pre, shape, m.prefill_replicas, m.replicas, m.concurrency,
                                          wl, q, t_kv)
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
