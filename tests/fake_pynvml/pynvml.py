"""A fake `pynvml` (nvidia-ml-py) that answers from a recorded capture instead of a driver.

The capture is a JSON file (tests/fixtures/nvml/*.json, built from the nvidia-smi captures by
build_captures.py) named by $FAKE_NVML_CAPTURE: a path, or a name looked up next to this file
(captures/<name>.json) and in tests/fixtures/nvml/. Standard library only: it is copied onto
the SSH test hosts and imported there by the real probe agent.

Fidelity rules, so the agent's degrade-per-field path runs for real:
- a field the capture lacks raises NVMLError_NotSupported;
- "errors": {"<function>": "FunctionNotFound" | "NoPermission" | "NotSupported" | ...} at the
  top level or per device makes that call raise that error (an older driver, a non-root user);
- "init_error": "DriverNotLoaded" | "LibraryNotFound" makes nvmlInit fail (a host without GPUs);
- the NVLink sweep raises InvalidArgument past the last link, like drivers that accept 18
  links although NVML_NVLINK_MAX_LINKS is 36.
"""

from __future__ import annotations

import ctypes
import json
import os
from ctypes import c_uint, c_uint8, c_uint32
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------ constants (as in nvidia-ml-py)
NVML_SUCCESS = 0
NVML_FEATURE_DISABLED = 0
NVML_FEATURE_ENABLED = 1
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1
NVML_NVLINK_MAX_LINKS = 36
NVML_CLOCK_SM = 1
NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_AGGREGATE_ECC = 1
NVML_AFFINITY_SCOPE_NODE = 0
NVML_P2P_CAPS_INDEX_NVLINK = 2
NVML_P2P_STATUS_OK = 0
NVML_P2P_STATUS_NOT_SUPPORTED = 5
NVML_NVLINK_DEVICE_TYPE_GPU = 0
NVML_NVLINK_DEVICE_TYPE_SWITCH = 2
NVML_DEVICE_ARCH_HOPPER = 9
NVML_DEVICE_ARCH_BLACKWELL = 10
nvmlMemory_v2 = 0x02000028
nvmlGpuFabricInfo_v2 = 0x02000024
nvmlGpuFabricInfo_v3 = 0x3000028

_ERRORS = {
    "Uninitialized": (1, "Uninitialized"),
    "InvalidArgument": (2, "Invalid Argument"),
    "NotSupported": (3, "Not Supported"),
    "NoPermission": (4, "Insufficient Permissions"),
    "NotFound": (6, "Not Found"),
    "DriverNotLoaded": (9, "Driver Not Loaded"),
    "LibraryNotFound": (12, "NVML Shared Library Not Found"),
    "FunctionNotFound": (13, "Function Not Found"),
    "GpuIsLost": (15, "GPU is lost"),
    "InsufficientResources": (23, "Insufficient Resources"),
    "ArgumentVersionMismatch": (25, "Argument Version Mismatch"),
    "Unknown": (999, "Unknown Error"),
}


class NVMLError(Exception):
    """Like nvidia-ml-py: NVMLError(code) returns the subclass for that code."""

    _by_value: dict[int, type[NVMLError]] = {}
    _strings: dict[int, str] = {}
    value: int

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._by_value.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        super().__init__(value)

    def __str__(self) -> str:
        return NVMLError._strings.get(self.value, f"NVML Error with code {self.value}")


for _name, (_code, _text) in _ERRORS.items():
    _cls = type(f"NVMLError_{_name}", (NVMLError,), {})
    globals()[_cls.__name__] = _cls
    NVMLError._by_value[_code] = _cls
    NVMLError._strings[_code] = _text


def _raise(name: str) -> None:
    raise NVMLError(_ERRORS[name][0])


# ------------------------------------------------------------------ structures (same layout as nvidia-ml-py)
class c_nvmlGpuFabricInfo_t(ctypes.Structure):
    _fields_ = [("clusterUuid", c_uint8 * 16), ("status", c_uint), ("cliqueId", c_uint32), ("state", c_uint)]


class c_nvmlGpuFabricInfo_v2_t(ctypes.Structure):
    _fields_ = [("version", c_uint), ("clusterUuid", c_uint8 * 16), ("status", c_uint), ("cliqueId", c_uint32),
                ("state", c_uint), ("healthMask", c_uint32)]

    def __init__(self) -> None:
        super().__init__(version=nvmlGpuFabricInfo_v2)


