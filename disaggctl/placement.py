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

from collections.abc import Callable, Iterator
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
    gpus: dict[int, Gpu] = field(init=False, repr=False)  # by index (the first GPU of an index wins)

    def __post_init__(self) -> None:
        self.gpus = {}
        for g in self.topo.gpus:
            self.gpus.setdefault(g.index, g)

    def gpu(self, index: int) -> Gpu:
        return self.gpus[index]

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
    made: dict[tuple[int, str | None, str | None, int | None], HostTopology] = {}
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
        key = (count, gpu_type.value if gpu_type else None, arch, mem)
        if key not in made:  # hosts alike share one (read-only) topology: 2304 hosts, a handful of shapes
            made[key] = from_count(count, name=key[1], memory_mib=mem, architecture=arch)
        out[h.name] = made[key]
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
    problems: dict[tuple[int, int | None], list[Problem]] = field(default_factory=dict)  # by (id(topo), GPUs)
    gpu_facts: dict[tuple[object, ...], GpuFacts] = field(default_factory=dict)  # _gpu_facts


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


Slots = list[tuple[HostState, list[int]]]


class _Hosts:
    """Hosts in spec order for a test that, once false, stays false (GPUs are only ever taken
    during placement): hosts found failing it are dropped rather than scanned on every instance."""

    def __init__(self, hosts: list[HostState], alive: Callable[[HostState], bool]) -> None:
        self.hosts = hosts
        self.alive = alive
        self.start = 0  # hosts before it failed the test

    def scan(self) -> Iterator[HostState]:
        hosts, alive = self.hosts, self.alive
        while self.start < len(hosts) and not alive(hosts[self.start]):
            self.start += 1
        dead = 0
        try:
            for i in range(self.start, len(hosts)):
                if alive(hosts[i]):
                    yield hosts[i]
                else:
                    dead += 1
        finally:
            if dead > 32 and dead * 8 > len(hosts) - self.start:  # many dead ones inside: compact
                self.hosts = [st for st in hosts[self.start :] if alive(st)]
                self.start = 0


class _PoolFit:
    """First fit of one pool's instances, in O(hosts) for the whole pool instead of per instance.

    The answer is the one of trying every candidate host for every instance: hosts in spec order,
    NVLink domains in the order of their first host with a free GPU. What makes it fast: a host with
    fewer free GPUs than asked for is skipped for good (free GPUs only shrink), and a host whose GPU
    choice failed is not asked again until its free GPUs change.
    """

    def __init__(self, pool: Pool, cands: list[HostState]) -> None:
        self.pool = pool
        self.allowed = set(pool.hosts.gpus) or None
        self.with_free = _Hosts(cands, lambda st: bool(st.free))
        self.shared_free = _Hosts(cands, lambda st: bool(st.free) and not st.domain.startswith("host:"))
        self.cands = cands
        self.domains: dict[str, list[HostState]] = {}
        for st in cands:
            self.domains.setdefault(st.domain, []).append(st)
        self.fits: dict[tuple[str | None, int], _Hosts] = {}  # (domain or all, GPUs) -> hosts with as many
        self.failed: dict[tuple[int, int], int] = {}  # (host index, GPUs) -> its free count when that failed

    def _avail(self, st: HostState) -> int:
        return len(st.free) if self.allowed is None else sum(1 for g in st.free if g in self.allowed)

    def _fitting(self, domain: str | None, count: int) -> _Hosts:
        key = (domain, count)
        if key not in self.fits:
            hosts = self.cands if domain is None else self.domains[domain]
            self.fits[key] = _Hosts(hosts, lambda st: self._avail(st) >= count)
        return self.fits[key]

    def _pick(self, st: HostState, count: int) -> list[int] | None:
        key = (st.index, count)
        if self.failed.get(key) == len(st.free):
            return None  # the same free GPUs as when it failed: the same answer
        picked = _pick_gpus(st, count, self.allowed)
        if picked is None:
            self.failed[key] = len(st.free)
        return picked

    def _first(self, hosts: _Hosts, nodes: int, per: int) -> Slots | None:
        chosen: Slots = []
        for st in hosts.scan():
            picked = self._pick(st, per)
            if picked is not None:
                chosen.append((st, picked))
                if len(chosen) == nodes:
                    return chosen
        return None

    def place_one(self) -> Slots | None:
        """Hosts and GPUs for the next instance (None when it does not fit)."""
        total, tp = self.pool.gpus_per_replica, self.pool.tensor_parallel
        one = self._first(self._fitting(None, total), 1, total)
        if one is not None:
            return one
        # several hosts: n nodes with total/n GPUs each, all in one NVLink domain when TP spans hosts
        # (and always inside one NVL72 clique)
        for nodes in range(2, total + 1):
            per = total // nodes
            if total % nodes or (per < tp and tp % per) or (per >= tp and per % tp):
                continue
            chosen = self._several(nodes, per, tp)
            if chosen is not None:
                return chosen
        return None

    def _several(self, nodes: int, per: int, tp: int) -> Slots | None:
        if per >= tp and next(self.shared_free.scan(), None) is None:
            return self._first(self._fitting(None, per), nodes, per)  # HGX: TP inside each host
        seen: set[str] = set()
        for st in self.with_free.scan():
            if st.domain not in seen:
                seen.add(st.domain)
                chosen = self._first(self._fitting(st.domain, per), nodes, per)
                if chosen is not None:
                    return chosen
        return None


