"""Linux sysfs readers and format helpers for the probe agent (standard library only).

This module is shipped to the hosts inside the agent program, so it must not import anything
outside the standard library. NICs come from /sys/class/infiniband (they are not NVML
devices); a GPU's NUMA node and CPU list come from its PCI device directory.
"""

from __future__ import annotations

import os
import re
from typing import Any

_RATE_RE = re.compile(r"([0-9.]+)\s*Gb/sec")


def sysfs_root() -> str:
    # Tests point this at a fake tree; real hosts use /sys.
    return os.environ.get("DISAGGCTL_PROBE_SYSFS", "/sys")


def read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def format_cpulist(cpus: list[int]) -> str:
    """[0, 1, 2, 3, 8] -> "0-3,8" (the kernel's cpulist format)."""
    out: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def cpulist_from_mask(words: list[int], bits: int = 64) -> str:
    """NVML's CPU affinity (an array of 64-bit words, lowest CPUs first) as a cpulist."""
    cpus = [w * bits + b for w, word in enumerate(words) for b in range(bits) if word >> b & 1]
    return format_cpulist(cpus)


def sysfs_bus_id(bus_id: str) -> str:
    """NVML/nvidia-smi bus ids carry an 8-digit domain ("00000000:1A:00.0"); sysfs uses 4 lowercase."""
    bus_id = bus_id.strip().lower()
    domain, _, rest = bus_id.partition(":")
    if not rest:
        return bus_id
    return f"{int(domain, 16):04x}:{rest}"


def gpu_pci_info(bus_id: str) -> dict[str, Any]:
    """numa_node and cpu_affinity of a PCI device from sysfs; empty where sysfs has no answer."""
    base = os.path.join(sysfs_root(), "bus", "pci", "devices", sysfs_bus_id(bus_id))
    out: dict[str, Any] = {}
    numa = read(os.path.join(base, "numa_node"))
    if numa is not None and re.fullmatch(r"\d+", numa):  # -1 means "no NUMA information"
        out["numa_node"] = int(numa)
    cpus = read(os.path.join(base, "local_cpulist"))
    if cpus:
        out["cpu_affinity"] = cpus
    return out


def _port_state(text: str | None) -> str | None:
    # "4: ACTIVE" -> "ACTIVE"
    if not text:
        return None
    return text.split(":", 1)[-1].strip() or None


def _rate_gbps(text: str | None) -> float | None:
    # "400 Gb/sec (4X NDR)" -> 400.0
    m = _RATE_RE.search(text or "")
    return float(m.group(1)) if m else None


def read_nics() -> list[dict[str, Any]]:
    """RDMA NICs (one entry per port) from /sys/class/infiniband."""
    base = os.path.join(sysfs_root(), "class", "infiniband")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    nics: list[dict[str, Any]] = []
    for name in names:
        dev = os.path.join(base, name)
        numa = read(os.path.join(dev, "device", "numa_node"))
        link = os.path.realpath(os.path.join(dev, "device"))
        base_name = os.path.basename(link)
        pci = base_name if re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-9a-f]", base_name) else None
        try:
            ports = sorted(os.listdir(os.path.join(dev, "ports")), key=lambda p: int(p) if p.isdigit() else 0)
        except OSError:
            ports = []
        for port in ports or ["1"]:
            pdir = os.path.join(dev, "ports", port)
            nic: dict[str, Any] = {"name": name, "port": int(port) if port.isdigit() else 1}
            if numa is not None and re.fullmatch(r"\d+", numa):
                nic["numa_node"] = int(numa)
            if pci:
                nic["pci_bus_id"] = pci
            state = _port_state(read(os.path.join(pdir, "state")))
            if state:
                nic["state"] = state
            rate = _rate_gbps(read(os.path.join(pdir, "rate")))
            if rate is not None:
                nic["rate_gbps"] = rate
            layer = read(os.path.join(pdir, "link_layer"))
            if layer:
                nic["link_layer"] = layer
            nics.append(nic)
    return nics
