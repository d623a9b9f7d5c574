"""Value cleaning and merging shared by every probe source (standard library only; shipped).

Every source (NVML, `nvidia-smi -q -x`, `-q` text, `topo -m`, sysfs) yields plain dicts shaped
like `disaggctl.topology.HostTopology` / `Gpu`; `merge_host` combines them, first value wins.
"""

from __future__ import annotations

import re
from typing import Any

# What nvidia-smi prints for a value it does not know; such a field stays unknown (None).
_UNKNOWN = {
    "", "n/a", "[n/a]", "na", "not supported", "[not supported]", "unknown", "unknown error",
    "insufficient permissions", "[insufficient permissions]", "requested functionality has been deprecated",
    "none",
}
_NUM_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return None if value.lower() in _UNKNOWN else value


def number(value: str | None) -> float | None:
    """First number in "700.00 W" / "81559 MiB"; None when unknown."""
    value = clean(value)
    if value is None:
        return None
    m = _NUM_RE.search(value)
    return float(m.group(0)) if m else None


def integer(value: str | None) -> int | None:
    n = number(value)
    return None if n is None else int(n)


def enum_name(value: str | None) -> str | None:
    """"In Progress" -> "in_progress", "Insufficient Resources" -> "insufficient_resources"."""
    value = clean(value)
    if value is None:
        return None
    return re.sub(r"[^a-z0-9]+", "_", value.lower()).strip("_") or None


def on_off(value: str | None) -> bool | None:
    value = clean(value)
    if value is None:
        return None
    v = value.lower()
    if v in ("enabled", "enable", "on", "yes", "true", "1"):
        return True
    if v in ("disabled", "disable", "off", "no", "false", "0"):
        return False
    return None


def architecture(value: str | None) -> str | None:
    return enum_name(value)


# NVML's nvmlDeviceArchitecture_t values (NVML_DEVICE_ARCH_*).
NVML_ARCH = {
    2: "kepler", 3: "maxwell", 4: "pascal", 5: "volta", 6: "turing", 7: "ampere", 8: "ada", 9: "hopper",
    10: "blackwell", 13: "rubin",
}
# Compute capability major (and 8.9) -> architecture, a fixed fact of each chip generation.
_CC_ARCH = {"7.0": "volta", "7.2": "volta", "7.5": "turing", "8.9": "ada"}
_CC_MAJOR_ARCH = {"8": "ampere", "9": "hopper", "10": "blackwell", "11": "blackwell", "12": "blackwell"}


def arch_from_cc(cc: str | None) -> str | None:
    if not cc:
        return None
    return _CC_ARCH.get(cc) or _CC_MAJOR_ARCH.get(cc.split(".")[0])


def finish_gpu(gpu: dict[str, Any]) -> None:
    """Fill what follows from other fields of the same GPU (architecture from compute capability)."""
    if gpu.get("architecture") is None and arch_from_cc(gpu.get("compute_capability")):
        gpu["architecture"] = arch_from_cc(gpu.get("compute_capability"))


def driver_major(version: str | None) -> int | None:
    m = re.match(r"\s*(\d+)", version or "")
    return int(m.group(1)) if m else None


def merge_dict(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """Fill keys of `into` that are missing/None/empty from `extra` (first source wins)."""
    for key, value in extra.items():
        if value is None:
            continue
        cur = into.get(key)
        if cur is None or (isinstance(cur, list) and not cur and value):
            into[key] = value


def merge_host(into: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge one source's host dict into another: host fields, GPUs by index, NICs by name/port."""
    for key, value in extra.items():
        if key == "gpus":
            by_index = {g["index"]: g for g in into.setdefault("gpus", [])}
            for gpu in value:
                if gpu["index"] in by_index:
                    merge_dict(by_index[gpu["index"]], gpu)
                else:
                    into["gpus"].append(dict(gpu))
            into["gpus"].sort(key=lambda g: g["index"])
        elif key == "nics":
            by_name = {(n["name"], n.get("port", 1)): n for n in into.setdefault("nics", [])}
            for nic in value:
                k = (nic["name"], nic.get("port", 1))
                if k in by_name:
                    merge_dict(by_name[k], nic)
                else:
                    into["nics"].append(dict(nic))
        elif key == "warnings":
            into.setdefault("warnings", []).extend(w for w in value if w not in into.get("warnings", []))
        else:
            merge_dict(into, {key: value})
    return into
