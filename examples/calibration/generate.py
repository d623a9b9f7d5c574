"""Regenerate b200-llama-3.1-70b-fp8.json: synthetic `vllm bench serve` results from the planner's
own model at compute 0.38, memory 0.58, with +-3% noise (run after changing the model)."""

from __future__ import annotations

import json
from pathlib import Path

from disaggctl.catalog import CATALOG
from disaggctl.sizing.calibrate import Measurement, predict
from disaggctl.sizing.hardware import load_gpu
from disaggctl.sizing.perf import Efficiency, ModelInfo

entry = CATALOG["llama-3.1-70b"]
model = ModelInfo(entry.key, entry.hub_id, entry.architecture, entry.key)
eff = Efficiency(compute=0.38, memory=0.58)
records = []
for clients, noise in ((8, 1.03), (32, 0.97), (128, 1.02)):
    m = Measurement(model="llama-3.1-70b", gpu="b200", isl=1024, osl=256, concurrency=clients, tp=8,
                    weights="fp8", kv_dtype="fp8")
    ttft, tpot, tps = predict(model, load_gpu("b200"), eff, m)
    ttft, tpot, tps = ttft * noise, tpot * (2 - noise), tps * noise
    n, osl = 512, 256
    duration = n * osl / tps
    records.append({
        "date": "20261120-101500", "endpoint_type": "openai", "backend": "openai", "label": None,
        "model_id": entry.hub_id, "tokenizer_id": entry.hub_id, "num_prompts": n,
        # --metadata gpu=b200 tp=8 quantization=fp8 kv_cache_dtype=fp8
        "gpu": "b200", "tp": "8", "quantization": "fp8", "kv_cache_dtype": "fp8",
        "request_rate": "inf", "burstiness": 1.0, "max_concurrency": clients,
        "duration": round(duration, 2), "completed": n, "failed": 0,
        "total_input_tokens": n * 1024, "total_output_tokens": n * osl,
        "request_throughput": round(n / duration, 3), "output_throughput": round(tps, 1),
        "total_token_throughput": round(n * (osl + 1024) / duration, 1),
        "mean_ttft_ms": round(ttft * 1.1, 2), "median_ttft_ms": round(ttft, 2),
        "std_ttft_ms": round(ttft * 0.3, 2), "p99_ttft_ms": round(ttft * 2.5, 2),
        "mean_tpot_ms": round(tpot, 3), "median_tpot_ms": round(tpot * 0.99, 3),
        "std_tpot_ms": round(tpot * 0.05, 3), "p99_tpot_ms": round(tpot * 1.2, 3),
        "mean_itl_ms": round(tpot, 3), "median_itl_ms": round(tpot * 0.97, 3),
        "std_itl_ms": round(tpot * 0.2, 3), "p99_itl_ms": round(tpot * 2.0, 3),
    })
out = Path(__file__).with_name("b200-llama-3.1-70b-fp8.json")
out.write_text(json.dumps(records, indent=2) + "\n")
