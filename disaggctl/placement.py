"""Placement: assign every instance to hosts, GPUs and ports. Pure and deterministic.

Rules (in order of preference, see docs/architecture.md):
- a tensor-parallel group stays inside one NVLink domain: GPUs of one host that are NVLink
  peers, or hosts of one NVL72 clique when TP spans hosts; an instance never spans cliques;
- an instance on one host prefers GPUs of one NUMA node;
- GPUs and hosts the probe reported as degraded are skipped unless `allow_degraded`;
- hosts are filled in spec order, GPUs in index order, so the same spec and topology always
  give the same placement;
- ports are allocated per host from the spec's bases, skipping every port already taken on
  that host (router, LMCache proxy, other instances).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from disaggctl.catalog import ModelArchitecture
from disaggctl.deployment import Instance, NodeSlot, Placement
from disaggctl.errors import Issue, IssueList
from disaggctl.loader import LoadedSpec
from disaggctl.rules import is_blackwell
from disaggctl.spec import (
    ClusterSpec,
    GpuType,
    Host,
    LmcacheTransfer,
    LocalTarget,
    NixlTransfer,
    Pool,
    Quantization,
    Role,
)
from disaggctl.topology import Gpu, HostTopology, Problem, TopologyFile, from_count, load_topology

MIB = 1024 * 1024
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92
# "Minimal KV cache": room for one sequence this long (or max_model_len when shorter).
MIN_KV_TOKENS = 4096
# Bits per weight by quantization (NVFP4 carries a scale per 16 values: ~4.5 bits).
QUANT_BITS = {
    Quantization.NVFP4: 4.5,
    Quantization.FP8: 8.0,
    Quantization.MODELOPT: 8.0,
    Quantization.AWQ: 4.25,
    Quantization.GPTQ: 4.25,
    Quantization.MXFP4: 4.25,
}


# --------------------------------------------------------------------------- host state


@dataclass
class HostState:
    spec: Host
    index: int  # position in spec.hosts
    topo: HostTopology
    domain: str  # NVLink domain name: the host itself, or an NVL72 clique
    free: list[int]  # free GPU indices, ascending
    links_known: bool = True  # False: no NVLink data at all, every pair is assumed connected
    ports: dict[int, str] = field(default_factory=dict)

    def gpu(self, index: int) -> Gpu:
        for g in self.topo.gpus:
            if g.index == index:
                return g
        raise KeyError(index)

    def take_port(self, base: int, owner: str, count: int = 1, stride: int = 1) -> int:
        """The first port >= base where `count` ports (base, base+stride, ...) are all free."""
        port = base
        while True:
            wanted = [port + i * stride for i in range(count)]
            if wanted[-1] > 65535:
                raise ValueError(f"no free port at or above {base} on host {self.spec.name}")
            if not any(p in self.ports for p in wanted):
                for p in wanted:
                    self.ports[p] = owner
                return port
            port += 1


def host_topologies(loaded: LoadedSpec, topology: TopologyFile | None) -> dict[str, HostTopology]:
    """Each host's topology: the --topology file, the host's own topology file, or its GPU count."""
    spec = loaded.spec
    out: dict[str, HostTopology] = {}
    issues = IssueList()
    hw = spec.hardware
    memory = int(hw.hbm_gb * 1e9 / MIB) if hw.hbm_gb else None
    for i, h in enumerate(spec.hosts):
        if topology is not None and h.name in topology.hosts:
            out[h.name] = topology.hosts[h.name]
            continue
        if h.topology is not None:
            path = Path(h.topology).expanduser()
            path = path if path.is_absolute() else loaded.base_dir / path
            try:
                tf = load_topology(path)
            except (OSError, ValueError) as e:
                issues.add(
                    ("hosts", i, "topology"),
                    f"cannot read topology file {str(path)!r}: {e}",
                    "create it with `disaggctl probe` or `disaggctl topology`",
                )
                continue
            topo = tf.hosts.get(h.name) or (next(iter(tf.hosts.values())) if len(tf.hosts) == 1 else None)
            if topo is None:
                issues.add(
                    ("hosts", i, "topology"),
                    f"topology file has no host {h.name!r}",
                    f"hosts in the file: {', '.join(tf.hosts)}",
                )
                continue
            out[h.name] = topo
            continue
        count = h.gpus if h.gpus is not None else hw.gpus_per_host
        if count is None:
            issues.add(
                ("hosts", i, "gpus"),
                f"host {h.name} has no GPU count or topology",
                "set gpus: N, topology: FILE, or a hardware profile (profiles: [b200])",
            )
            continue
        gpu_type = h.gpu or hw.gpu
        arch = "blackwell" if is_blackwell(gpu_type, hw.arch) else ("hopper" if gpu_type else None)
        mem = _type_memory_mib(h.gpu) if h.gpu is not None and h.gpu != hw.gpu else memory
        out[h.name] = from_count(count, name=gpu_type.value if gpu_type else None, memory_mib=mem, architecture=arch)
    if issues.issues:
        raise loaded.error(issues.issues)
    return out


def _type_memory_mib(gpu: GpuType) -> int:
    """GPU memory of a host whose GPU type differs from the spec's hardware (its hardware profile)."""
    from disaggctl.sizing.hardware import load_gpu

    return int(load_gpu(gpu.value).hbm_gb * 1e9 / MIB)