def place(loaded: LoadedSpec, topology: TopologyFile | None = None, *, allow_degraded: bool = False) -> Placement:
    """Place every instance of the spec. Raises SpecError (with file:line:col) when it cannot."""
    spec = loaded.spec
    topos = host_topologies(loaded, topology)
    ctx = _Ctx(spec, [], IssueList(), [])
    selected = _selected_hosts(spec)
    ctx.hosts = [
        _host_state(ctx, i, h, topos[h.name], h.name in selected, allow_degraded) for i, h in enumerate(spec.hosts)
    ]
    _check_nvfp4(ctx)
    router_state = {s.spec.name: s for s in ctx.hosts}.get(spec.router_host)
    if router_state is None:
        ctx.issues.raise_if_any()
        raise loaded.error([Issue(("router", "host"), f"router host {spec.router_host!r} is not declared")])
    _reserve_fixed_ports(ctx, router_state)
    instances = [inst for role in (Role.PREFILL, Role.DECODE) for inst in _place_pool(ctx, role)]
    _check_fit(ctx, instances)
    if ctx.issues.issues:
        raise loaded.error(ctx.issues.issues)
    kv = spec.kv_transfer
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
        ports={s.spec.name: dict(sorted(s.ports.items())) for s in ctx.hosts if s.ports},
        warnings=ctx.warnings,
    )


def _host_state(ctx: _Ctx, i: int, h: Host, topo: HostTopology, selected: bool, allow_degraded: bool) -> HostState:
    """A host's free GPUs: the probe's problems skip GPUs (or the whole host) unless allow_degraded."""
    bad: set[int] = set()
    host_bad = False
    key = (id(topo), h.gpus)
    if key not in ctx.problems:
        ctx.problems[key] = _problems(topo, h.gpus)
    for p in ctx.problems[key]:
        text = f"host {h.name}: {p.message}"
        if p.severity != "error" or allow_degraded:
            ctx.warnings.append(text)
        elif p.gpu is None and (not selected or p.code == "no_gpus"):
            # a host no pool selects (a login or router host), or one without GPUs: it simply
            # gets no instances; the router may still run there
            host_bad = True
            ctx.warnings.append(text + " (no instances placed there)")
        elif p.gpu is not None:
            bad.add(p.gpu)
            ctx.warnings.append(text + " (GPU skipped)")
        else:
            host_bad = True
            ctx.issues.add(
                ("hosts", i),
                f"host {h.name} is degraded: {p.message}",
                "fix the host, drop it from the spec, or pass --allow-degraded",
            )
    free = [] if host_bad else sorted(g.index for g in topo.gpus if g.index not in bad)
    known = _links_known(topo)
    if not known:
        ctx.warnings.append(
            f"host {h.name}: the topology has no NVLink data; assuming all its GPUs are "
            "NVLink peers (probe the host, or add a `nvidia-smi topo -m` capture)"
        )
    return HostState(h, i, topo, _domain(h, topo), free, known)


