"""GPU numbers for the planner, read from the hardware profiles so they live in one place."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import yaml

from disaggctl.errors import DisaggError
from disaggctl.resources import data_dir

# `--gpu` names -> hardware profile file names (NVL72 racks are the only GB200/GB300 profiles).
PROFILE_OF: dict[str, str] = {
    "h100": "h100",
    "h200": "h200",
    "b200": "b200",
    "b300": "b300",
    "gb200": "gb200-nvl72",
    "gb300": "gb300-nvl72",
}

# The order matters: "GB200" contains "B200", so the Grace parts are tested first.
_NAME_TOKENS = ("gb300", "gb200", "b300", "b200", "h200", "h100")


@dataclass(frozen=True)
class GpuSpec:
    """Dense per-GPU peaks of one GPU type (units as in the profile files)."""

    key: str
    profile: str
    arch: str
    hbm_gb: float
    hbm_tbps: float
    bf16_tflops: float
    fp8_tflops: float
    fp4_tflops: float
    nvlink_gbps: float  # GB/s per direction
    nvlink_domain_gpus: int
    gpus_per_host: int
    nic_gbps: float  # Gb/s per GPU

    @property
    def blackwell(self) -> bool:
        return self.arch == "blackwell"

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gb * 1e9

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tbps * 1e12

    def peak_flops(self, compute: str) -> float:
        """Dense tensor FLOP/s of `compute` (bf16, fp8, fp4)."""
        tf = {"bf16": self.bf16_tflops, "fp8": self.fp8_tflops, "fp4": self.fp4_tflops}[compute]
        return tf * 1e12

    def with_links(self, nic_gbps: float | None = None, nvlink_domain_gpus: int | None = None) -> GpuSpec:
        return replace(
            self,
            nic_gbps=nic_gbps if nic_gbps is not None else self.nic_gbps,
            nvlink_domain_gpus=nvlink_domain_gpus if nvlink_domain_gpus is not None else self.nvlink_domain_gpus,
        )


def _num(hw: dict[str, Any], key: str, profile: str) -> float:
    value = hw.get(key)
    if not isinstance(value, (int, float)):
        raise DisaggError(f"hardware profile {profile}: hardware.{key} is missing or not a number")
    return float(value)


def load_gpu(gpu: str) -> GpuSpec:
    """The GpuSpec of `gpu` (h100 h200 b200 b300 gb200 gb300) from its hardware profile."""
    key = gpu.lower()
    if key not in PROFILE_OF:
        raise DisaggError(f"unknown GPU {gpu!r}; known: {', '.join(PROFILE_OF)}")
    profile = PROFILE_OF[key]
    path = data_dir("profiles") / f"{profile}.yaml"
    data = yaml.safe_load(path.read_text())
    hw = data.get("hardware") if isinstance(data, dict) else None
    if not isinstance(hw, dict):
        raise DisaggError(f"hardware profile {path} has no hardware: section")
    return GpuSpec(
        key=key,
        profile=profile,
        arch=str(hw.get("arch", "hopper")),
        hbm_gb=_num(hw, "hbm_gb", profile),
        hbm_tbps=_num(hw, "hbm_tbps", profile),
        bf16_tflops=_num(hw, "bf16_tflops", profile),
        fp8_tflops=_num(hw, "fp8_tflops", profile),
        fp4_tflops=_num(hw, "fp4_tflops", profile),
        nvlink_gbps=_num(hw, "nvlink_gbps", profile),
        nvlink_domain_gpus=int(_num(hw, "nvlink_domain_gpus", profile)),
        gpus_per_host=int(_num(hw, "gpus_per_host", profile)),
        nic_gbps=_num(hw, "nic_gbps", profile),
    )


def gpu_key_from_name(name: str | None) -> str | None:
    """Map an NVML product name ("NVIDIA GB200", "NVIDIA H100 80GB HBM3") to a `--gpu` key."""
    if not name:
        return None
    low = name.lower().replace("-", "").replace(" ", "")
    for token in _NAME_TOKENS:
        if token in low:
            return token
    return None