def _gpu_identity(st: HostState, g: Gpu, cpu: bool) -> tuple[str | None, str | None]:
    """(GPU type key, architecture) of a GPU: from the probe, the host's gpu, or the spec's hardware."""
    from disaggctl.sizing.hardware import gpu_key_from_name

    if cpu:
        return None, "cpu"
    key = gpu_key_from_name(g.name) or (st.spec.gpu.value if st.spec.gpu else None)
    if g.is_blackwell is True:
        return key, "blackwell"
    if (g.architecture or "").lower() == "hopper" or (g.compute_capability or "").startswith("9."):
        return key, "hopper"
    return key, None


def _domain(h: Host, topo: HostTopology) -> str:
    if h.nvlink_domain:
        return f"domain:{h.nvlink_domain}"
    cliques = {(g.cluster_uuid, g.clique_id) for g in topo.gpus if g.in_nvl_domain}
    if len(cliques) == 1:
        uuid, clique = next(iter(cliques))
        return f"nvl:{uuid}:{clique}"
    return f"host:{h.name}"


# --------------------------------------------------------------------------- GPU choice


def _links_known(topo: HostTopology) -> bool:
    """Whether the topology says anything about NVLink (a bare `nvidia-smi -q -x` capture does not)."""
    return len(topo.gpus) <= 1 or any(g.nvlinks or g.nvlink_peers for g in topo.gpus)


def _connected(state: HostState, a: int, b: int) -> bool:
    if not state.links_known:
        return True
    ga, gb = state.gpu(a), state.gpu(b)
    return b in ga.nvlink_peers or a in gb.nvlink_peers


def _pick_gpus(state: HostState, count: int, allowed: set[int] | None) -> list[int] | None:
    """`count` free GPUs that are pairwise NVLink peers, preferring one NUMA node."""
    free = [g for g in state.free if allowed is None or g in allowed]
    if len(free) < count:
        return None
    if count == 1:
        return [free[0]]
    by_numa: dict[int | None, list[int]] = {}
    for g in free:
        by_numa.setdefault(state.gpu(g).numa_node, []).append(g)
    groups = [g for g in by_numa.values() if len(g) >= count] + [free]
    for group in groups:
        picked = _clique(state, group, count)
        if picked is not None:
            return picked
    return None


def _clique(state: HostState, candidates: list[int], count: int) -> list[int] | None:
    for start in range(len(candidates)):
        chosen = [candidates[start]]
        for g in candidates[start + 1 :]:
            if all(_connected(state, g, c) for c in chosen):
                chosen.append(g)
                if len(chosen) == count:
                    return chosen
        if len(chosen) == count:
            return chosen
    return None


def _nics_for(state: HostState, gpus: list[int]) -> list[str]:
    """RDMA NICs on the same NUMA node as the GPUs (all active NICs when NUMA is unknown)."""
    numa = {state.gpu(g).numa_node for g in gpus}
    active = [n for n in state.topo.nics if "ACTIVE" in (n.state or "ACTIVE").upper()]
    local = [n for n in active if n.numa_node is not None and n.numa_node in numa]
    return [n.ucx_name for n in (local or [])]


# --------------------------------------------------------------------------- placement


@dataclass
class _Ctx:
    spec: ClusterSpec
    hosts: list[HostState]
    issues: IssueList
    warnings: list[str]


