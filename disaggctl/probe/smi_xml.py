"""Parser of `nvidia-smi -q -x` (standard library only; shipped inside the agent).

The XML carries identity, memory, MIG/persistence/ECC, power, clocks, fabric (NVL72) and C2C,
but no NUMA node, CPU affinity, compute capability or NVLink state: those come from sysfs,
`--query-gpu=compute_cap` and `topo -m`. GPU indices follow the document order, which is
nvidia-smi's own (PCI bus) order.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from .fields import architecture, clean, enum_name, integer, number, on_off


def _text(node: ET.Element | None, path: str) -> str | None:
    if node is None:
        return None
    found = node.find(path)
    return None if found is None or found.text is None else found.text


def _sum(node: ET.Element | None, names: tuple[str, ...]) -> int | None:
    """Sum of the numeric children `names` of an ECC block; None when none of them is a number."""
    if node is None:
        return None
    values = [integer(_text(node, n)) for n in names]
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _ecc(gpu: ET.Element) -> tuple[int | None, int | None]:
    agg = gpu.find("ecc_errors/aggregate")
    if agg is None:
        return None, None
    if agg.find("single_bit") is not None:  # drivers before R535: single_bit/double_bit totals
        return integer(_text(agg, "single_bit/total")), integer(_text(agg, "double_bit/total"))
    corrected = _sum(agg, ("dram_correctable", "sram_correctable"))
    uncorrected = _sum(
        agg, ("dram_uncorrectable", "sram_uncorrectable", "sram_uncorrectable_parity", "sram_uncorrectable_secded")
    )
    return corrected, uncorrected


def _fabric(gpu: ET.Element) -> dict[str, Any]:
    fab = gpu.find("fabric")
    if fab is None:
        return {}
    clique = integer(_text(fab, "cliqueId"))
    return {
        "fabric_state": enum_name(_text(fab, "state")),
        "fabric_status": enum_name(_text(fab, "status")),
        "clique_id": clique,
        "cluster_uuid": clean(_text(fab, "clusterUuid")),
        "fabric_health": enum_name(_text(fab, "health/summary")),
    }


def parse_gpu(gpu: ET.Element, index: int) -> dict[str, Any]:
    power = _text(gpu, "gpu_power_readings/current_power_limit") or _text(gpu, "power_readings/power_limit")
    corrected, uncorrected = _ecc(gpu)
    out: dict[str, Any] = {
        "index": index,
        "uuid": clean(_text(gpu, "uuid")),
        "name": clean(_text(gpu, "product_name")),
        "architecture": architecture(_text(gpu, "product_architecture")),
        "memory_total_mib": integer(_text(gpu, "fb_memory_usage/total")),
        "pci_bus_id": clean(_text(gpu, "pci/pci_bus_id")) or clean(gpu.get("id")),
        "mig_enabled": on_off(_text(gpu, "mig_mode/current_mig")),
        "persistence_mode": on_off(_text(gpu, "persistence_mode")),
        "ecc_corrected": corrected,
        "ecc_uncorrected": uncorrected,
        "power_limit_w": number(power),
        "max_sm_clock_mhz": integer(_text(gpu, "max_clocks/sm_clock")),
        "c2c_mode": enum_name(_text(gpu, "c2c_mode")),
    }
    out.update(_fabric(gpu))
    return {k: v for k, v in out.items() if v is not None}


def parse(text: str) -> dict[str, Any]:
    """`nvidia-smi -q -x` -> a partial HostTopology dict (driver, CUDA version, GPUs)."""
    root = ET.fromstring(text)
    if root.tag != "nvidia_smi_log":
        raise ValueError(f"not an nvidia-smi -q -x document (root element <{root.tag}>)")
    gpus = [parse_gpu(g, i) for i, g in enumerate(root.findall("gpu"))]
    host: dict[str, Any] = {"gpus": gpus}
    driver = clean(_text(root, "driver_version"))
    cuda = clean(_text(root, "cuda_version"))
    if driver:
        host["driver_version"] = driver
    if cuda:
        host["cuda_driver_version"] = cuda
    return host