class c_nvmlGpuFabricInfo_v3_t(ctypes.Structure):
    _fields_ = [("version", c_uint), ("clusterUuid", c_uint8 * 16), ("status", c_uint), ("cliqueId", c_uint32),
                ("state", c_uint), ("healthMask", c_uint32), ("healthSummary", c_uint8)]

    def __init__(self) -> None:
        super().__init__(version=nvmlGpuFabricInfo_v3)


class _Obj:
    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


# ------------------------------------------------------------------ the capture
_capture: dict[str, Any] | None = None


def _find(name: str) -> Path:
    here = Path(__file__).resolve().parent
    for cand in (Path(name), here / "captures" / f"{name}.json", here.parent / "fixtures" / "nvml" / f"{name}.json"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"fake pynvml: capture {name!r} not found")


def _cap() -> dict[str, Any]:
    if _capture is None:
        _raise("Uninitialized")
    assert _capture is not None
    return _capture


def _dev(handle: int) -> dict[str, Any]:
    devices: list[dict[str, Any]] = _cap()["devices"]
    if not isinstance(handle, int) or not 0 <= handle < len(devices):
        _raise("InvalidArgument")
    return devices[handle]


def _field(fn: str, handle: int | None, key: str) -> Any:
    """The capture's value for `key`, or the error the capture says `fn` raises."""
    cap = _cap()
    dev = _dev(handle) if handle is not None else cap
    err = dev.get("errors", {}).get(fn) or cap.get("errors", {}).get(fn)
    if err:
        _raise(err)
    if dev.get(key) is None:
        _raise("NotSupported")
    return dev[key]


# ------------------------------------------------------------------ the API the probe agent calls
def nvmlInit() -> None:
    global _capture
    name = os.environ.get("FAKE_NVML_CAPTURE")
    if not name:
        _raise("LibraryNotFound")
    data = json.loads(_find(name).read_text())
    if data.get("init_error"):
        _raise(data["init_error"])
    _capture = data


def nvmlShutdown() -> None:
    global _capture
    _cap()
    _capture = None


def nvmlSystemGetDriverVersion() -> str:
    return str(_field("nvmlSystemGetDriverVersion", None, "driver_version"))


def nvmlSystemGetCudaDriverVersion() -> int:
    return int(_field("nvmlSystemGetCudaDriverVersion", None, "cuda_driver_version"))


def nvmlSystemGetCudaDriverVersion_v2() -> int:
    return int(_field("nvmlSystemGetCudaDriverVersion_v2", None, "cuda_driver_version"))


def nvmlDeviceGetCount() -> int:
    return len(_cap()["devices"])


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    err = _dev(index).get("errors", {}).get("nvmlDeviceGetHandleByIndex")
    if err:
        _raise(err)
    return index


def nvmlDeviceGetUUID(handle: int) -> str:
    return str(_field("nvmlDeviceGetUUID", handle, "uuid"))


def nvmlDeviceGetName(handle: int) -> str:
    return str(_field("nvmlDeviceGetName", handle, "name"))


def nvmlDeviceGetArchitecture(handle: int) -> int:
    return int(_field("nvmlDeviceGetArchitecture", handle, "architecture"))


def nvmlDeviceGetCudaComputeCapability(handle: int) -> tuple[int, int]:
    major, minor = _field("nvmlDeviceGetCudaComputeCapability", handle, "compute_capability")
    return int(major), int(minor)


def nvmlDeviceGetMemoryInfo(handle: int, version: int | None = None) -> _Obj:
    fn = "nvmlDeviceGetMemoryInfo_v2" if version else "nvmlDeviceGetMemoryInfo"
    if version and version != nvmlMemory_v2:
        _raise("ArgumentVersionMismatch")
    return _Obj(total=int(_field(fn, handle, "memory_total_bytes")), used=0, free=0)


def nvmlDeviceGetPciInfo(handle: int) -> _Obj:
    return _Obj(busId=str(_field("nvmlDeviceGetPciInfo", handle, "pci_bus_id")))


