"""The explicit performance model of the sizing planner (docs/sizing.md gives every formula).

Everything is a roofline: a forward step takes its compute time (FLOPs over the dense peak of
the precision used, times a compute efficiency) and its memory time (bytes of weights and KV
read over HBM bandwidth, times a memory efficiency), overlapped only partly (STEP_OVERLAP),
plus tensor-parallel communication and a fixed per-step overhead. Efficiencies are at most 1,
so no prediction beats the hardware's peaks; `calibrate` fits them from measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from disaggctl.catalog import ModelArchitecture
from disaggctl.sizing.hardware import GpuSpec

# Scheduler, sampling and kernel launches per forward step (CUDA graphs on), seconds.
STEP_OVERHEAD_S = 0.4e-3
# Per request on the disaggregated path: router hop, NIXL notification and block lookup, seconds.
HOP_S = {"nvlink": 0.5e-3, "nic": 1.0e-3}
# Latency of one collective (all-reduce, all-to-all, PP send), seconds.
COLLECTIVE_ALPHA_S = {"nvlink": 5e-6, "nic": 20e-6}
# vLLM's --gpu-memory-utilization the planner assumes (and writes into nothing: vLLM's default 0.92
# minus a little slack for fragmentation).
GPU_MEMORY_UTILIZATION = 0.9
# CUDA context, NCCL buffers and CUDA graphs per GPU, bytes.
FIXED_RESERVE_BYTES = 2 * 2**30
# Peak activation bytes per batched token, in units of hidden_size x 2 bytes (MLP intermediate,
# attention temporaries; vLLM profiles this at max_num_batched_tokens).
ACTIVATION_HIDDEN_FACTOR = 16
# Share of the shorter of (memory time, compute time) hidden under the longer one in a forward
# step. 1 would be a perfect roofline (max); 0 the plain sum. Kernels of one step mostly run one
# after another (GEMMs are compute-bound at large batch, attention reads KV), so a step at the
# ridge point takes close to the sum. Assumption, chosen against AIConfigurator's measured
# per-kernel vLLM database (bench/sizing_reference).
STEP_OVERLAP = 0.3
# Low-precision GEMMs reach a smaller share of their (higher) peak than BF16 ones, per GPU
# generation (docs/sizing.md, "Efficiency factors", names the source of each).
LOW_PRECISION_FACTOR: dict[str, dict[str, float]] = {
    "hopper": {"bf16": 1.0, "fp8": 0.85, "fp4": 0.0},
    "blackwell": {"bf16": 1.0, "fp8": 0.85, "fp4": 0.7},
}
# Share of a multi-round request's prompt that an earlier round already cached.
MULTI_ROUND_REUSE = 0.75

WEIGHT_BITS = {"bf16": 16.0, "fp8": 8.0, "nvfp4": 4.5, "mxfp4": 4.25}
KV_BYTES = {"bf16": 2.0, "fp8": 1.0}


@dataclass(frozen=True)
class Efficiency:
    """Shares of the peaks the serving stack reaches on one GPU type (0 < x <= 1)."""

    compute: float  # of the dense tensor peak, in prefill-sized GEMMs
    memory: float  # of HBM bandwidth, in decode steps
    link: float = 0.8  # of NVLink / NIC bandwidth, for KV transfer and collectives
    source: str = "default"

    def __post_init__(self) -> None:
        for name in ("compute", "memory", "link"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"efficiency {name} must be in (0, 1], got {v}")


# Defaults per GPU type (BF16 prefill share of the dense peak; HBM share in decode); sources and
# assumptions in docs/sizing.md. `size --calibrate` replaces them for a cluster.
DEFAULT_EFFICIENCY: dict[str, Efficiency] = {
    "h100": Efficiency(compute=0.62, memory=0.78),
    "h200": Efficiency(compute=0.62, memory=0.76),
    "b200": Efficiency(compute=0.58, memory=0.74),
    "b300": Efficiency(compute=0.58, memory=0.74),
    "gb200": Efficiency(compute=0.40, memory=0.76),
    "gb300": Efficiency(compute=0.40, memory=0.76),
}

# Longest sequence (max_position_embeddings) of the catalog models; a config.json gives its own.
MAX_CONTEXT = {
    "llama-3.1-8b": 131072, "llama-3.1-70b": 131072, "llama-3.1-405b": 131072,
    "qwen3-32b": 40960, "deepseek-v3": 163840, "gpt-oss-120b": 131072,
}


@dataclass(frozen=True)
class Precision:
    """Weights precision (bf16 fp8 nvfp4 mxfp4) and KV-cache dtype (bf16 fp8)."""

    weights: str
    kv: str

    @property
    def weight_bits(self) -> float:
        return WEIGHT_BITS[self.weights]

    @property
    def kv_bytes(self) -> float:
        return KV_BYTES[self.kv]

    def compute(self, gpu: GpuSpec) -> str:
        """Tensor-core precision of the GEMMs (MXFP4 on Hopper is weight-only: BF16 math)."""
        if self.weights in ("nvfp4", "mxfp4"):
            return "fp4" if gpu.blackwell and gpu.fp4_tflops > 0 else "bf16"
        return "fp8" if self.weights == "fp8" else "bf16"


@dataclass(frozen=True, order=True)
class Shape:
    """Parallelism of one vLLM instance: TP x PP x DP GPUs (DP with expert parallelism for MoE)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def label(self) -> str:
        out = f"TP{self.tp}"
        if self.pp > 1:
            out += f" PP{self.pp}"
        if self.dp > 1:
            out += f" DP{self.dp}"
        return out


