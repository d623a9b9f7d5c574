"""Cross-field rules of the spec that need no GPU topology.

Each rule adds an issue at the spec path the user must change. Topology-dependent rules
(GPU counts, NVLink domains, memory of the real GPUs) live in `placement`.
"""

from __future__ import annotations

from disaggctl import slurmtime as st
from disaggctl.compat import spec_rules as compat_rules
from disaggctl.errors import Issue, IssueList
from disaggctl.spec import (
    Arch,
    ClusterSpec,
    GpuType,
    LmcacheTransfer,
    NixlTransfer,
    Quantization,
    Role,
    SlurmTarget,
)

BLACKWELL = {GpuType.B200, GpuType.B300, GpuType.GB200, GpuType.GB300}


def is_blackwell(gpu: GpuType | None, arch: Arch | None = None) -> bool | None:
    """True/False when known, None when the spec says nothing about the GPU."""
    if gpu is not None:
        return gpu in BLACKWELL
    if arch is not None:
        return arch is Arch.BLACKWELL
    return None


def check_spec(spec: ClusterSpec) -> list[Issue]:
    out = IssueList()
    _hosts(spec, out)
    _parallelism(spec, out)
    _connector(spec, out)
    out.issues.extend(compat_rules.check_spec(spec))  # P/D pairing: TP ratio, KV heads, PP, block sizes
    _quantization(spec, out)
    _router(spec, out)
    _gpu_pins(spec, out)
    _successor(spec, out)
    return out.issues


def _hosts(spec: ClusterSpec, out: IssueList) -> None:
    names = {h.name for h in spec.hosts}
    for i, h in enumerate(spec.hosts):
        jump = h.ssh.jump
        if jump and "@" not in jump and ":" not in jump and jump not in names and "." not in jump:
            out.add(
                ("hosts", i, "ssh", "jump"),
                f"jump host {jump!r} is not a declared host",
                "name a host from `hosts:` or write user@address[:port]",
            )
        if jump == h.name:
            out.add(("hosts", i, "ssh", "jump"), "a host cannot be its own jump host")
        if h.gpus is not None and h.topology is not None:
            out.add(
                ("hosts", i, "gpus"),
                "give either gpus or topology, not both",
                "the topology file already says how many GPUs the host has",
            )
    for role in (Role.PREFILL, Role.DECODE):
        pool = spec.pool(role)
        for j, n in enumerate(pool.hosts.names):
            if n not in names:
                out.add(
                    (role.value, "hosts", "names", j),
                    f"host {n!r} is not declared",
                    f"declared hosts: {', '.join(sorted(names))}",
                )


def _parallelism(spec: ClusterSpec, out: IssueList) -> None:
    arch = spec.model.resolved_architecture()
    if arch is None:
        return
    for role in (Role.PREFILL, Role.DECODE):
        pool = spec.pool(role)
        tp = pool.tensor_parallel
        if arch.attention_heads % tp:
            out.add(
                (role.value, "tensor_parallel"),
                f"tensor_parallel {tp} does not divide the model's {arch.attention_heads} attention heads",
                f"use a divisor of {arch.attention_heads}: {_divisors(arch.attention_heads)}",
            )
        elif arch.kv_latent_dim is None and arch.kv_heads % tp and tp % arch.kv_heads:
            out.add(
                (role.value, "tensor_parallel"),
                f"tensor_parallel {tp} and the model's {arch.kv_heads} KV heads do not divide each other",
                f"use a divisor or multiple of {arch.kv_heads}",
            )
        if pool.pipeline_parallel > arch.layers:
            out.add(
                (role.value, "pipeline_parallel"),
                f"pipeline_parallel {pool.pipeline_parallel} exceeds the model's {arch.layers} layers",
            )
        if pool.expert_parallel and not arch.experts:
            out.add(
                (role.value, "expert_parallel"),
                "expert_parallel needs a mixture-of-experts model",
                "remove expert_parallel or set model.architecture.experts",
            )