def _candidates(ctx: _Ctx, pool: Pool) -> list[HostState]:
    sel = pool.hosts
    out = []
    for st in ctx.hosts:
        if sel.names and st.spec.name not in sel.names:
            continue
        if any(st.spec.labels.get(k) != v for k, v in sel.labels.items()):
            continue
        out.append(st)
    return out


def _place_instance(pool: Pool, cands: list[HostState]) -> list[tuple[HostState, list[int]]] | None:
    total = pool.gpus_per_replica
    tp = pool.tensor_parallel
    allowed = set(pool.hosts.gpus) or None
    # one host
    for st in cands:
        picked = _pick_gpus(st, total, allowed)
        if picked is not None:
            return [(st, picked)]
    # several hosts: n nodes with total/n GPUs each, all in one NVLink domain when TP spans hosts
    # (and always inside one NVL72 clique)
    for nodes in range(2, total + 1):
        if total % nodes:
            continue
        per = total // nodes
        if per < tp and (tp % per):
            continue
        if per >= tp and per % tp:
            continue
        domains: dict[str, list[HostState]] = {}
        for st in cands:
            domains.setdefault(st.domain, []).append(st)
        groups = list(domains.values())
        if per >= tp and all(d.startswith("host:") for d in domains):
            groups = [cands]  # HGX nodes: PP/DP may cross hosts, TP stays inside each host
        for group in groups:
            chosen: list[tuple[HostState, list[int]]] = []
            for st in group:
                picked = _pick_gpus(st, per, allowed)
                if picked is not None:
                    chosen.append((st, picked))
                    if len(chosen) == nodes:
                        return chosen
    return None


def place(loaded: LoadedSpec, topology: TopologyFile | None = None, *, allow_degraded: bool = False) -> Placement:
    """Place every instance of the spec. Raises SpecError (with file:line:col) when it cannot."""
    spec = loaded.spec
    topos = host_topologies(loaded, topology)
    issues = IssueList()
    warnings: list[str] = []
    states: list[HostState] = []
    selected = _selected_hosts(spec)
    for i, h in enumerate(spec.hosts):
        topo = topos[h.name]
        problems = _problems(topo, h.gpus)
        bad: set[int] = set()
        host_bad = False
        for p in problems:
            text = f"host {h.name}: {p.message}"
            if p.severity != "error" or allow_degraded:
                warnings.append(text)
                continue
            if p.gpu is None and (h.name not in selected or p.code == "no_gpus"):
                # a host no pool selects (a login or router host), or one without GPUs: it simply
                # gets no instances; the router may still run there
                host_bad = True
                warnings.append(text + " (no instances placed there)")
                continue
            if p.gpu is not None:
                bad.add(p.gpu)
                warnings.append(text + " (GPU skipped)")
            else:
                host_bad = True
                issues.add(
                    ("hosts", i),
                    f"host {h.name} is degraded: {p.message}",
                    "fix the host, drop it from the spec, or pass --allow-degraded",
                )
        free = [] if host_bad else sorted(g.index for g in topo.gpus if g.index not in bad)
        known = _links_known(topo)
        if not known:
            warnings.append(
                f"host {h.name}: the topology has no NVLink data; assuming all its GPUs are "
                "NVLink peers (probe the host, or add a `nvidia-smi topo -m` capture)"
            )
        states.append(HostState(h, i, topo, _domain(h, topo), free, known))
    ctx = _Ctx(spec, states, issues, warnings)
    _check_nvfp4(ctx)
    by_name = {s.spec.name: s for s in states}
    router_state = by_name.get(spec.router_host)
    if router_state is None:
        issues.raise_if_any()
        raise loaded.error([Issue(("router", "host"), f"router host {spec.router_host!r} is not declared")])
    # fixed ports first: the router's, the metrics port, LMCache's proxy port
    fixed: list[tuple[int, str, tuple[str | int, ...]]] = [(spec.router.port, "router", ("router", "port"))]
    if spec.router.metrics_port is not None:
        fixed.append((spec.router.metrics_port, "router metrics", ("router", "metrics_port")))
    kv = spec.kv_transfer
    if isinstance(kv, LmcacheTransfer):
        fixed.append((kv.proxy_port, "lmcache proxy", ("kv_transfer", "proxy_port")))
    for port, owner, path in fixed:
        if port in router_state.ports:
            issues.add(
                path,
                f"port {port} on host {router_state.spec.name} is already used by {router_state.ports[port]}",
                "give every process on a host its own port",
            )
        else:
            router_state.ports[port] = owner

    instances: list[Instance] = []
    for role in (Role.PREFILL, Role.DECODE):
        pool = spec.pool(role)
        needed = pool.replicas * pool.gpus_per_replica
        cands = _candidates(ctx, pool)
        available = sum(len(s.free) for s in cands)
        for r in range(pool.replicas):
            cands = [st for st in cands if st.free]  # first fit: full hosts drop out
            slots = _place_instance(pool, cands)
            if slots is None:
                placed = sum(1 for i in instances if i.role is role)
                issues.add(
                    (role.value, "replicas"),
                    f"cannot place {role.value} instance {r} ({pool.gpus_per_replica} GPUs: TP "
                    f"{pool.tensor_parallel} x PP {pool.pipeline_parallel} x DP {pool.data_parallel}); "
                    f"{placed} of {pool.replicas} placed, {available} free GPUs for {needed} needed",
                    "add hosts or GPUs, lower replicas or parallelism, or widen the pool's host selector "
                    "(a TP group needs NVLink-connected GPUs in one domain)",
                )
                break
            instances.append(_make_instance(ctx, role, pool, r, slots))
    _check_fit(ctx, instances)
    if issues.issues:
        raise loaded.error(issues.issues)
    # after the instances, so their ports do not move: the builtin router's admin listener
    admin_port = None
    if spec.router.kind == "builtin":
        base = spec.router.port + 1 if spec.router.port < 65535 else 1024
        admin_port = router_state.take_port(base, "router admin")
    return Placement(
        name=spec.name,
        instances=instances,
        router_host=router_state.spec.name,
        router_address=router_state.spec.addr,
        router_port=spec.router.port,
        lmcache_proxy_port=kv.proxy_port if isinstance(kv, LmcacheTransfer) else None,
        router_admin_port=admin_port,
        ports={s.spec.name: dict(sorted(s.ports.items())) for s in states if s.ports},
        warnings=warnings,
    )