@dataclass(frozen=True)
class ModelInfo:
    """The model being sized: a catalog key or a config.json, with its architecture numbers."""

    name: str
    path: str
    arch: ModelArchitecture
    catalog: str | None = None
    max_context: int | None = None  # max_position_embeddings; None: unknown (not checked)

    @property
    def moe(self) -> bool:
        return bool(self.arch.experts) and self.arch.active_b < self.arch.params_b


@dataclass
class Perf:
    """Step-time, transfer and memory formulas for one model, GPU type, efficiency and precision."""

    model: ModelInfo
    gpu: GpuSpec
    eff: Efficiency
    prec: Precision
    flops_per_token: float = field(init=False)
    attn_coef: float = field(init=False)
    peak: float = field(init=False)
    bw: float = field(init=False)
    kv_token: float = field(init=False)
    w_total: float = field(init=False)
    w_active: float = field(init=False)

    def __post_init__(self) -> None:
        a = self.model.arch
        # 2 FLOPs (multiply + add) per active parameter per token
        self.flops_per_token = 2 * a.active_b * 1e9
        # causal attention over s tokens: QK^T and AV, 2 x 2 x s^2/2 x heads x head_dim per layer
        self.attn_coef = 2.0 * a.layers * a.attention_heads * a.head_dim
        compute = self.prec.compute(self.gpu)
        gen = "blackwell" if self.gpu.blackwell else "hopper"
        self.peak = self.gpu.peak_flops(compute) * self.eff.compute * LOW_PRECISION_FACTOR[gen][compute]
        self.bw = self.gpu.hbm_bytes_per_s * self.eff.memory
        self.kv_token = a.kv_bytes_per_token(self.prec.kv_bytes)
        self.w_total = a.params_b * 1e9 * self.prec.weight_bits / 8
        self.w_active = a.active_b * 1e9 * self.prec.weight_bits / 8 if self.model.moe else self.w_total

    # ------------------------------------------------------------------ memory

    def kv_shards(self, shape: Shape) -> int:
        """TP ranks the KV of a token is split over (MLA latents and TP > kv_heads replicate it)."""
        a = self.model.arch
        return 1 if a.kv_latent_dim else min(shape.tp, a.kv_heads)

    def weights_resident(self, shape: Shape) -> float:
        """Weight bytes held by one GPU: dense part split by TP x PP, experts also by DP (EP)."""
        experts = self.w_total - self.w_active
        return self.w_active / (shape.tp * shape.pp) + experts / (shape.tp * shape.pp * shape.dp)

    def kv_token_resident(self, shape: Shape) -> float:
        """KV bytes per cached token on one GPU."""
        return self.kv_token / (self.kv_shards(shape) * shape.pp)

    def activation_bytes(self, max_batched_tokens: int, max_seqs: int) -> float:
        a = self.model.arch
        return max_batched_tokens * a.hidden_size * 2 * ACTIVATION_HIDDEN_FACTOR + max_seqs * a.vocab_size * 4

    def kv_capacity_tokens(self, shape: Shape, max_batched_tokens: int, max_seqs: int) -> int:
        """Tokens of KV one DP rank can cache after weights and headroom; <= 0 when nothing fits."""
        free = (
            self.gpu.hbm_bytes * GPU_MEMORY_UTILIZATION
            - self.weights_resident(shape)
            - FIXED_RESERVE_BYTES
            - self.activation_bytes(max_batched_tokens, max_seqs)
        )
        return int(free / self.kv_token_resident(shape)) if free > 0 else 0

    # ------------------------------------------------------------------ links

    def link_kind(self, gpus: int) -> str:
        return "nvlink" if gpus <= self.gpu.nvlink_domain_gpus else "nic"

    def link_bytes_per_s(self, kind: str) -> float:
        raw = self.gpu.nvlink_gbps * 1e9 if kind == "nvlink" else self.gpu.nic_gbps * 1e9 / 8
        return raw * self.eff.link

    def comm_time(self, shape: Shape, tokens: float, steps: int = 1) -> float:
        """TP all-reduces, EP all-to-alls and PP sends for `tokens` tokens per DP rank."""
        a = self.model.arch
        act = tokens * a.hidden_size * 2  # BF16 activations
        t = 0.0
        if shape.tp > 1:
            kind = self.link_kind(shape.tp)
            # two ring all-reduces per layer move 2 (tp-1)/tp of the activations each
            t += 2 * a.layers * (steps * COLLECTIVE_ALPHA_S[kind]
                                 + 2 * (shape.tp - 1) / shape.tp * act / self.link_bytes_per_s(kind))
        if shape.dp > 1 and self.model.moe:
            kind = self.link_kind(shape.tp * shape.dp)
            # dispatch + combine per MoE layer
            t += 2 * a.layers * (steps * COLLECTIVE_ALPHA_S[kind]
                                 + (shape.dp - 1) / shape.dp * act / self.link_bytes_per_s(kind))
        if shape.pp > 1:
            kind = self.link_kind(shape.gpus)
            t += (shape.pp - 1) * (steps * COLLECTIVE_ALPHA_S[kind] + act / self.link_bytes_per_s(kind))
        return t

    # ------------------------------------------------------------------ step times

    def weights_read(self, shape: Shape, tokens_all_ranks: float) -> float:
        """Weight bytes one GPU reads in a step (over all PP stages in turn: latency, not per stage).

        MoE: each token touches about active/total of the expert weights; after n tokens the
        touched share is 1 - (1 - active/total)^n.
        """
        experts = self.w_total - self.w_active
        if experts <= 0:
            return self.w_total / shape.tp
        share = self.w_active / self.w_total
        touched: float = 1 - (1 - share) ** max(1.0, tokens_all_ranks)
        return self.w_active / shape.tp + experts * touched / (shape.tp * shape.dp)

    def step_time(self, shape: Shape, tokens: float, ctx_tokens: float, attn_flops: float, steps: int = 1) -> float:
        """Time of `steps` forward steps processing `tokens` new tokens per DP rank in total.

        memory = steps x weights read + KV read (ctx_tokens) + KV written (tokens)
        compute = tokens x 2 x active params + attention FLOPs, over TP GPUs
        time = max(memory, compute) + (1 - STEP_OVERLAP) x min(memory, compute) + comm + overhead
        """
        kv_bytes = (ctx_tokens + tokens) * self.kv_token / self.kv_shards(shape)
        mem = (steps * self.weights_read(shape, tokens / steps * shape.dp) + kv_bytes) / self.bw
        comp = (tokens * self.flops_per_token + attn_flops) / (shape.tp * self.peak)
        body = max(mem, comp) + (1 - STEP_OVERLAP) * min(mem, comp)
        return body + self.comm_time(shape, tokens, steps) + steps * STEP_OVERHEAD_S

    def decode_step(self, shape: Shape, batch: float, ctx: float) -> float:
        """One decode step of `batch` sequences per DP rank with `ctx` cached tokens each."""
        return self.step_time(shape, batch, batch * ctx, 2 * self.attn_coef * ctx * batch)

    def mixed_step(self, shape: Shape, batch: float, ctx: float, prefill_tokens: float, prompt: float) -> float:
        """A decode step that also carries `prefill_tokens` of prompts `prompt` tokens long (chunked)."""
        attn = 2 * self.attn_coef * ctx * batch + self.attn_coef * prefill_tokens * prompt
        # a chunk of a longer prompt reads the KV of the prompt's earlier chunks (half of it, on average)
        prefix = prompt / 2 if prompt > prefill_tokens else 0.0
        return self.step_time(shape, batch + prefill_tokens, batch * ctx + prefix, attn)

    def prefill_time(self, shape: Shape, isl: int, prompts: int = 1, max_batched_tokens: int = 8192) -> float:
        """Prefill `prompts` prompts of `isl` tokens in chunks of at most max_batched_tokens."""
        tokens = prompts * isl
        steps = max(1, math.ceil(tokens / max_batched_tokens))
        attn = prompts * self.attn_coef * isl * isl
        # chunk j re-reads the KV of the j earlier chunks once: (steps - 1) / 2 x tokens in all
        reread = tokens * (steps - 1) / 2
        return self.step_time(shape, tokens, reread, attn, steps)

    # ------------------------------------------------------------------ KV transfer

    def kv_transfer_time(self, isl: float, prefill: Shape, decode: Shape, kind: str) -> float:
        """Move the KV of an `isl`-token prompt from prefill to decode, plus the per-request hop.

        Each prefill TP rank sends its own shard over its own link, so min(tp_p, tp_d, shards)
        links run in parallel.
        """
        links = max(1, min(self.kv_shards(prefill), self.kv_shards(decode)))
        return isl * self.kv_token / (links * self.link_bytes_per_s(kind)) + HOP_S[kind]