def _connector(spec: ClusterSpec, out: IssueList) -> None:
    kv = spec.kv_transfer
    d_tp = spec.decode.tensor_parallel
    if isinstance(kv, LmcacheTransfer):
        if spec.router.kind == "vllm-router":
            out.add(
                ("router", "kind"),
                "vllm-router does not speak LMCache's P/D protocol",
                "use router kind builtin with kv_transfer kind lmcache",
            )
        ports = {"init_port": kv.init_port, "alloc_port": kv.alloc_port, "proxy_port": kv.proxy_port}
        ranges = {k: (v, v + max(d_tp, 1) * max(spec.decode.replicas, 1)) for k, v in ports.items()}
        keys = list(ranges)
        for a in range(len(keys)):
            for b in range(a + 1, len(keys)):
                (s1, e1), (s2, e2) = ranges[keys[a]], ranges[keys[b]]
                if s1 < e2 and s2 < e1:
                    out.add(
                        ("kv_transfer", keys[b]),
                        f"{keys[b]} range {s2}-{e2 - 1} overlaps {keys[a]} range {s1}-{e1 - 1}",
                        "space the LMCache port bases apart (one port per TP rank and decode instance)",
                    )
    if spec.kv_transfer.kind == "shared-storage" and spec.router.kind == "vllm-router":
        out.add(("router", "kind"), "vllm-router cannot drive the shared-storage connector", "use router kind builtin")
    if isinstance(kv, NixlTransfer) and kv.ucx_net_devices != "auto" and "all" in kv.ucx_net_devices:
        out.add(
            ("kv_transfer", "ucx_net_devices"),
            "UCX_NET_DEVICES=all picks up management NICs and fails",
            "list the GPU-affine devices (mlx5_N:1) or use auto",
        )


def _quantization(spec: ClusterSpec, out: IssueList) -> None:
    if spec.model.quantization is not Quantization.NVFP4:
        return
    default = is_blackwell(spec.hardware.gpu, spec.hardware.arch)
    for h in spec.hosts:
        bw = is_blackwell(h.gpu) if h.gpu is not None else default
        if bw is False:
            gpu = h.gpu or spec.hardware.gpu or spec.hardware.arch or "?"
            out.add(
                ("model", "quantization"),
                f"NVFP4 (modelopt_fp4) needs Blackwell GPUs, but host {h.name} has {gpu}",
                "use an FP8 checkpoint (quantization: fp8) on Hopper, or Blackwell hosts",
            )
            return


def _router(spec: ClusterSpec, out: IssueList) -> None:
    names = {h.name for h in spec.hosts}
    if spec.router.host is not None and spec.router.host not in names:
        out.add(
            ("router", "host"),
            f"router host {spec.router.host!r} is not a declared host",
            f"declared hosts: {', '.join(sorted(names))}",
        )
    if spec.router.metrics_port is not None and spec.router.metrics_port == spec.router.port:
        out.add(
            ("router", "metrics_port"),
            f"metrics_port {spec.router.metrics_port} is the router's own port",
            "pick another port",
        )


def _gpu_pins(spec: ClusterSpec, out: IssueList) -> None:
    """A GPU pinned to both pools on a host they share would be given to two instances."""
    p, d = spec.prefill.hosts, spec.decode.hosts
    if not p.gpus or not d.gpus:
        return
    p_hosts = set(p.names) or {h.name for h in spec.hosts}
    d_hosts = set(d.names) or {h.name for h in spec.hosts}
    shared_hosts = sorted(p_hosts & d_hosts)
    common = sorted(set(p.gpus) & set(d.gpus))
    if shared_hosts and common:
        out.add(
            ("decode", "hosts", "gpus"),
            f"GPU {common[0]} of host {shared_hosts[0]} is given to both prefill and decode",
            "give each pool its own GPU indices on a shared host",
        )
    for role, sel in ((Role.PREFILL, p), (Role.DECODE, d)):
        if len(set(sel.gpus)) != len(sel.gpus):
            out.add((role.value, "hosts", "gpus"), "a GPU index is listed twice")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


def _successor(spec: ClusterSpec, out: IssueList) -> None:
    """Walltime chaining must hand over before the job's own shutdown signal can arrive (Slurm sends
    `--signal=B:TERM@<grace>` up to 60 s early): else the old job stops before its successor serves."""
    t = spec.target
    if not isinstance(t, SlurmTarget) or not t.successor.enabled:
        return
    limit = st.time_limit_s(t.time_limit)
    if st.hands_over_in_time(limit, t.successor.lead_minutes):
        return
    after = st.successor_after_s(limit, t.successor.lead_minutes)
    stop = st.earliest_stop_s(limit)
    lead = st.min_lead_minutes(limit)
    if st.hands_over_in_time(limit, lead):
        hint = f"set lead_minutes to at least {lead}"
    else:
        hint = "a longer time_limit: the successor is never submitted sooner than 60 s after the job starts"
    out.add(
        ("target", "successor", "lead_minutes"),
        f"the successor would be submitted {after} s after the job starts and take over {st.HANDOVER_S} s later, "
        f"but the job's shutdown signal (--signal=B:TERM@{st.grace_s(limit)}) may come as early as {stop} s "
        f"(Slurm sends it up to {st.SIGNAL_EARLY_S} s early): the job would stop before its successor serves",
        hint,
    )
