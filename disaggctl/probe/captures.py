"""Recorded nvidia-smi captures -> HostTopology (what `disaggctl topology FILE...` does).

A capture file may hold `nvidia-smi -q -x` XML, `nvidia-smi -q` text, the default table,
`--query-gpu ... --format=csv`, `topo -m` and `nvlink --status` output, alone or pasted one
after the other (a terminal log). Every recognizer runs over the whole text and the results
are merged by GPU index, the richer sources first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from disaggctl.errors import DisaggError, file_error
from disaggctl.inputs import MAX_DATA_BYTES, read_bytes
from disaggctl.probe import smi_text, smi_topo, smi_xml
from disaggctl.probe.checks import detect_problems
from disaggctl.probe.fields import finish_gpu, merge_host
from disaggctl.topology import HostTopology, TopologyFile

_PLACEHOLDER_NIC = re.compile(r"^NIC\d+$")


def parse_capture_text(text: str, label: str = "capture") -> dict[str, Any]:
    """One capture's text -> a HostTopology dict (not validated yet)."""
    stripped = text.lstrip()
    if stripped.startswith(("<?xml", "<nvidia_smi_log")):
        try:
            return smi_xml.parse(text)
        except (ValueError, SyntaxError) as e:
            raise DisaggError(f"{label}: not a valid `nvidia-smi -q -x` document: {e}") from None
    host: dict[str, Any] = {"gpus": []}
    parts = [
        smi_text.parse_q_text(text),
        smi_text.parse_smi_table(text),
        smi_text.parse_query_csv(text),
        smi_topo.parse_nvlink_status(text),
    ]
    topo = smi_topo.parse_topo(text)
    named = [n for n in topo["nics"] if not _PLACEHOLDER_NIC.match(n["name"])]
    if len(named) < len(topo["nics"]):
        topo.setdefault("warnings", []).append(
            "topo -m: no NIC legend (NIC#: name) in the capture; its NICs are left out"
        )
    topo["nics"] = named
    parts.append(topo)
    for part in parts:
        merge_host(host, part)
    host["warnings"] = [f"{label}: {w}" for w in host.get("warnings", [])]
    return host


def host_from_files(paths: Iterable[Path], expected_gpus: int | None = None) -> HostTopology:
    """Merge the captures of one host into a HostTopology with its problems detected."""
    host: dict[str, Any] = {"gpus": []}
    names = []
    read: list[str] = []
    for path in paths:
        text = read_bytes(path, "capture", MAX_DATA_BYTES).decode(errors="replace")
        try:
            merge_host(host, parse_capture_text(text, path.name))
        except (DisaggError, ValueError, SyntaxError, KeyError, IndexError) as e:  # ET.ParseError is a SyntaxError
            raise file_error(
                str(path), "capture", f"cannot parse it: {e}", "give nvidia-smi -q -x, nvidia-smi -q or topo -m output"
            ) from None
        names.append(path.name)
        read.append(str(path))
    if not host["gpus"]:
        raise DisaggError(
            f"no GPU found in {', '.join(names)}",
        )
    for g in host["gpus"]:
        finish_gpu(g)
    host["source"] = "capture:" + ",".join(names)
    try:
        topo = HostTopology.model_validate(host)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(x) for x in first["loc"])
        hint = "is this an nvidia-smi capture?"
        raise file_error(", ".join(read), "capture", f"{where}: {first['msg']}", hint) from None
    topo.problems = detect_problems(topo, expected_gpus)
    return topo


def topology_from_files(paths: list[Path], host: str | None = None, expected_gpus: int | None = None) -> TopologyFile:
    """Captures -> a topology file: all of them as one host named `host`, else one host per file
    stem (files sharing a stem, e.g. node1.xml and node1.txt, are one host)."""
    groups: dict[str, list[Path]] = {}
    for p in paths:
        groups.setdefault(host or p.stem, []).append(p)
    return TopologyFile(hosts={name: host_from_files(files, expected_gpus) for name, files in groups.items()})
