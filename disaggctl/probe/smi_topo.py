"""Parsers of `nvidia-smi topo -m` and `nvidia-smi nvlink --status` (standard library only; shipped).

`topo -m` is a matrix: one row per GPU (and NIC), one column per GPU and NIC, then
"CPU Affinity", "NUMA Affinity" and (newer drivers) "GPU NUMA ID". `NV<n>` means a bonded set
of n NVLinks; anything else (SYS, NODE, PHB, PXB, PIX) is PCIe. Known hazards handled here:
a header whose separator got lost (`NIC11NIC12`), captures cut mid-row, and captures whose
header line is missing altogether (then the GPU columns are inferred from the rows).
"""

from __future__ import annotations

import re
from typing import Any

_ROW_RE = re.compile(r"^\s*(GPU|NIC)(\d+)\s+((?:X|SYS|NODE|PHB|PXB|PIX|SOC|CPU|NV\d+)\b.*)$")
_COL_RE = re.compile(r"(GPU|NIC)(\d+)")
_CELL_RE = re.compile(r"^(X|SYS|NODE|PHB|PXB|PIX|SOC|CPU|NV\d+)$")
_LEGEND_RE = re.compile(r"^\s*NIC(\d+)\s*:\s*(\S+)\s*$")
_NVLINK_GPU_RE = re.compile(r"^GPU (\d+): (.*?)(?: \(UUID: (\S+)\))?\s*$")
_NVLINK_LINK_RE = re.compile(r"^\s+Link (\d+): (.*)$")
_PCIE_SAME_NUMA = {"NODE", "PHB", "PXB", "PIX"}


def _header(lines: list[str]) -> tuple[list[str], int] | None:
    """Column names (GPU0.., NIC0..) of the matrix header and its line number."""
    for i, line in enumerate(lines):
        if re.match(r"^\s*GPU0\b", line) and not _ROW_RE.match(line):
            cut = line.find("CPU Affinity")
            cols = _COL_RE.findall(line[: cut if cut >= 0 else len(line)])
            return [f"{kind}{num}" for kind, num in cols], i
    return None


def _first_int(text: str) -> int | None:
    m = re.match(r"(\d+)", text)
    return int(m.group(1)) if m else None


