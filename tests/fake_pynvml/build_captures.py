"""Build the fake NVML captures (tests/fixtures/nvml/*.json) from the recorded nvidia-smi captures.

    python tests/fake_pynvml/build_captures.py        # rewrite the JSON files
    python tests/fake_pynvml/build_captures.py --check  # exit 1 when a JSON file is stale

Reads the captures with ElementTree and regexes of its own (not disaggctl's parsers), so a
bug in disaggctl's parsers cannot hide by being copied into the fake. What a capture does
not record (NVLink link states in `-q -x`, NUMA in `-q -x`) is added here explicitly and
commented; everything else comes from the files in tests/fixtures/nvidia-smi/.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SMI = HERE.parent / "fixtures" / "nvidia-smi"
OUT = HERE.parent / "fixtures" / "nvml"
ARCH = {"Blackwell": 10, "Hopper": 9}
# Compute capability is not in `-q -x`; it is a fixed fact of each product.
CC = {"NVIDIA B200": [10, 0], "NVIDIA GB200": [10, 0], "NVIDIA H100 80GB HBM3": [9, 0], "NVIDIA B300 SXM6 AC": [10, 3]}
FABRIC_STATE = {"Not Supported": 0, "Not Started": 1, "In Progress": 2, "Completed": 3}
HEALTH = {"Healthy": 1, "Unhealthy": 2, "Limited Capacity": 3}
STATUS = {"Success": 0, "Insufficient Resources": 23, "N/A": 0}


def _num(text: str | None) -> float:
    m = re.search(r"[0-9.]+", text or "")
    assert m, text
    return float(m.group(0))


def _enabled(text: str | None) -> int:
    return 1 if (text or "").strip() == "Enabled" else 0


def from_xml(name: str) -> dict[str, Any]:
    root = ET.parse(SMI / name).getroot()
    devices = []
    for g in root.findall("gpu"):
        fab = g.find("fabric")
        assert fab is not None
        name_ = g.findtext("product_name") or ""
        dev: dict[str, Any] = {
            "name": name_,
            "uuid": g.findtext("uuid"),
            "architecture": ARCH[g.findtext("product_architecture") or ""],
            "compute_capability": CC[name_],
            "memory_total_bytes": int(_num(g.findtext("fb_memory_usage/total"))) << 20,
            "pci_bus_id": g.findtext("pci/pci_bus_id"),
            "mig_mode": [_enabled(g.findtext("mig_mode/current_mig")), _enabled(g.findtext("mig_mode/pending_mig"))],
            "persistence_mode": _enabled(g.findtext("persistence_mode")),
            "ecc_corrected": int(_num(g.findtext("ecc_errors/aggregate/dram_correctable")))
            + int(_num(g.findtext("ecc_errors/aggregate/sram_correctable"))),
            "ecc_uncorrected": int(_num(g.findtext("ecc_errors/aggregate/dram_uncorrectable"))),
            "power_limit_mw": int(_num(g.findtext("gpu_power_readings/current_power_limit")) * 1000),
            "max_sm_clock_mhz": int(_num(g.findtext("max_clocks/sm_clock"))),
            "fabric": {
                "state": FABRIC_STATE[fab.findtext("state") or ""],
                "status": STATUS[fab.findtext("status") or "N/A"],
                "clique_id": int(fab.findtext("cliqueId") or 0),
                "cluster_uuid": fab.findtext("clusterUuid"),
                "health_summary": HEALTH.get(fab.findtext("health/summary") or "", 0),
            },
            "c2c_enabled": _enabled(g.findtext("c2c_mode")),
        }
        devices.append(dev)
    driver = root.findtext("driver_version")
    cuda = root.findtext("cuda_version") or "0.0"
    major, minor = cuda.split(".")
    return {"driver_version": driver, "cuda_driver_version": int(major) * 1000 + int(minor) * 10, "devices": devices}


def topo_rows(name: str) -> dict[int, list[str]]:
    """GPU row index -> its cells, from a `topo -m` capture."""
    rows = {}
    for line in (SMI / name).read_text().splitlines():
        m = re.match(r"^GPU(\d+)\s+(X|NV\d+|SYS|NODE)\s", line)
        if m:
            rows.setdefault(int(m.group(1)), line.split()[1:])
    return rows


def nvlink_mesh(cap: dict[str, Any], links: int, peers: dict[int, list[int]] | None = None) -> None:
    """Every GPU gets `links` NVLinks to NVSwitches (active unless it has no peers) and P2P
    over NVLink to `peers` (default: every other GPU), as `topo -m` shows for these systems."""
    n = len(cap["devices"])
    for i, dev in enumerate(cap["devices"]):
        p = peers[i] if peers is not None else [j for j in range(n) if j != i]
        dev["nvlinks"] = [{"active": bool(p), "remote_type": 2} for _ in range(links)]
        dev["p2p_nvlink"] = p


def numa_from_topo(cap: dict[str, Any], name: str, ncols: int) -> None:
    for i, cells in topo_rows(name).items():
        if i < len(cap["devices"]) and len(cells) >= ncols + 2:
            cap["devices"][i]["cpu_affinity"] = cells[ncols]
            cap["devices"][i]["numa_node"] = int(re.match(r"\d+", cells[ncols + 1]).group(0))  # type: ignore[union-attr]
            if len(cells) > ncols + 2 and cells[ncols + 2].isdigit():
                cap["devices"][i]["gpu_numa_node"] = int(cells[ncols + 2])


def b300() -> dict[str, Any]:
    text = (SMI / "b300_dell_xe9780_7gpu.txt").read_text()
    head = re.search(r"NVIDIA-SMI (\S+)\s+KMD Version: (\S+)\s+CUDA UMD Version: (\d+)\.(\d+)", text)
    assert head
    devices = []
    row = r"^\|\s+(\d+)\s+(NVIDIA .+?)\s+(On|Off)\s+\|\s+(\S+) .*\n\|.*?(\d+)W / (\d+)W \|\s+\d+MiB / (\d+)MiB"
    for m in re.finditer(row, text, re.M):
        devices.append({
            "name": m.group(2),
            "uuid": None,
            "architecture": 10,
            "compute_capability": [10, 3],  # `--query-gpu=compute_cap` in the same capture: 10.3
            "memory_total_bytes": int(m.group(7)) << 20,
            "pci_bus_id": m.group(4),
            "mig_mode": [0, 0],
            "persistence_mode": 1 if m.group(3) == "On" else 0,
            "power_limit_mw": int(m.group(6)) * 1000,
        })
    uuid = re.search(r"GPU 0: .*\(UUID: (\S+)\)", text)
    devices[0]["uuid"] = uuid.group(1) if uuid else None
    cap = {"driver_version": head.group(2), "cuda_driver_version": int(head.group(3)) * 1000 + int(head.group(4)) * 10,
           "devices": devices}
    # nvlink --status: 18 links at 53.125 GB/s on GPU 0, "GPUs 1-6 identical"; topo -m: NV18 everywhere
    nvlink_mesh(cap, 18)
    numa_from_topo(cap, "b300_dell_xe9780_7gpu.txt", 7)
    return cap


def captures() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}

    b200 = from_xml("nvidia-smi-q-x_b200.xml")
    nvlink_mesh(b200, 18)  # HGX B200: 18 NVLink5 links per GPU to the NVSwitches (topo -m shows NV18)
    # `-q -x` has no NUMA/CPU affinity: the fake raises NotSupported for them (the degrade path)
    out["b200_hgx"] = b200

    deg = copy.deepcopy(b200)
    rows = topo_rows("topo_b200_vllm16336_degraded_partial.txt")
    peers = {
        i: [j for j in range(8) if j != i and j < len(rows.get(i, [])) and rows[i][j].startswith("NV")]
        for i in range(8)
    }
    peers[7] = [i for i in range(7) if 7 in peers[i]]  # GPU7's row is cut off; NVLink is symmetric
    nvlink_mesh(deg, 18, peers)
    numa_from_topo(deg, "topo_b200_vllm16336_degraded_partial.txt", 20)
    deg["source_note"] = (
        "B200 -q -x with the NVLink/NUMA of topo_b200_vllm16336_degraded_partial.txt (GPU2 lost NVLink)"
    )
    out["b200_gpu2_nvlink_down"] = deg

    gb = from_xml("nvidia-smi-q-x_gb200.xml")
    nvlink_mesh(gb, 18)
    numa_from_topo(gb, "topo_gb200_tray_8nic.txt", 12)
    gb["source_note"] = "GB200 tray -q -x with the NUMA/CPU affinity of topo_gb200_tray_8nic.txt"
    out["gb200_tray"] = gb

    # smi_q_fabric_snippets.txt, on the same tray
    unhealthy = copy.deepcopy(gb)
    for d in unhealthy["devices"]:
        d["fabric"].update(clique_id=2, cluster_uuid="dc6e40c4-d722-4357-9ba6-5291dd461278", health_summary=2)
    out["gb200_fabric_unhealthy"] = unhealthy
    nopart = copy.deepcopy(gb)
    zero = "00000000-0000-0000-0000-000000000000"
    for d in nopart["devices"]:
        d["fabric"].update(status=23, clique_id=0, cluster_uuid=zero, health_summary=0)
    out["gb200_fabric_insufficient"] = nopart
    progress = copy.deepcopy(gb)
    progress["driver_version"] = "580.159.04"
    for d in progress["devices"]:
        d["fabric"].update(state=2, status=0, clique_id=0, cluster_uuid="00000000-0000-0000-0000-000000000000")
    out["gb200_fabric_in_progress"] = progress

    h100 = from_xml("nvidia-smi-q-x_h100.xml")
    nvlink_mesh(h100, 18)  # HGX H100: 18 NVLink4 links per GPU to the NVSwitches
    # Simulated older driver and a non-root user, to drive the other two degrade errors:
    h100["errors"] = {
        "nvmlDeviceGetGpuFabricInfoV": "FunctionNotFound",  # the agent falls back to the legacy call
        "nvmlDeviceGetC2cModeInfoV": "FunctionNotFound",
        "nvmlDeviceGetTotalEccErrors": "NoPermission",
    }
    out["h100_hgx"] = h100

    out["b300_7gpu"] = b300()
    out["no_driver"] = {"init_error": "DriverNotLoaded", "devices": []}
    return out


def main() -> int:
    check = "--check" in sys.argv
    stale = []
    for name, cap in captures().items():
        path = OUT / f"{name}.json"
        text = json.dumps(cap, indent=1, sort_keys=True) + "\n"
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print("stale:", ", ".join(stale))
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
