"""Parsers of nvidia-smi's human-readable output, for recorded captures (`disaggctl topology`).

- `nvidia-smi -q` text: an indented "Key : value" tree; GPU sections start with "GPU <bus id>".
- the default `nvidia-smi` table (name, bus id, persistence, memory, power cap, MIG mode).
- `nvidia-smi --query-gpu=... --format=csv` output.
Each returns a partial HostTopology dict (see fields.merge_host). Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .fields import architecture, clean, enum_name, integer, number, on_off

_GPU_SECTION_RE = re.compile(r"^GPU ([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f])\s*$")


@dataclass
class Node:
    key: str
    value: str | None = None
    children: list[Node] = field(default_factory=list)

    def get(self, *path: str) -> str | None:
        node: Node | None = self
        for part in path:
            node = next((c for c in node.children if c.key.lower() == part.lower()), None) if node else None
        return node.value if node else None

    def find_all(self, key: str) -> list[Node]:
        out = [c for c in self.children if c.key.lower() == key.lower()]
        for c in self.children:
            out.extend(c.find_all(key))
        return out


def parse_tree(text: str) -> Node:
    """Indented "Key : value" lines as a tree; lines that are not of that shape are skipped."""
    root = Node("")
    stack: list[tuple[int, Node]] = [(-1, root)]
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "[", "=", "--")) or "$" in stripped.split(" ")[0]:
            continue
        indent = len(line) - len(line.lstrip())
        key, sep, value = stripped.partition(":")
        if sep and _GPU_SECTION_RE.match(stripped):
            key, value, sep = stripped, "", ""
        node = Node(key.strip(), value.strip() if sep else None)
        while stack[-1][0] >= indent:
            stack.pop()
        stack[-1][1].children.append(node)
        stack.append((indent, node))
    return root


def fabric_of(node: Node) -> dict[str, Any]:
    """A "Fabric" section -> Gpu fabric fields."""
    return {
        k: v
        for k, v in {
            "fabric_state": enum_name(node.get("State")),
            "fabric_status": enum_name(node.get("Status")),
            "clique_id": integer(node.get("CliqueId")),
            "cluster_uuid": clean(node.get("ClusterUUID")),
            "fabric_health": enum_name(node.get("Health", "Summary")),
        }.items()
        if v is not None
    }


def parse_fabric_sections(text: str) -> list[dict[str, Any]]:
    """Every "Fabric" section of a `-q` text (e.g. grep'ed snippets), in order."""
    return [fabric_of(n) for n in parse_tree(text).find_all("Fabric")]


def parse_q_text(text: str) -> dict[str, Any]:
    """`nvidia-smi -q` text -> partial HostTopology dict."""
    root = parse_tree(text)
    host: dict[str, Any] = {"gpus": []}
    if root.get("Driver Version"):
        host["driver_version"] = clean(root.get("Driver Version"))
    if root.get("CUDA Version"):
        host["cuda_driver_version"] = clean(root.get("CUDA Version"))
    # environment dumps (e.g. `python -m sglang.check_env`) print the driver as "CUDA Driver Version"
    env_driver = clean(root.get("CUDA Driver Version"))
    if env_driver and re.fullmatch(r"\d{3}\.\d+(\.\d+)?", env_driver) and "driver_version" not in host:
        host["driver_version"] = env_driver
    sections = [c for c in root.children if _GPU_SECTION_RE.match(c.key)]
    for index, sec in enumerate(sections):
        power = sec.get("GPU Power Readings", "Current Power Limit") or sec.get("Power Readings", "Power Limit")
        gpu: dict[str, Any] = {
            "index": index,
            "uuid": clean(sec.get("GPU UUID")),
            "name": clean(sec.get("Product Name")),
            "architecture": architecture(sec.get("Product Architecture")),
            "memory_total_mib": integer(sec.get("FB Memory Usage", "Total")),
            "pci_bus_id": clean(sec.get("PCI", "Bus Id")) or _GPU_SECTION_RE.match(sec.key).group(1),  # type: ignore[union-attr]
            "mig_enabled": on_off(sec.get("MIG Mode", "Current")),
            "persistence_mode": on_off(sec.get("Persistence Mode")),
            "power_limit_w": number(power),
            "max_sm_clock_mhz": integer(sec.get("Max Clocks", "SM")),
            "c2c_mode": enum_name(sec.get("GPU C2C Mode")),
        }
        fab = next((c for c in sec.children if c.key == "Fabric"), None)
        if fab:
            gpu.update(fabric_of(fab))
        host["gpus"].append({k: v for k, v in gpu.items() if v is not None})
    return host


_TABLE_HEAD_RE = re.compile(r"NVIDIA-SMI\s+(\S+)\s+(?:Driver|KMD) Version:\s*(\S+)\s+CUDA(?: UMD)? Version:\s*(\S+)")
_BUS_ID = r"[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]"
_TABLE_ROW1_RE = re.compile(r"^\|\s+(\d+)\s+(.+?)\s+(On|Off)\s+\|\s+(" + _BUS_ID + r")\s")
_TABLE_ROW2_RE = re.compile(r"(?:\d+|N/A)W?\s*/\s*(\d+|N/A)W?\s*\|\s*\d+MiB\s*/\s*(\d+)MiB\s*\|")
_TABLE_ROW3_RE = re.compile(r"^\|\s+\|\s+\|\s+(\S+)\s+\|$")


def parse_smi_table(text: str) -> dict[str, Any]:
    """The default `nvidia-smi` table -> partial HostTopology dict."""
    host: dict[str, Any] = {"gpus": []}
    lines = text.splitlines()
    for line in lines:
        m = _TABLE_HEAD_RE.search(line)
        if m:
            host["driver_version"] = m.group(2)
            host["cuda_driver_version"] = m.group(3)
            break
    for i, line in enumerate(lines):
        m = _TABLE_ROW1_RE.match(line)
        if not m:
            continue
        gpu: dict[str, Any] = {
            "index": int(m.group(1)),
            "name": m.group(2).strip(),
            "persistence_mode": m.group(3) == "On",
            "pci_bus_id": m.group(4),
        }
        m2 = _TABLE_ROW2_RE.search(lines[i + 1]) if i + 1 < len(lines) else None
        if m2:
            if m2.group(1).isdigit():
                gpu["power_limit_w"] = float(m2.group(1))
            gpu["memory_total_mib"] = int(m2.group(2))
        m3 = _TABLE_ROW3_RE.match(lines[i + 2].rstrip()) if i + 2 < len(lines) else None
        if m3 and on_off(m3.group(1)) is not None:
            gpu["mig_enabled"] = on_off(m3.group(1))
        host["gpus"].append(gpu)
    return host


_CSV_FIELDS = {"name": "name", "uuid": "uuid", "compute_cap": "compute_capability", "pci.bus_id": "pci_bus_id"}


def parse_query_csv(text: str) -> dict[str, Any]:
    """`nvidia-smi --query-gpu=...,compute_cap,... --format=csv` (with its header) -> partial dict.

    Rows are in GPU order; an `index` column, when queried, is used instead."""
    host: dict[str, Any] = {"gpus": []}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 2 or not any(c in ("compute_cap", "driver_version", "index", "uuid") for c in cols):
            continue
        for n, row in enumerate(lines[i + 1 :]):
            vals = [v.strip() for v in row.split(",")]
            if len(vals) != len(cols):
                break
            rec = {cols[k]: vals[k] for k in range(len(cols))}  # lengths checked above; no zip(strict) on 3.8
            gpu: dict[str, Any] = {"index": int(rec["index"]) if rec.get("index", "").isdigit() else n}
            for col, key in _CSV_FIELDS.items():
                if clean(rec.get(col)):
                    gpu[key] = clean(rec[col])
            if clean(rec.get("driver_version")):
                host["driver_version"] = clean(rec["driver_version"])
            host["gpus"].append(gpu)
        break
    return host