def _selected_hosts(spec: ClusterSpec) -> set[str]:
    """Hosts some pool with replicas may place instances on."""
    out: set[str] = set()
    for role in (Role.PREFILL, Role.DECODE):
        pool = spec.pool(role)
        if pool.replicas == 0:
            continue
        for h in spec.hosts:
            sel = pool.hosts
            if (not sel.names or h.name in sel.names) and all(h.labels.get(k) == v for k, v in sel.labels.items()):
                out.add(h.name)
    return out


def _problems(topo: HostTopology, expected: int | None) -> list[Problem]:
    try:
        from disaggctl.probe.checks import detect_problems
    except ImportError:
        return list(topo.problems)
    found = detect_problems(topo, expected)
    seen = {(p.code, p.gpu) for p in found}
    return found + [p for p in topo.problems if (p.code, p.gpu) not in seen]


def _make_instance(ctx: _Ctx, role: Role, pool: Pool, r: int, slots: list[tuple[HostState, list[int]]]) -> Instance:
    spec = ctx.spec
    name = f"{role.value}-{r}"
    for st, gpus in slots:
        st.free = [g for g in st.free if g not in gpus]
    head = slots[0][0]
    http = head.take_port(spec.engine.http_port, f"{name} http")
    side = master = None
    kv = spec.kv_transfer
    init_ports: list[int] = []
    alloc_ports: list[int] = []
    if isinstance(kv, NixlTransfer):
        # one side-channel port per DP rank (the port used is base + DP rank), the same on every node
        side = _common_port(slots, kv.side_channel_port, f"{name} nixl", pool.data_parallel)
    if len(slots) > 1:
        master = _common_port(slots, spec.engine.multinode_port, f"{name} master", 2)
    if isinstance(kv, LmcacheTransfer) and role is Role.DECODE:
        tp = pool.tensor_parallel
        base_i = head.take_port(kv.init_port, f"{name} lmcache init", tp)
        base_a = head.take_port(kv.alloc_port, f"{name} lmcache alloc", tp)
        init_ports = list(range(base_i, base_i + tp))
        alloc_ports = list(range(base_a, base_a + tp))
    nodes = []
    for rank, (st, gpus) in enumerate(slots):
        g0 = st.gpu(gpus[0])
        numas = {st.gpu(g).numa_node for g in gpus}
        gpu_type, arch = _gpu_identity(st, g0, isinstance(spec.target, LocalTarget) and spec.target.cpu)
        nodes.append(
            NodeSlot(
                host=st.spec.name,
                address=st.spec.addr,
                node_rank=rank,
                gpus=gpus,
                numa_node=g0.numa_node if len(numas) == 1 else None,
                cpus=g0.cpu_affinity if len({st.gpu(g).cpu_affinity for g in gpus}) == 1 else None,
                nics=_nics_for(st, gpus),
                gpu=gpu_type,
                arch=arch,
                nvlink_domain=st.domain,
            )
        )
    return Instance(
        name=name,
        role=role,
        index=r,
        tensor_parallel=pool.tensor_parallel,
        pipeline_parallel=pool.pipeline_parallel,
        data_parallel=pool.data_parallel,
        nodes=nodes,
        http_port=http,
        side_channel_port=side,
        master_port=master,
        lmcache_init_ports=init_ports,
        lmcache_alloc_ports=alloc_ports,
        lmcache_rpc_port=f"{'producer' if role is Role.PREFILL else 'consumer'}{r}"
        if isinstance(kv, LmcacheTransfer)
        else None,
    )


