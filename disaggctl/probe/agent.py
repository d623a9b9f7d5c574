"""The probe program shipped to each host and run with the host's own python3.

Standard library only. It uses nvidia-ml-py (`pynvml`) when importable and NVML starts, and
otherwise falls back to parsing `nvidia-smi -q -x` (+ `--query-gpu=compute_cap`, `topo -m`,
`nvlink --status`). NICs come from /sys/class/infiniband. It prints one JSON document shaped
like `disaggctl.topology.HostTopology` on stdout and exits 0, even when it finds no GPU (then
`gpus` is empty and `warnings` say why); only a bug makes it exit non-zero.

Usage: python3 agent.py [--mode auto|nvml|smi]   (or `python3 - [...] < bundled program`)
Environment: DISAGGCTL_PROBE_NVIDIA_SMI (nvidia-smi to run), DISAGGCTL_PROBE_SYSFS (sysfs root).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

from . import nvml, smi_topo, smi_xml, sysfs
from .fields import finish_gpu, merge_host
from .smi_text import parse_query_csv

SMI_TIMEOUT_S = 60.0


def _smi(args: list[str]) -> tuple[str | None, str | None]:
    """(stdout, None) or (None, why it failed)."""
    exe = os.environ.get("DISAGGCTL_PROBE_NVIDIA_SMI", "nvidia-smi")
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=SMI_TIMEOUT_S, check=False)
    except FileNotFoundError:
        return None, f"{exe} not found"
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{exe} {' '.join(args)}: {e}"
    if r.returncode != 0:
        msg = (r.stdout.strip() or r.stderr.strip()).splitlines()
        return None, f"{exe} {' '.join(args)} exited {r.returncode}: {msg[0] if msg else ''}"
    return r.stdout, None


def probe_smi() -> dict[str, Any]:
    """The nvidia-smi fallback. Raises RuntimeError when even `nvidia-smi -q -x` fails."""
    xml, why = _smi(["-q", "-x"])
    if xml is None:
        raise RuntimeError(why or "nvidia-smi failed")
    host = smi_xml.parse(xml)
    host["source"] = "nvidia-smi"
    warnings: list[str] = []
    extra: list[dict[str, Any]] = []
    for args, parser in (
        (["--query-gpu=index,compute_cap", "--format=csv"], parse_query_csv),
        (["topo", "-m"], smi_topo.parse_topo),
        (["nvlink", "--status"], smi_topo.parse_nvlink_status),
    ):
        out, why = _smi(args)
        if out is None:
            warnings.append(f"{why}; fields from it left unknown")
            continue
        try:
            extra.append(parser(out))
        except (ValueError, IndexError) as e:
            warnings.append(f"nvidia-smi {' '.join(args)}: could not parse ({e})")
    # sysfs NUMA first: it numbers nodes the way the NICs' sysfs entries do
    merge_host(host, {"gpus": [{"index": g["index"], **sysfs.gpu_pci_info(g["pci_bus_id"])}
                               for g in host["gpus"] if g.get("pci_bus_id")]})
    for part in extra:
        part = dict(part)
        part.pop("nics", None)  # topo -m NICs are named NIC#; sysfs has the real ones
        merge_host(host, part)
    host["warnings"] = host.get("warnings", []) + warnings
    return host


def probe(mode: str = "auto") -> dict[str, Any]:
    reasons: list[str] = []
    host: dict[str, Any] | None = None
    if mode in ("auto", "nvml"):
        try:
            import pynvml  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            reasons.append("nvidia-ml-py (pynvml) is not installed")
        else:
            try:
                host = nvml.probe(pynvml)
            except nvml.NvmlUnavailable as e:
                reasons.append(str(e))
            except Exception as e:  # any NVML surprise falls back to nvidia-smi, never crashes
                reasons.append(f"NVML probe failed: {type(e).__name__}: {e}")
    if host is None and mode in ("auto", "smi"):
        try:
            host = probe_smi()
        except RuntimeError as e:
            reasons.append(str(e))
    if host is None or not host["gpus"]:
        host = host or {"gpus": []}
        reasons.append("no NVIDIA GPU found")
    if host.get("source") != "nvml" or not host["gpus"]:
        # why NVML was not used matters whenever it was not
        host["warnings"] = reasons + host.get("warnings", [])
    for g in host["gpus"]:
        finish_gpu(g)
    host["hostname"] = socket.gethostname()
    host["nics"] = sysfs.read_nics()
    return host


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    mode = "auto"
    if len(args) >= 2 and args[0] == "--mode" and args[1] in ("auto", "nvml", "smi"):
        mode = args[1]
    json.dump(probe(mode), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":  # python3 -m disaggctl.probe.agent, from a checkout
    sys.exit(main())