def _mask(items: list[int], size: int) -> Any:
    arr = (ctypes.c_ulonglong * size)()
    for i in items:
        if i // 64 < size:
            arr[i // 64] |= 1 << (i % 64)
    return arr


def _cpulist(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def nvmlDeviceGetCpuAffinity(handle: int, cpuSetSize: int) -> Any:
    return _mask(_cpulist(_field("nvmlDeviceGetCpuAffinity", handle, "cpu_affinity")), cpuSetSize)


def nvmlDeviceGetMemoryAffinity(handle: int, nodeSetSize: int, scope: int) -> Any:
    return _mask([int(_field("nvmlDeviceGetMemoryAffinity", handle, "numa_node"))], nodeSetSize)


def nvmlDeviceGetNumaNodeId(handle: int) -> int:
    return int(_field("nvmlDeviceGetNumaNodeId", handle, "gpu_numa_node"))


def nvmlDeviceGetMigMode(handle: int) -> list[int]:
    return list(_field("nvmlDeviceGetMigMode", handle, "mig_mode"))


def nvmlDeviceGetPersistenceMode(handle: int) -> int:
    return int(_field("nvmlDeviceGetPersistenceMode", handle, "persistence_mode"))


def nvmlDeviceGetTotalEccErrors(handle: int, errorType: int, counterType: int) -> int:
    key = "ecc_uncorrected" if errorType == NVML_MEMORY_ERROR_TYPE_UNCORRECTED else "ecc_corrected"
    return int(_field("nvmlDeviceGetTotalEccErrors", handle, key))


def nvmlDeviceGetPowerManagementLimit(handle: int) -> int:
    return int(_field("nvmlDeviceGetPowerManagementLimit", handle, "power_limit_mw"))


def nvmlDeviceGetMaxClockInfo(handle: int, type: int) -> int:  # nvidia-ml-py's parameter name
    if type != NVML_CLOCK_SM:
        _raise("NotSupported")
    return int(_field("nvmlDeviceGetMaxClockInfo", handle, "max_sm_clock_mhz"))


def _link(handle: int, link: int, fn: str) -> dict[str, Any]:
    links: list[dict[str, Any]] = _field(fn, handle, "nvlinks")
    if not 0 <= link < len(links):
        _raise("InvalidArgument")
    return links[link]


def nvmlDeviceGetNvLinkState(handle: int, link: int) -> int:
    return NVML_FEATURE_ENABLED if _link(handle, link, "nvmlDeviceGetNvLinkState")["active"] else NVML_FEATURE_DISABLED


def nvmlDeviceGetNvLinkRemotePciInfo(handle: int, link: int) -> _Obj:
    entry = _link(handle, link, "nvmlDeviceGetNvLinkRemotePciInfo")
    if not entry.get("remote_bus_id"):
        _raise("NotSupported")
    return _Obj(busId=entry["remote_bus_id"])


def nvmlDeviceGetNvLinkRemoteDeviceType(handle: int, link: int) -> int:
    entry = _link(handle, link, "nvmlDeviceGetNvLinkRemoteDeviceType")
    return int(entry.get("remote_type", NVML_NVLINK_DEVICE_TYPE_SWITCH))


def nvmlDeviceGetP2PStatus(device1: int, device2: int, p2pIndex: int) -> int:
    peers = _field("nvmlDeviceGetP2PStatus", device1, "p2p_nvlink")
    _dev(device2)
    if p2pIndex != NVML_P2P_CAPS_INDEX_NVLINK:
        _raise("NotSupported")
    return NVML_P2P_STATUS_OK if device2 in peers else NVML_P2P_STATUS_NOT_SUPPORTED


def _fill_fabric(fn: str, handle: int, ref: Any, legacy: bool) -> int:
    fab = _field(fn, handle, "fabric")
    info = ref._obj  # ctypes.byref(struct) -> the struct
    if not legacy:
        want = nvmlGpuFabricInfo_v3 if fab.get("v3", True) else nvmlGpuFabricInfo_v2
        if info.version not in (want, nvmlGpuFabricInfo_v2):
            _raise("ArgumentVersionMismatch")
    raw = bytes.fromhex(fab.get("cluster_uuid", "0" * 32).replace("-", ""))
    info.clusterUuid = (c_uint8 * 16)(*raw)
    info.status = int(fab.get("status", 0))
    info.cliqueId = int(fab.get("clique_id", 0))
    info.state = int(fab["state"])
    if hasattr(info, "healthSummary"):
        info.healthSummary = int(fab.get("health_summary", 0))
    return NVML_SUCCESS


def nvmlDeviceGetGpuFabricInfoV(device: int, gpuFabricInfo: Any) -> int:
    return _fill_fabric("nvmlDeviceGetGpuFabricInfoV", device, gpuFabricInfo, legacy=False)


def nvmlDeviceGetGpuFabricInfo(device: int, gpuFabricInfo: Any) -> int:
    return _fill_fabric("nvmlDeviceGetGpuFabricInfo", device, gpuFabricInfo, legacy=True)


def nvmlDeviceGetC2cModeInfoV(handle: int) -> _Obj:
    return _Obj(isC2cEnabled=int(_field("nvmlDeviceGetC2cModeInfoV", handle, "c2c_enabled")))
