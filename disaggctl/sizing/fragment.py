"""Write a recommendation as a complete cluster spec that `disaggctl validate` accepts.

Hosts are placeholders (node1..nodeN with their GPU counts) unless a topology named them;
an aggregated recommendation is written as decode instances that prefill every prompt
locally (prefill replicas 0, the router's threshold above any prompt).
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

from disaggctl.sizing.hardware import GpuSpec
from disaggctl.sizing.perf import ModelInfo
from disaggctl.sizing.search import Candidate, RolePlan, Workload

_LMCACHE_PORT_BASE = 7300


def spec_quantization(model: ModelInfo, weights: str) -> str:
    """The spec's model.quantization for a weights precision (a checkpoint's own format needs none)."""
    native_bits = model.arch.weight_bits
    if weights == "nvfp4":
        return "modelopt_fp4"
    if weights == "fp8":
        return "fp8" if native_bits >= 16 else "none"
    return "none"


def spec_kv_dtype(kv: str) -> str:
    return "fp8" if kv == "fp8" else "auto"


def model_path(model: ModelInfo, weights: str) -> str:
    """The checkpoint to serve; NVFP4 needs a pre-quantized one (NVIDIA publishes `<name>-FP4`)."""
    if weights == "nvfp4" and model.catalog and "/" in model.path:
        return "nvidia/" + model.path.split("/", 1)[1] + "-FP4"
    return model.path


def deployment_name(model: ModelInfo, gpu: GpuSpec) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", f"{model.catalog or model.name.rsplit('/', 1)[-1]}-{gpu.key}".lower())
    return base.strip("-")[:48].strip("-") or "sized"


def _pool(role: RolePlan, moe: bool, prefix_caching: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "replicas": role.replicas,
        "tensor_parallel": role.tp,
        "pipeline_parallel": role.pp,
        "data_parallel": role.dp,
        "max_num_batched_tokens": role.max_num_batched_tokens,
        "max_num_seqs": role.max_num_seqs,
    }
    if moe and role.dp > 1:
        out["expert_parallel"] = True
    if prefix_caching:
        out["enable_prefix_caching"] = True
    return out


def hosts(gpus: int, gpu: GpuSpec, names: list[tuple[str, int]] | None = None) -> list[dict[str, Any]]:
    """Placeholder hosts holding `gpus` GPUs (or the probed hosts), with NVLink domains on NVL72 racks."""
    if names:
        listed = [{"name": n, "gpus": g} for n, g in names]
    else:
        per = gpu.gpus_per_host
        listed = [{"name": f"node{i + 1}", "gpus": min(per, gpus - i * per)} for i in range(math.ceil(gpus / per))]
    if gpu.nvlink_domain_gpus > gpu.gpus_per_host:
        per_domain = max(1, gpu.nvlink_domain_gpus // gpu.gpus_per_host)
        for i, h in enumerate(listed):
            h["nvlink_domain"] = f"nvl{gpu.nvlink_domain_gpus}-{i // per_domain}"
    return listed


def build_spec(
    model: ModelInfo,
    gpu: GpuSpec,
    wl: Workload,
    c: Candidate,
    host_names: list[tuple[str, int]] | None = None,
) -> dict[str, Any]:
    max_len = 1 << math.ceil(math.log2(max(1024, wl.isl + wl.osl)))
    if model.max_context is not None:
        max_len = max(wl.isl + wl.osl, min(max_len, model.max_context))
    mdl: dict[str, Any] = {
        "path": model_path(model, c.weights),
        "quantization": spec_quantization(model, c.weights),
        "kv_cache_dtype": spec_kv_dtype(c.kv_dtype),
        "max_model_len": max_len,
    }
    if model.catalog:
        mdl["catalog"] = model.catalog
    else:
        mdl["architecture"] = model.arch.model_dump(exclude_none=True)
    multi_round = wl.multi_round_share > 0
    spec: dict[str, Any] = {
        "name": deployment_name(model, gpu),
        "profiles": [gpu.profile],
        "model": mdl,
        "hosts": hosts(c.gpus_used, gpu, host_names),
    }
    if c.prefill is None:
        spec["prefill"] = {"replicas": 0}
        spec["decode"] = _pool(c.decode, model.moe, multi_round)
        spec["kv_transfer"] = {"kind": "nixl"}
        spec["router"] = {"local_prefill_threshold": max_len}
    else:
        spec["prefill"] = _pool(c.prefill, model.moe, multi_round)
        spec["decode"] = _pool(c.decode, model.moe, multi_round)
        if c.connector == "lmcache":
            width = max(100, c.decode.tp * c.decode.replicas)
            spec["kv_transfer"] = {
                "kind": "lmcache",
                "init_port": _LMCACHE_PORT_BASE,
                "alloc_port": _LMCACHE_PORT_BASE + width,
                "proxy_port": _LMCACHE_PORT_BASE + 2 * width,
            }
            spec["kv_offload"] = {"enabled": True}
        else:
            spec["kv_transfer"] = {"kind": "nixl"}
        spec["router"] = {"local_prefill_threshold": c.local_prefill_threshold or 0}
    spec["target"] = {"kind": "systemd"}
    spec["workload"] = {"isl": wl.isl, "osl": wl.osl, "multi_round_share": wl.multi_round_share}
    return spec


def render(spec: dict[str, Any], header: str) -> str:
    lines = "".join(f"# {line}\n" for line in header.splitlines())
    return lines + yaml.safe_dump(spec, sort_keys=False, default_flow_style=False)