def parse_topo(text: str) -> dict[str, Any]:
    """`nvidia-smi topo -m` -> partial HostTopology dict: GPUs with peers/NUMA/CPUs, NICs with NUMA."""
    lines = text.splitlines()
    warnings: list[str] = []
    head = _header(lines)
    rows: dict[str, list[str]] = {}
    for line in lines[(head[1] + 1) if head else 0 :]:
        m = _ROW_RE.match(line)
        if m and f"{m.group(1)}{m.group(2)}" not in rows:
            rows[f"{m.group(1)}{m.group(2)}"] = m.group(3).split()
    gpu_rows = {k: v for k, v in rows.items() if k.startswith("GPU")}
    if not gpu_rows:
        return {"gpus": [], "nics": []}
    if head:
        cols = head[0]
    else:
        cols = _infer_columns(gpu_rows)
        warnings.append(f"topo -m: no header line; assumed columns {cols[0]}..{cols[-1]} from the rows")
    ncols = len(cols)
    legend = {f"NIC{m.group(1)}": m.group(2) for m in map(_LEGEND_RE.match, lines) if m}
    gpu_cols = [c for c in cols if c.startswith("GPU")]
    gpus: dict[int, dict[str, Any]] = {int(c[3:]): {"index": int(c[3:])} for c in gpu_cols}
    nic_numa: dict[str, set[int]] = {}
    for label, cells in sorted(gpu_rows.items(), key=lambda kv: int(kv[0][3:])):
        idx = int(label[3:])
        gpu = gpus.setdefault(idx, {"index": idx})
        matrix = cells[:ncols]
        rest = cells[ncols:]
        if len(matrix) < ncols or not rest:
            warnings.append(f"topo -m: row {label} is cut short; parsed what is there")
        # index loops, not a strict zip: the agent must run on the hosts' Python 3.8+
        gpu["nvlink_peers"] = sorted(
            int(cols[j][3:]) for j in range(len(matrix))
            if cols[j].startswith("GPU") and cols[j] != label and matrix[j].startswith("NV")
        )
        if len(rest) >= 1 and re.fullmatch(r"[0-9,\-]+", rest[0]):
            gpu["cpu_affinity"] = rest[0]
        numa = _first_int(rest[1]) if len(rest) >= 2 else None
        if numa is not None:
            gpu["numa_node"] = numa
        if len(rest) >= 3:
            gnuma = _first_int(rest[2])
            if gnuma is not None:
                gpu["gpu_numa_node"] = gnuma
        for j in range(len(matrix)):
            if cols[j].startswith("NIC") and matrix[j] in _PCIE_SAME_NUMA and numa is not None:
                nic_numa.setdefault(cols[j], set()).add(numa)
    missing = sorted(set(gpus) - {int(k[3:]) for k in gpu_rows})
    if missing:
        warnings.append(
            f"topo -m: no row for GPU {', '.join(map(str, missing))} (cut capture); "
            "their NVLink peers are taken from the other rows"
        )
    _symmetric_peers(gpus)
    nics = []
    for col in cols:
        if col.startswith("NIC"):
            nic: dict[str, Any] = {"name": legend.get(col, col), "port": 1}
            if len(nic_numa.get(col, ())) == 1:  # behind a host bridge of exactly one NUMA node
                nic["numa_node"] = next(iter(nic_numa[col]))
            nics.append(nic)
    return {"gpus": [gpus[i] for i in sorted(gpus)], "nics": nics, "warnings": warnings}


def _infer_columns(gpu_rows: dict[str, list[str]]) -> list[str]:
    """Without a header: matrix cells are the leading tokens that look like cells; a GPU column
    is one that some row marks X (itself) or NV# (NVLink only joins GPUs); the rest are NICs."""
    width = max(len([c for c in _leading_cells(cells)]) for cells in gpu_rows.values())
    ngpu = max(int(k[3:]) for k in gpu_rows) + 1
    for cells in gpu_rows.values():
        for j, cell in enumerate(_leading_cells(cells)):
            if cell.startswith("NV"):
                ngpu = max(ngpu, j + 1)
    return [f"GPU{i}" for i in range(ngpu)] + [f"NIC{i}" for i in range(max(0, width - ngpu))]


def _leading_cells(cells: list[str]) -> list[str]:
    out = []
    for c in cells:
        if not _CELL_RE.match(c):
            break
        out.append(c)
    return out


def _symmetric_peers(gpus: dict[int, dict[str, Any]]) -> None:
    """A GPU whose row was cut off still gets the peers its neighbours' rows name (NVLink is symmetric)."""
    for idx, gpu in gpus.items():
        if "nvlink_peers" not in gpu:
            gpu["nvlink_peers"] = sorted(i for i, g in gpus.items() if idx in g.get("nvlink_peers", []))


def parse_nvlink_status(text: str) -> dict[str, Any]:
    """`nvidia-smi nvlink --status` -> partial HostTopology dict: per-GPU links (active or not)."""
    gpus: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = None
    for line in text.splitlines():
        m = _NVLINK_GPU_RE.match(line)
        if m:
            cur = {"index": int(m.group(1)), "name": m.group(2).strip(), "nvlinks": []}
            if m.group(3):
                cur["uuid"] = m.group(3)
            gpus.append(cur)
            continue
        m = _NVLINK_LINK_RE.match(line)
        if m and cur is not None:
            state = m.group(2).strip().lower()
            # "<inactive>" for a down link; a speed ("53.125 GB/s") for an active one
            cur["nvlinks"].append({"link": int(m.group(1)), "active": "inactive" not in state and "GB/s" in m.group(2)})
    return {"gpus": gpus}
