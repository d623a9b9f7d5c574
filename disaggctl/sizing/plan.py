"""The sizing problem (model, GPU pools, workload, SLA, load) and the candidate layouts it yields."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from disaggctl.sizing.hardware import GpuSpec
from disaggctl.sizing.perf import Efficiency, ModelInfo, Shape
from disaggctl.sizing.roles import Workload


@dataclass(frozen=True)
class Sla:
    ttft_ms: float
    tpot_ms: float
    percentile: float = 90.0
    itl_ms: float | None = None  # inter-token latency at the percentile (aggregated prefill chunks stall it)

    def met(self, ttft_ms: float, tpot_ms: float, itl_ms: float) -> bool:
        return (ttft_ms <= self.ttft_ms * 1.0001 and tpot_ms <= self.tpot_ms * 1.0001
                and (self.itl_ms is None or itl_ms <= self.itl_ms * 1.0001))

    @property
    def q(self) -> float:
        return self.percentile / 100


@dataclass(frozen=True)
class Pool:
    """GPUs of one type in the budget."""

    gpu: GpuSpec
    gpus: int
    efficiency: Efficiency


@dataclass(frozen=True)
class Problem:
    model: ModelInfo
    gpu: GpuSpec
    gpus: int
    workload: Workload
    sla: Sla
    efficiency: Efficiency
    rate: float | None = None  # requests/s, open loop
    concurrency: int | None = None  # clients, closed loop
    weights: tuple[str, ...] = ()  # allowed weight precisions; empty: all that apply
    kv_dtypes: tuple[str, ...] = ("bf16", "fp8")
    modes: tuple[str, ...] = ("aggregated", "disaggregated")
    second: Pool | None = None  # a second GPU type (mixed fleet)
    prefill_on: str | None = None  # mixed fleet: the GPU type prefill runs on; None: try both

    @property
    def pools(self) -> tuple[Pool, ...]:
        first = Pool(self.gpu, self.gpus, self.efficiency)
        return (first, self.second) if self.second else (first,)

    @property
    def budget(self) -> int:
        """GPUs of the budget: throughput per GPU divides by all of them, idle ones included."""
        return self.gpus + (self.second.gpus if self.second else 0)


@dataclass(frozen=True)
class RolePlan:
    tp: int
    pp: int
    dp: int
    replicas: int
    max_num_batched_tokens: int
    max_num_seqs: int
    gpu: str = ""  # GPU type the role runs on

    @property
    def shape(self) -> Shape:
        return Shape(self.tp, self.pp, self.dp)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.replicas


@dataclass(frozen=True)
class Candidate:
    mode: str  # aggregated | disaggregated
    weights: str  # bf16 fp8 nvfp4 mxfp4
    kv_dtype: str  # bf16 fp8
    decode: RolePlan  # the aggregated instances when mode is aggregated
    prefill: RolePlan | None
    batch: float  # decode sequences per DP rank (per micro-batch with PP); not only integers under load
    ttft_ms: float
    tpot_ms: float
    request_rate: float
    output_tps: float
    gpus_used: int
    budget: int = 0  # GPUs of the budget (0: gpus_used)
    itl_ms: float = 0.0  # inter-token latency at the SLA percentile
    kv_link: str | None = None
    kv_transfer_ms: float | None = None
    meets_sla: bool = True
    local_prefill_threshold: int | None = None
    connector: str | None = None
    also: RolePlan | None = None  # mixed fleet, replicated aggregated: the instances on the second GPU type

    @property
    def tps_per_gpu(self) -> float:
        """Output tokens/s per GPU of the budget (idle budgeted GPUs count)."""
        return self.output_tps / (self.budget or self.gpus_used)

    @property
    def tps_per_user(self) -> float:
        return 1000.0 / self.tpot_ms

    @property
    def replicated(self) -> bool:
        return self.prefill is None and (self.decode.replicas > 1 or self.also is not None)

    @property
    def layout(self) -> str:
        if self.prefill is None:
            extra = f" + {self.also.replicas}x agg" if self.also else ""
            return f"{self.decode.replicas}x agg{extra}"
        return f"{self.prefill.replicas}P{self.decode.replicas}D"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(layout=self.layout, tps_per_gpu=self.tps_per_gpu, tps_per_user=self.tps_per_user)
        return d
