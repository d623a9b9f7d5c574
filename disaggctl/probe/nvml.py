"""The NVML half of the probe agent: nvidia-ml-py (`pynvml`) calls, degrading field by field.

Standard library only apart from the `pynvml` module passed in (shipped inside the agent).
Every call can raise NVMLError_NotSupported, NVMLError_FunctionNotFound (older driver) or
NVMLError_NoPermission: the field stays unknown and one aggregated warning names the call,
the error and the GPUs. Nothing here may crash the probe except NVML failing to start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable
from typing import Any

from .fields import NVML_ARCH, enum_name, finish_gpu
from .sysfs import cpulist_from_mask, gpu_pci_info

_FABRIC_STATE = {0: "not_supported", 1: "not_started", 2: "in_progress", 3: "completed"}
_FABRIC_HEALTH = {1: "healthy", 2: "unhealthy", 3: "limited_capacity"}
# Calls that are expected to be NotSupported on common platforms (x86, no Grace): no warning then.
_QUIET = {"nvmlDeviceGetNumaNodeId", "nvmlDeviceGetC2cModeInfoV"}


class NvmlUnavailable(Exception):
    """NVML cannot start on this host (no library, no driver, no permission): fall back."""


def _s(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _uuid(raw: Any) -> str:
    h = bytes(raw).hex()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class Prober:
    """One probe run: the pynvml module plus the warnings collected along the way."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.failures: dict[tuple[str, str], list[int | None]] = {}

    def call(self, name: str, *args: Any, gpu: int | None = None, **kw: Any) -> Any:
        """nvml.<name>(*args) or None, recording why it failed (per field, never fatal)."""
        fn: Callable[..., Any] | None = getattr(self.nvml, name, None)
        if fn is None:  # an older nvidia-ml-py without the binding
            self._fail(name, "not in this nvidia-ml-py", gpu)
            return None
        try:
            return fn(*args, **kw)
        except self.nvml.NVMLError as e:
            if name in _QUIET and isinstance(e, self.nvml.NVMLError_NotSupported):
                return None
            self._fail(name, _s(e) or type(e).__name__, gpu)
            return None

    def _fail(self, name: str, why: str, gpu: int | None) -> None:
        self.failures.setdefault((name, why), []).append(gpu)

    def warnings(self) -> list[str]:
        out = []
        for (name, why), gpus in self.failures.items():
            which = sorted({g for g in gpus if g is not None})
            where = f" (GPU {', '.join(map(str, which))})" if which else ""
            out.append(f"NVML {name}: {why}{where}; field left unknown")
        return out

    # ------------------------------------------------------------------ host

    def host(self) -> dict[str, Any]:
        nv = self.nvml
        try:
            nv.nvmlInit()
        except nv.NVMLError as e:
            raise NvmlUnavailable(f"NVML did not start: {_s(e)}") from None
        try:
            count = self.call("nvmlDeviceGetCount") or 0
            # A GPU that fell off the bus ("GPU is lost") is left out with a warning; the others
            # keep their NVML index, so the count check reports the missing one.
            opened = [(i, self.call("nvmlDeviceGetHandleByIndex", i, gpu=i)) for i in range(count)]
            handles = {i: h for i, h in opened if h is not None}
            host: dict[str, Any] = {"source": "nvml", "gpus": []}
            driver = self.call("nvmlSystemGetDriverVersion")
            if driver:
                host["driver_version"] = _s(driver)
            cuda = self.call("nvmlSystemGetCudaDriverVersion_v2") or self.call("nvmlSystemGetCudaDriverVersion")
            if cuda:
                host["cuda_driver_version"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
            bus_ids = {i: self._bus_id(h, i) for i, h in handles.items()}
            for i, h in handles.items():
                try:
                    host["gpus"].append(self.gpu(i, h, handles, bus_ids))
                except Exception as e:  # one odd GPU must not lose the host's answer
                    self._fail("probe", f"{type(e).__name__}: {e}", i)
                    host["gpus"].append({"index": i, "pci_bus_id": bus_ids[i]})
            host["warnings"] = self.warnings()
            return host
        finally:
            with contextlib.suppress(nv.NVMLError):
                nv.nvmlShutdown()

    def _bus_id(self, h: Any, i: int) -> str | None:
        pci = self.call("nvmlDeviceGetPciInfo", h, gpu=i)
        return _s(pci.busId).upper() if pci is not None else None

    # ------------------------------------------------------------------ one GPU

    def gpu(self, i: int, h: Any, handles: dict[int, Any], bus_ids: dict[int, str | None]) -> dict[str, Any]:
        nv = self.nvml
        g: dict[str, Any] = {"index": i}
        call = self.call
        if (v := call("nvmlDeviceGetUUID", h, gpu=i)) is not None:
            g["uuid"] = _s(v)
        if (v := call("nvmlDeviceGetName", h, gpu=i)) is not None:
            g["name"] = _s(v)
        if (v := call("nvmlDeviceGetArchitecture", h, gpu=i)) is not None:
            g["architecture"] = NVML_ARCH.get(int(v))
        if (v := call("nvmlDeviceGetCudaComputeCapability", h, gpu=i)) is not None:
            g["compute_capability"] = f"{v[0]}.{v[1]}"
        mem = call("nvmlDeviceGetMemoryInfo", h, version=nv.nvmlMemory_v2, gpu=i)
        if mem is None:
            mem = call("nvmlDeviceGetMemoryInfo", h, gpu=i)
        if mem is not None:
            g["memory_total_mib"] = int(mem.total) // (1 << 20)
        g["pci_bus_id"] = bus_ids[i]
        self._numa(g, i, h)
        if (v := call("nvmlDeviceGetMigMode", h, gpu=i)) is not None:
            g["mig_enabled"] = v[0] == nv.NVML_DEVICE_MIG_ENABLE
        if (v := call("nvmlDeviceGetPersistenceMode", h, gpu=i)) is not None:
            g["persistence_mode"] = v == nv.NVML_FEATURE_ENABLED
        for key, kind in (("ecc_uncorrected", nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
                          ("ecc_corrected", nv.NVML_MEMORY_ERROR_TYPE_CORRECTED)):
            if (v := call("nvmlDeviceGetTotalEccErrors", h, kind, nv.NVML_AGGREGATE_ECC, gpu=i)) is not None:
                g[key] = int(v)
        if (v := call("nvmlDeviceGetPowerManagementLimit", h, gpu=i)) is not None:
            g["power_limit_w"] = v / 1000.0
        if (v := call("nvmlDeviceGetMaxClockInfo", h, nv.NVML_CLOCK_SM, gpu=i)) is not None:
            g["max_sm_clock_mhz"] = int(v)
        self._nvlinks(g, i, h, handles, bus_ids)
        g.update(self._fabric(i, h))
        if (v := call("nvmlDeviceGetC2cModeInfoV", h, gpu=i)) is not None:
            g["c2c_mode"] = "enabled" if v.isC2cEnabled else "disabled"
        finish_gpu(g)
        return {k: v for k, v in g.items() if v is not None}

    def _numa(self, g: dict[str, Any], i: int, h: Any) -> None:
        # sysfs first: it numbers NUMA nodes the way the NICs' sysfs entries do
        if g.get("pci_bus_id"):
            g.update(gpu_pci_info(g["pci_bus_id"]))
        nv = self.nvml
        if "numa_node" not in g:
            mask = self.call("nvmlDeviceGetMemoryAffinity", h, 64, nv.NVML_AFFINITY_SCOPE_NODE, gpu=i)
            nodes = [w * 64 + b for w, word in enumerate(mask or []) for b in range(64) if word >> b & 1]
            if nodes:
                g["numa_node"] = nodes[0]
        if "cpu_affinity" not in g:
            words = max(16, ((os.cpu_count() or 64) + 63) // 64)
            mask = self.call("nvmlDeviceGetCpuAffinity", h, words, gpu=i)
            if mask is not None and any(mask):
                g["cpu_affinity"] = cpulist_from_mask([int(w) for w in mask])
        node = self.call("nvmlDeviceGetNumaNodeId", h, gpu=i)
        if node is not None and int(node) >= 0:
            g["gpu_numa_node"] = int(node)

    def _nvlinks(self, g: dict[str, Any], i: int, h: Any, handles: dict[int, Any],
                 bus_ids: dict[int, str | None]) -> None:
        nv = self.nvml
        links: list[dict[str, Any]] = []
        by_bus = {b: j for j, b in bus_ids.items() if b}
        # NVML_NVLINK_MAX_LINKS (36) exceeds what drivers accept (18): stop at the first error
        for link in range(int(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18))):
            try:
                state = nv.nvmlDeviceGetNvLinkState(h, link)
            except nv.NVMLError as e:
                if link == 0 and not isinstance(e, getattr(nv, "NVMLError_InvalidArgument", ())):
                    self._fail("nvmlDeviceGetNvLinkState", _s(e), i)
                break
            entry: dict[str, Any] = {"link": link, "active": state == nv.NVML_FEATURE_ENABLED}
            if entry["active"]:
                pci = self.call("nvmlDeviceGetNvLinkRemotePciInfo", h, link, gpu=i)
                if pci is not None:
                    remote = _s(pci.busId).upper()
                    entry["peer_pci_bus_id"] = remote
                    if remote in by_bus:
                        entry["peer_gpu"] = by_bus[remote]
            links.append(entry)
        g["nvlinks"] = links
        if links and not any(link["active"] for link in links):
            g["nvlink_peers"] = []  # every link reported and none is up: this GPU lost NVLink
            return
        # Behind NVSwitches the links end at switches, not GPUs: ask NVML whether P2P over NVLink works
        peers: set[int] = set()
        p2p_known = True
        for j, other in handles.items():
            if j == i:
                continue
            status = self.call("nvmlDeviceGetP2PStatus", h, other, nv.NVML_P2P_CAPS_INDEX_NVLINK, gpu=i)
            if status is None:
                p2p_known = False
                break
            if status == nv.NVML_P2P_STATUS_OK:
                peers.add(j)
        if not p2p_known:
            peers = {link["peer_gpu"] for link in links if link.get("peer_gpu") is not None}
        g["nvlink_peers"] = sorted(peers)

    def _fabric(self, i: int, h: Any) -> dict[str, Any]:
        nv = self.nvml
        info = None
        for struct, fn in (("c_nvmlGpuFabricInfo_v3_t", "nvmlDeviceGetGpuFabricInfoV"),
                           ("c_nvmlGpuFabricInfo_v2_t", "nvmlDeviceGetGpuFabricInfoV"),
                           ("c_nvmlGpuFabricInfo_t", "nvmlDeviceGetGpuFabricInfo")):
            cls = getattr(nv, struct, None)
            if cls is None or not hasattr(nv, fn):
                continue
            candidate = cls()
            try:
                getattr(nv, fn)(h, ctypes.byref(candidate))
            except nv.NVMLError as e:
                if isinstance(e, (nv.NVMLError_NotSupported, nv.NVMLError_NoPermission)):
                    self._fail(fn, _s(e), i)
                    return {}
                continue  # older driver: version mismatch or function not found; try the older struct
            info = candidate
            break
        if info is None:
            self._fail("nvmlDeviceGetGpuFabricInfoV", "not available", i)
            return {}
        state = _FABRIC_STATE.get(int(info.state), f"state_{int(info.state)}")
        out: dict[str, Any] = {"fabric_state": state}
        if state == "not_supported":
            return out
        if state == "completed":
            status = int(info.status)
            name = "success" if status == 0 else enum_name(_s(nv.NVMLError(status)))
            out["fabric_status"] = name or f"error_{status}"
            out["clique_id"] = int(info.cliqueId)
            out["cluster_uuid"] = _uuid(info.clusterUuid)
        health = _FABRIC_HEALTH.get(int(getattr(info, "healthSummary", 0)))
        if health:
            out["fabric_health"] = health
        return out


def probe(nvml: Any) -> dict[str, Any]:
    """A partial HostTopology dict from NVML; raises NvmlUnavailable when NVML cannot start."""
    return Prober(nvml).host()
