"""The probe against a real NVIDIA GPU: real NVML and the nvidia-smi fallback must agree.

Runs only where a GPU is present (the lent device machine); skipped everywhere else.
scripts/gpu_probe_check.sh records the same comparison (and the raw captures) on such a machine.
"""

from __future__ import annotations

import os
import shutil

import pytest

from disaggctl.probe.checks import detect_problems
from disaggctl.probe.remote import probe_local

HAS_GPU = os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU on this machine")
def test_real_nvml_and_nvidia_smi_agree() -> None:
    nv = probe_local(mode="nvml")
    smi = probe_local(mode="smi")
    assert nv.ok and smi.ok, (nv.error, smi.error)
    assert nv.topology and smi.topology
    a, b = nv.topology, smi.topology
    assert a.source == "nvml" and b.source == "nvidia-smi"
    assert len(a.gpus) == len(b.gpus) >= 1
    assert a.driver_version == b.driver_version
    for ga, gb in zip(a.gpus, b.gpus, strict=True):
        assert (ga.uuid, ga.name, ga.pci_bus_id, ga.architecture) == (gb.uuid, gb.name, gb.pci_bus_id, gb.architecture)
        assert ga.architecture in ("hopper", "blackwell", "ampere", "ada")
        assert ga.compute_capability and ga.memory_total_mib and ga.memory_total_mib > 1024
    assert not [p for p in detect_problems(a) if p.code in ("no_gpus", "nvlink_down")]

