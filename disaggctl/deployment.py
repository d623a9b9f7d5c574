"""The data passed between the pure stages: placement -> compile -> render.

    Placement     which hosts, GPUs and ports every instance gets
    DesiredState  every process (argv, env, files it reads) on every host
    RenderedFile  the files a target writes on a host (units, scripts, configs)

All of it is plain data (pydantic models) so it can be dumped as JSON (`plan --output json`),
compared, and tested without SSH, Slurm or a GPU.
"""

import hashlib
from typing import TypeVar

from pydantic import BaseModel, Field

from disaggctl.compat.report import CompatReport, FrozenData
from disaggctl.defaults import empty_list
from disaggctl.spec import Role


class Data(FrozenData):
    """The models passed between the stages (frozen, strict; `trusted` for compile's loops)."""


# --------------------------------------------------------------------------- placement


class NodeSlot(Data):
    """One host's share of an instance (an instance spans several hosts when TP x PP x DP does)."""

    host: str
    address: str
    node_rank: int
    gpus: list[int]
    numa_node: int | None = None
    cpus: str | None = None  # cpulist of the GPUs' CPU affinity
    nics: list[str] = Field(default_factory=empty_list)  # UCX device names, GPU-affine
    gpu: str | None = None  # GPU type key (b200, h200, ...) when known
    arch: str | None = None  # "blackwell", "hopper", "cpu" when known
    nvlink_domain: str | None = None  # the host itself (HGX) or an NVL72 clique/domain name


class Instance(Data):
    """One vLLM server (one API endpoint) of a pool."""

    name: str  # "prefill-0", "decode-1"
    role: Role
    index: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    nodes: list[NodeSlot]  # nodes[0] is the head: it serves HTTP
    http_port: int
    side_channel_port: int | None = None  # NIXL; DP rank r uses base + r
    master_port: int | None = None  # torch.distributed / DP RPC for multi-node instances
    lmcache_init_ports: list[int] = Field(default_factory=empty_list)  # receiver: one per TP rank
    lmcache_alloc_ports: list[int] = Field(default_factory=empty_list)
    lmcache_rpc_port: str | None = None  # a name, unique per instance on a host

    @property
    def head(self) -> NodeSlot:
        return self.nodes[0]

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.head.address)}:{self.http_port}"


class Placement(Data):
    name: str
    instances: list[Instance]
    router_host: str
    router_address: str
    router_port: int
    lmcache_proxy_port: int | None = None
    router_admin_port: int | None = None  # the builtin router's admin listener
    # host -> port -> owner ("prefill-0 http", "router", ...): every port taken on every host
    ports: dict[str, dict[int, str]] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=empty_list)

    def by_role(self, role: Role) -> list[Instance]:
        return [i for i in self.instances if i.role is role]

    @property
    def router_url(self) -> str:
        return f"http://{_url_host(self.router_address)}:{self.router_port}"


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


# --------------------------------------------------------------------------- compile


class ConfigFile(Data):
    """A config file a process reads (LMCache YAML, router JSON), relative to the deployment folder."""

    name: str
    content: str
    mode: int = 0o644

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


class Process(Data):
    """One process to run: the unit of systemd units, Slurm steps and local supervision."""

    name: str  # unique in the deployment: "decode-0", "prefill-1-node1" (a worker), "router"
    instance: str  # the instance it belongs to ("router" for the router)
    role: Role
    host: str
    address: str
    argv: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    files: list[str] = Field(default_factory=empty_list)  # ConfigFile names it reads (on its host)
    gpus: list[int] = Field(default_factory=empty_list)
    numa_node: int | None = None
    cpus: str | None = None
    http_port: int | None = None  # where /health answers; None for headless workers
    node_rank: int = 0
    start_order: int = 0  # decode 0, prefill 1, router 2: decoders start first

    @property
    def health_url(self) -> str | None:
        if self.http_port is None:
            return None
        return f"http://{_url_host(self.address)}:{self.http_port}/health"


class DesiredState(Data):
    """Everything that should run, per host, independent of the target that runs it."""

    name: str
    vllm_version: str
    model_name: str  # what clients put in "model"
    kv_kind: str
    config_dir: str  # where ConfigFiles live on the hosts
    processes: list[Process]
    files: dict[str, list[ConfigFile]] = Field(default_factory=dict)  # host -> files
    router_url: str
    placement: Placement
    compat: CompatReport | None = None  # fingerprints per instance and the KV transfer plan

    def on_host(self, host: str) -> list[Process]:
        """The processes on `host`, in `processes` order (indexed once: O(1) per call)."""
        return list(_grouped(self, "processes", self.processes).get(host, ()))

    def process(self, name: str) -> Process:
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def hosts(self) -> list[str]:
        seen: dict[str, None] = {}
        for p in self.processes:
            seen.setdefault(p.host, None)
        return list(seen)


# --------------------------------------------------------------------------- render


class RenderedFile(Data):
    """A file a target puts on a host (absolute path there)."""

    host: str
    path: str
    content: str
    mode: int = 0o644
    secret: bool = False  # content not shown in diffs

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


class Rendered(Data):
    """The output of a renderer: files per host plus what to start, in order."""

    target: str  # "systemd", "slurm", "local"
    files: list[RenderedFile]
    units: dict[str, list[str]] = Field(default_factory=dict)  # host -> unit/step names in start order

    def for_host(self, host: str) -> list[RenderedFile]:
        """The files for `host`, in `files` order (indexed once: O(1) per call)."""
        return list(_grouped(self, "files", self.files).get(host, ()))


_HostItem = TypeVar("_HostItem", Process, RenderedFile)


def _grouped(model: BaseModel, field: str, items: list[_HostItem]) -> dict[str, list[_HostItem]]:
    """`items` grouped by `.host`, cached in the model's __dict__ next to the fields (not a field:
    dumps, equality and hashing ignore it). The cache remembers the list it was built from, so a
    `model_copy(update=...)` with a new list, or a list that grew, is indexed again."""
    key = f"_by_host_{field}"
    cached = model.__dict__.get(key)
    if cached is None or cached[0] is not items or cached[1] != len(items):
        index: dict[str, list[_HostItem]] = {}
        for item in items:
            index.setdefault(item.host, []).append(item)
        cached = (items, len(items), index)
        model.__dict__[key] = cached
    result: dict[str, list[_HostItem]] = cached[2]
    return result
