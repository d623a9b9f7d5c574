"""The GPU topology of hosts: what the NVML probe finds and what placement consumes.

A topology file is JSON: `{"version": 1, "hosts": {"<host name>": HostTopology, ...}}`.
`disaggctl probe` and `disaggctl topology` write it; `plan`/`render --topology` read it.
Unknown values stay `None` (a field the driver could not report), never a guess.
"""

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from disaggctl.defaults import empty_list
from disaggctl.safestr import CpuList, Text

TOPOLOGY_VERSION = 1


class Model(BaseModel):
    # a topology file is user input too: no inf/nan, and strings that reach units are typed (safestr)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class NvLink(Model):
    link: int
    active: bool
    peer_pci_bus_id: str | None = None
    peer_gpu: int | None = None  # index of the peer GPU on the same host, when it is one


class Gpu(Model):
    """One GPU as the probe saw it."""

    index: int = Field(ge=0, le=1023)
    uuid: str | None = None
    name: str | None = None
    architecture: str | None = None  # "blackwell", "hopper", ... (NVML arch 10 is Blackwell)
    compute_capability: str | None = None  # "10.0"
    memory_total_mib: int | None = Field(default=None, ge=0, le=1 << 24)  # at most 16 TiB
    pci_bus_id: str | None = None
    numa_node: int | None = None  # the CPU-side NUMA node (the one NICs report in sysfs)
    gpu_numa_node: int | None = None  # the GPU memory's own NUMA node on coherent (Grace) systems
    cpu_affinity: CpuList | None = None  # cpulist, e.g. "0-71" (goes into CPUAffinity=)
    mig_enabled: bool | None = None
    persistence_mode: bool | None = None
    ecc_uncorrected: int | None = None
    ecc_corrected: int | None = None
    power_limit_w: float | None = None
    max_sm_clock_mhz: int | None = None
    nvlinks: list[NvLink] = Field(default_factory=empty_list)
    nvlink_peers: list[int] = Field(
        default_factory=empty_list, description="Indices of GPUs on this host reachable over NVLink."
    )
    fabric_state: str | None = None  # "completed", "in_progress", "not_started", "not_supported"
    fabric_status: str | None = None  # "success" or an error name
    fabric_health: str | None = None  # health summary: "healthy", "unhealthy", "limited_capacity"
    clique_id: int | None = None
    cluster_uuid: str | None = None
    c2c_mode: str | None = None  # Grace-Blackwell chip-to-chip link: "enabled"/"disabled"

    @property
    def nvlink_active(self) -> int:
        return sum(1 for link in self.nvlinks if link.active)

    @property
    def is_blackwell(self) -> bool | None:
        if self.architecture:
            return self.architecture.lower() == "blackwell"
        if self.compute_capability:
            return self.compute_capability.split(".")[0] == "10"
        return None

    @property
    def in_nvl_domain(self) -> bool:
        """Part of a multi-node NVLink domain (NVL72 clique with a real cluster UUID)."""
        return bool(self.cluster_uuid and self.cluster_uuid.strip("0-") and self.clique_id)


class Nic(Model):
    """An RDMA NIC from /sys/class/infiniband."""

    name: Text  # "mlx5_0" (goes into UCX_NET_DEVICES)
    port: int = Field(default=1, ge=0, le=65535)
    numa_node: int | None = None
    pci_bus_id: str | None = None
    state: str | None = None  # "ACTIVE", "DOWN"
    rate_gbps: float | None = None
    link_layer: str | None = None  # "InfiniBand" / "Ethernet"

    @property
    def ucx_name(self) -> str:
        return f"{self.name}:{self.port}"


class Problem(Model):
    """Something the probe found wrong with a host (placement avoids it unless told not to)."""

    code: str  # "gpu_missing", "nvlink_down", "fabric_incomplete", "mig_enabled", "mixed_gpus", "driver_old", ...
    message: str
    gpu: int | None = None
    severity: str = "error"  # "error" (placement refuses) or "warning"


class HostTopology(Model):
    hostname: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpus: list[Gpu] = Field(default_factory=empty_list)
    nics: list[Nic] = Field(default_factory=empty_list)
    problems: list[Problem] = Field(default_factory=empty_list)
    warnings: list[str] = Field(default_factory=empty_list)
    source: str | None = None  # "nvml", "nvidia-smi", "count", "capture:<file>"

    @property
    def bad_gpus(self) -> set[int]:
        return {p.gpu for p in self.problems if p.gpu is not None and p.severity == "error"}


class TopologyFile(Model):
    version: int = TOPOLOGY_VERSION
    hosts: dict[str, HostTopology] = Field(default_factory=dict)


def from_count(
    count: int,
    *,
    name: str | None = None,
    memory_mib: int | None = None,
    architecture: str | None = None,
    numa_nodes: int = 1,
) -> HostTopology:
    """A topology of `count` fully NVLinked GPUs, split evenly over `numa_nodes` (from the spec alone)."""
    per_numa = max(1, count // max(1, numa_nodes))
    gpus = [
        Gpu(
            index=i,
            name=name,
            memory_total_mib=memory_mib,
            architecture=architecture,
            numa_node=min(i // per_numa, numa_nodes - 1) if numa_nodes > 1 else None,
            nvlink_peers=[j for j in range(count) if j != i],
        )
        for i in range(count)
    ]
    return HostTopology(gpus=gpus, source="count")


def load_topology(path: str | Path) -> TopologyFile:
    return TopologyFile.model_validate(json.loads(Path(path).read_text()))


def dump_topology(topo: TopologyFile) -> str:
    return topo.model_dump_json(indent=2, exclude_none=True) + "\n"