def _reserve_fixed_ports(ctx: _Ctx, router_state: HostState) -> None:
    """The router's port, its metrics port and LMCache's proxy port, before any instance's."""
    spec = ctx.spec
    fixed: list[tuple[int, str, tuple[str | int, ...]]] = [(spec.router.port, "router", ("router", "port"))]
    if spec.router.metrics_port is not None:
        fixed.append((spec.router.metrics_port, "router metrics", ("router", "metrics_port")))
    kv = spec.kv_transfer
    if isinstance(kv, LmcacheTransfer):
        fixed.append((kv.proxy_port, "lmcache proxy", ("kv_transfer", "proxy_port")))
    for port, owner, path in fixed:
        if port in router_state.ports:
            ctx.issues.add(
                path,
                f"port {port} on host {router_state.spec.name} is already used by {router_state.ports[port]}",
                "give every process on a host its own port",
            )
        else:
            router_state.ports[port] = owner


def _place_pool(ctx: _Ctx, role: Role) -> list[Instance]:
    """The pool's instances, first fit; the first one that does not fit is an issue (and the last)."""
    pool = ctx.spec.pool(role)
    cands = _candidates(ctx, pool)
    needed = pool.replicas * pool.gpus_per_replica
    available = sum(len(s.free) for s in cands)
    fit = _PoolFit(pool, cands)
    instances: list[Instance] = []
    for r in range(pool.replicas):
        slots = fit.place_one()
        if slots is None:
            ctx.issues.add(
                (role.value, "replicas"),
                f"cannot place {role.value} instance {r} ({pool.gpus_per_replica} GPUs: TP "
                f"{pool.tensor_parallel} x PP {pool.pipeline_parallel} x DP {pool.data_parallel}); "
                f"{len(instances)} of {pool.replicas} placed, {available} free GPUs for {needed} needed",
                "add hosts or GPUs, lower replicas or parallelism, or widen the pool's host selector "
                "(a TP group needs NVLink-connected GPUs in one domain)",
            )
            break
        instances.append(_make_instance(ctx, role, pool, r, slots))
    return instances


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


def _make_instance(ctx: _Ctx, role: Role, pool: Pool, r: int, slots: Slots) -> Instance:
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
        numa, cpus, nics, gpu_type, arch = _gpu_facts(ctx, st, gpus)
        nodes.append(
            NodeSlot.trusted(
                host=st.spec.name,
                address=st.spec.addr,
                node_rank=rank,
                gpus=list(gpus),
                numa_node=numa,
                cpus=cpus,
                nics=list(nics),
                gpu=gpu_type,
                arch=arch,
                nvlink_domain=st.domain,
            )
        )
    return Instance.trusted(
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


GpuFacts = tuple[int | None, str | None, list[str], str | None, str | None]


def _gpu_facts(ctx: _Ctx, st: HostState, gpus: list[int]) -> GpuFacts:
    """(NUMA node, CPU list, NICs, GPU type, architecture) of a node's GPUs: what its topology and
    the host's `gpu` say, computed once per distinct (topology, host gpu, GPUs) - hosts of a spec
    without probed topologies share one."""
    key = (id(st.topo), st.spec.gpu, tuple(gpus))
    facts = ctx.gpu_facts.get(key)
    if facts is None:
        spec = ctx.spec
        g0 = st.gpu(gpus[0])
        numas = {st.gpu(g).numa_node for g in gpus}
        gpu_type, arch = _gpu_identity(st, g0, isinstance(spec.target, LocalTarget) and spec.target.cpu)
        facts = ctx.gpu_facts[key] = (
            g0.numa_node if len(numas) == 1 else None,
            g0.cpu_affinity if len({st.gpu(g).cpu_affinity for g in gpus}) == 1 else None,
            _nics_for(st, gpus),
            gpu_type,
            arch,
        )
    return facts


def _common_port(slots: Slots, base: int, owner: str, count: int) -> int:
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
