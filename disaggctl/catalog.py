"""Model architecture numbers and a small built-in catalog of common models.

The numbers are the ones in each model's published `config.json`; they let disaggctl check
tensor-parallel divisibility and memory fit, and let the sizing planner estimate FLOPs and
KV-cache bytes without downloading anything.
"""

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelArchitecture(BaseModel):
    """The numbers of a transformer that placement and sizing need."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: int = Field(ge=1, description="Number of transformer layers (num_hidden_layers).")
    hidden_size: int = Field(ge=1, description="Model width (hidden_size).")
    attention_heads: int = Field(ge=1, description="Query attention heads (num_attention_heads).")
    kv_heads: int = Field(
        ge=1, description="Key/value heads (num_key_value_heads; equal to attention_heads without GQA)."
    )
    head_dim: int = Field(ge=1, description="Dimension of one attention head.")
    params_b: float = Field(gt=0, description="Total parameters, in billions.")
    active_params_b: float | None = Field(
        default=None, gt=0, description="Parameters used per token (MoE models), in billions; defaults to params_b."
    )
    vocab_size: int = Field(default=128256, ge=1, description="Vocabulary size.")
    kv_latent_dim: int | None = Field(
        default=None,
        ge=1,
        description="Multi-head latent attention (DeepSeek MLA): cached values per token per layer "
        "(kv_lora_rank + qk_rope_head_dim). Replaces 2 x kv_heads x head_dim when set.",
    )
    experts: int | None = Field(default=None, ge=1, description="Routed experts (MoE models).")
    hybrid: bool = Field(
        default=False,
        description="Some layers are not full attention (sliding-window or Mamba/linear-attention layers): "
        "vLLM's hybrid KV-cache manager, which the NIXL connector treats differently (see docs/compat.md).",
    )
    mamba: bool = Field(
        default=False, description="Has Mamba/SSM state layers (implies hybrid); NIXL transfers their state too."
    )
    weight_bits: float = Field(
        default=16, gt=0, description="Bits per weight of the checkpoint as published (16 for BF16, 4.25 for MXFP4)."
    )

    @property
    def active_b(self) -> float:
        return self.active_params_b or self.params_b

    def kv_values_per_token(self) -> int:
        """Cached scalars per token over all layers (K and V, or the MLA latent)."""
        per_layer = self.kv_latent_dim if self.kv_latent_dim else 2 * self.kv_heads * self.head_dim
        return self.layers * per_layer

    def kv_bytes_per_token(self, kv_bytes: float = 2.0) -> float:
        """KV-cache bytes per token: 2 x layers x kv_heads x head_dim x bytes (BF16 2, FP8 1)."""
        return self.kv_values_per_token() * kv_bytes

    def weight_bytes(self, bits: float | None = None) -> float:
        """Bytes of the weights at `bits` per parameter (the checkpoint's own precision by default)."""
        return self.params_b * 1e9 * (bits if bits is not None else self.weight_bits) / 8


class CatalogEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    hub_id: str
    architecture: ModelArchitecture


CATALOG: dict[str, CatalogEntry] = {
    e.key: e
    for e in (
        CatalogEntry(
            key="llama-3.1-8b",
            hub_id="meta-llama/Llama-3.1-8B-Instruct",
            architecture=ModelArchitecture(
                layers=32, hidden_size=4096, attention_heads=32, kv_heads=8, head_dim=128, params_b=8.03
            ),
        ),
        CatalogEntry(
            key="llama-3.1-70b",
            hub_id="meta-llama/Llama-3.1-70B-Instruct",
            architecture=ModelArchitecture(
                layers=80, hidden_size=8192, attention_heads=64, kv_heads=8, head_dim=128, params_b=70.6
            ),
        ),
        CatalogEntry(
            key="llama-3.1-405b",
            hub_id="meta-llama/Llama-3.1-405B-Instruct",
            architecture=ModelArchitecture(
                layers=126, hidden_size=16384, attention_heads=128, kv_heads=8, head_dim=128, params_b=405.9
            ),
        ),
        CatalogEntry(
            key="qwen3-32b",
            hub_id="Qwen/Qwen3-32B",
            architecture=ModelArchitecture(
                layers=64,
                hidden_size=5120,
                attention_heads=64,
                kv_heads=8,
                head_dim=128,
                params_b=32.8,
                vocab_size=151936,
            ),
        ),
        CatalogEntry(
            key="deepseek-v3",
            hub_id="deepseek-ai/DeepSeek-V3",
            architecture=ModelArchitecture(
                layers=61,
                hidden_size=7168,
                attention_heads=128,
                kv_heads=128,
                head_dim=128,
                params_b=671,
                active_params_b=37,
                vocab_size=129280,
                kv_latent_dim=576,
                experts=256,
                weight_bits=8,
            ),
        ),
        CatalogEntry(
            key="gpt-oss-120b",
            hub_id="openai/gpt-oss-120b",
            architecture=ModelArchitecture(
                layers=36,
                hidden_size=2880,
                attention_heads=64,
                kv_heads=8,
                head_dim=64,
                params_b=116.8,
                active_params_b=5.1,
                vocab_size=201088,
                experts=128,
                weight_bits=4.25,
                hybrid=True,  # alternating sliding-window (128 tokens) and full-attention layers
            ),
        ),
    )
}


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", s.lower()).strip("-")


def lookup(name_or_path: str) -> CatalogEntry | None:
    """Find a catalog entry by key, hub id, or a local path/hub id that contains a known key.

    `meta-llama/Llama-3.1-70B-Instruct`, `llama-3.1-70b` and `/models/Llama-3.1-70B-FP4` all
    resolve to llama-3.1-70b.
    """
    n = _norm(name_or_path)
    if n in CATALOG:
        return CATALOG[n]
    for entry in CATALOG.values():
        if _norm(entry.hub_id) == n:
            return entry
    base = _norm(Path(name_or_path).name)
    # longest key first so "llama-3.1-405b" is not shadowed by a shorter prefix
    for key in sorted(CATALOG, key=len, reverse=True):
        if re.search(rf"(^|-){re.escape(key)}($|-)", base):
            return CATALOG[key]
    return None


def from_hf_config(config: dict[str, Any]) -> ModelArchitecture:
    """Build the architecture numbers from a Hugging Face `config.json` mapping."""
    cfg = config.get("text_config", config)
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layers = int(cfg["num_hidden_layers"])
    vocab = int(cfg.get("vocab_size", 32000))
    inter = int(cfg.get("intermediate_size", 4 * hidden))
    experts = cfg.get("n_routed_experts") or cfg.get("num_local_experts") or cfg.get("num_experts")
    kinds = {str(k).lower() for k in (cfg.get("layer_types") or cfg.get("layers_block_type") or [])}
    mamba = bool(kinds & {"mamba", "linear_attention", "ssm"}) or "mamba" in str(cfg.get("model_type", ""))
    hybrid = mamba or bool(kinds - {"full_attention", "attention"}) or bool(cfg.get("sliding_window_pattern"))
    latent = None
    if cfg.get("kv_lora_rank"):
        latent = int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim", 0))
    # dense estimate: attention (q, o + k, v) + 3 MLP matrices per layer + embeddings
    attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * inter
    total = layers * (attn + mlp) + 2 * vocab * hidden
    active = None
    if experts:
        moe_inter = int(cfg.get("moe_intermediate_size", inter))
        per_tok = int(cfg.get("num_experts_per_tok", 1))
        total = layers * (attn + 3 * hidden * moe_inter * int(experts)) + 2 * vocab * hidden
        active = (layers * (attn + 3 * hidden * moe_inter * per_tok) + 2 * vocab * hidden) / 1e9
    return ModelArchitecture(
        layers=layers,
        hidden_size=hidden,
        attention_heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        params_b=total / 1e9,
        active_params_b=active,
        vocab_size=vocab,
        kv_latent_dim=latent,
        experts=int(experts) if experts else None,
        hybrid=hybrid,
        mamba=mamba,
    )


def load_hf_config(path: Path) -> ModelArchitecture:
    """Read a `config.json` (or a model folder holding one)."""
    p = path / "config.json" if path.is_dir() else path
    return from_hf_config(json.loads(p.read_text()))