def _common_port(slots: list[tuple[HostState, list[int]]], base: int, owner: str, count: int) -> int:
    """A port block free on every node of a multi-node instance (vLLM uses one value for all)."""
    port = base
    while True:
        ok = all(not any(p in st.ports for p in range(port, port + count)) for st, _ in slots)
        if ok:
            for st, _ in slots:
                for p in range(port, port + count):
                    st.ports[p] = owner
            return port
        port += 1


def _check_nvfp4(ctx: _Ctx) -> None:
    if ctx.spec.model.quantization is not Quantization.NVFP4:
        return
    for st in ctx.hosts:
        for g in st.topo.gpus:
            if g.is_blackwell is False:
                ctx.issues.add(
                    ("model", "quantization"),
                    f"NVFP4 (modelopt_fp4) needs Blackwell GPUs, but GPU {g.index} of host "
                    f"{st.spec.name} is {g.name or g.architecture}",
                    "use quantization: fp8 on Hopper, or place on Blackwell hosts",
                )
                return


def weight_bits(spec: ClusterSpec, arch: ModelArchitecture) -> float:
    return QUANT_BITS.get(spec.model.quantization, arch.weight_bits)


def _check_fit(ctx: _Ctx, instances: list[Instance]) -> None:
    """Weights plus a minimal KV cache must fit the GPUs of one instance."""
    spec = ctx.spec
    arch = spec.model.resolved_architecture()
    if arch is None:
        return
    by_name = {s.spec.name: s for s in ctx.hosts}
    kv_bytes = 1.0 if spec.model.kv_cache_dtype.startswith("fp8") else 2.0
    tokens = min(spec.model.max_model_len or MIN_KV_TOKENS, MIN_KV_TOKENS)
    for role in (Role.PREFILL, Role.DECODE):
        pool = spec.pool(role)
        inst = next((i for i in instances if i.role is role), None)
        if inst is None:
            continue
        mems = [by_name[n.host].gpu(g).memory_total_mib for n in inst.nodes for g in n.gpus]
        if any(m is None for m in mems):
            continue
        per_gpu = min(m for m in mems if m is not None) * MIB
        util = pool.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
        shards = pool.tensor_parallel * pool.pipeline_parallel
        bits = weight_bits(spec, arch)
        total = arch.weight_bytes(bits)
        if pool.expert_parallel and arch.experts and arch.active_params_b:
            # expert parallelism spreads the routed experts over every DP rank of the instance
            active = arch.active_b * 1e9 * bits / 8
            weights = active / shards + (total - active) / (shards * pool.data_parallel)
        else:
            weights = total / shards
        kv = arch.kv_bytes_per_token(kv_bytes) * tokens / shards
        need = weights + kv
        if need > per_gpu * util:
            ctx.issues.add(
                (role.value, "tensor_parallel"),
                f"the model does not fit: {need / 1e9:.1f} GB per GPU (weights {weights / 1e9:.1f} GB "
                f"+ KV for {tokens} tokens {kv / 1e9:.2f} GB) > {per_gpu * util / 1e9:.1f} GB usable "
                f"({util:.2f} of {per_gpu / 1e9:.0f} GB)",
                f"raise tensor_parallel/pipeline_parallel (x{need / (per_gpu * util):.1f} at least), "
                "quantize (fp8, or modelopt_fp4 on Blackwell), or use GPUs with more memory",
            )
