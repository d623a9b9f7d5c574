"""Checks of the input boundary that the schema cannot express: `validate` refuses what `render` would.

`input_checks(spec)` runs with the spec rules on every load (each issue at the field to change):
  - at least one decode instance;
  - Slurm: host addresses are node slots found at run time, so no IPv6 literal and no two hosts
    with one address (render_slurm refuses both);
  - GPU pins (`<pool>.hosts.gpus`) that no selected host has;
  - LMCache P/D: `buffer_size_mb` must hold the KV of one `max_model_len` prompt on one rank.

`desired_checks(loaded, desired)` runs after compile (every command that compiles):
  - local target: vLLM's ZMQ IPC sockets live under VLLM_RPC_BASE_PATH, else TMPDIR
    (`<base>/<uuid4>`, vllm.utils.network_utils.get_open_zmq_ipc_path) and a Unix socket path has
    at most 107 bytes; render/local.py moves them to /tmp/dctl-<uid>-<hash> when the state folder
    is too long, so this refuses only a TMPDIR/VLLM_RPC_BASE_PATH the spec set itself.

`render_check(loaded, desired)` renders for the spec's own target (in memory) and turns a
render-time refusal into a located issue, so `validate` exit 0 means `render` succeeds.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from disaggctl.errors import DisaggError, Issue, IssueList, SpecError
from disaggctl.spec import ClusterSpec, Host, LmcacheTransfer, LocalTarget, Role, SlurmTarget

if TYPE_CHECKING:
    from disaggctl.deployment import DesiredState
    from disaggctl.loader import LoadedSpec

MIB = 1024 * 1024


def input_checks(spec: ClusterSpec) -> list[Issue]:
    out = IssueList()
    if spec.decode.replicas < 1:
        out.add(("decode", "replicas"), "at least one decode instance is needed (got 0)", "set decode.replicas >= 1")
    if isinstance(spec.target, SlurmTarget):
        _slurm_hosts(spec, out)
    _gpu_pins_exist(spec, out)
    _lmcache_buffer(spec, out)
    return out.issues


def _slurm_hosts(spec: ClusterSpec, out: IssueList) -> None:
    seen: dict[str, str] = {}
    for i, h in enumerate(spec.hosts):
        if ":" in h.addr or "[" in h.addr:
            out.add(
                ("hosts", i, "address"),
                f"{h.addr!r}: under Slurm a host is a node slot whose IPv4 address is found at run time",
                "leave address out or give a plain name",
            )
        first = seen.setdefault(h.addr, h.name)
        if first != h.name:
            out.add(
                ("hosts", i, "address"),
                f"hosts {first!r} and {h.name!r} share the address {h.addr!r}; "
                "under Slurm every host is its own node slot",
                "give each host its own name or address",
            )


def _gpu_count(spec: ClusterSpec, h: Host) -> int | None:
    if h.gpus is not None:
        return h.gpus
    if h.topology is None:
        return spec.hardware.gpus_per_host
    return None  # the topology file says; placement checks it


def _gpu_pins_exist(spec: ClusterSpec, out: IssueList) -> None:
    declared = {h.name: h for h in spec.hosts}
    for role in (Role.PREFILL, Role.DECODE):
        sel = spec.pool(role).hosts
        if not sel.gpus:
            continue
        names = [n for n in sel.names if n in declared] or list(declared)
        counts = {n: _gpu_count(spec, declared[n]) for n in names}
        known = {n: c for n, c in counts.items() if c is not None}
        if not known or len(known) != len(counts):
            continue
        most = max(known.values())
        for j, g in enumerate(sel.gpus):
            if g < 0 or g >= most:
                hosts = ", ".join(sorted(known))
                out.add(
                    (role.value, "hosts", "gpus", j),
                    f"GPU index {g} does not exist: the selected hosts ({hosts}) have at most {most} GPUs "
                    f"(indices 0-{most - 1})",
                    "pin GPU indices the hosts have, or fix hosts[].gpus",
                )


def lmcache_kv_bytes_per_token(spec: ClusterSpec) -> float | None:
    """KV bytes per token of one prefill rank: LMCache's kv_shape (lmcache.integration.vllm.utils):
    (layers of the PP stage, 2 (1 with MLA), chunk, max(1, kv_heads // tp), head_size (the MLA latent))."""
    arch = spec.model.resolved_architecture()
    if arch is None:
        return None
    if spec.model.kv_cache_dtype.startswith("fp8"):
        kv_bytes = 1.0
    elif spec.model.kv_cache_dtype == "auto" and spec.model.dtype == "float32":
        kv_bytes = 4.0
    else:
        kv_bytes = 2.0
    pool = spec.prefill
    layers = -(-arch.layers // pool.pipeline_parallel)
    if arch.kv_latent_dim:
        per_layer = float(arch.kv_latent_dim)
    else:
        per_layer = 2.0 * max(1, arch.kv_heads // pool.tensor_parallel) * arch.head_dim
    return layers * per_layer * kv_bytes


def lmcache_buffer_need(spec: ClusterSpec, tokens: int) -> int | None:
    """Bytes of `pd_buffer_size` that hold `tokens` of one rank's KV: LMCache allocates whole chunks."""
    kv = spec.kv_transfer
    per_token = lmcache_kv_bytes_per_token(spec)
    if not isinstance(kv, LmcacheTransfer) or per_token is None:
        return None
    chunks = -(-tokens // kv.chunk_size)
    return int(chunks * kv.chunk_size * per_token)


def _lmcache_buffer(spec: ClusterSpec, out: IssueList) -> None:
    kv = spec.kv_transfer
    if not isinstance(kv, LmcacheTransfer):
        return
    tokens = spec.model.max_model_len or kv.max_prefill_len
    need = lmcache_buffer_need(spec, tokens) if tokens else None
    if tokens is None or need is None:
        return
    if kv.buffer_size_mb * MIB < need:
        need_mib = -(-need // MIB)
        per_token = lmcache_kv_bytes_per_token(spec) or 0
        out.add(
            ("kv_transfer", "buffer_size_mb"),
            f"{kv.buffer_size_mb} MiB cannot hold one {tokens}-token prompt's KV: {per_token:g} bytes per token "
            f"per rank (in chunks of {kv.chunk_size} tokens) need {need_mib} MiB",
            f"set buffer_size_mb >= {need_mib} or lower model.max_model_len",
        )


# --------------------------------------------------------------------------- after compile


def desired_checks(loaded: LoadedSpec, desired: DesiredState) -> None:
    """Raise a located SpecError for what the compiled deployment cannot run."""
    out = IssueList()
    if isinstance(loaded.spec.target, LocalTarget):
        _local_ipc_sockets(loaded.spec, desired, out)
    if out.issues:
        raise loaded.error(out.issues)


def _local_ipc_sockets(spec: ClusterSpec, desired: DesiredState, out: IssueList) -> None:
    """vLLM's IPC sockets go under VLLM_RPC_BASE_PATH, else TMPDIR; render/local.py moves them to a short
    folder when <state>/work/<process>/tmp is too long, so only a user-set TMPDIR/VLLM_RPC_BASE_PATH can fail."""
    import tempfile

    from disaggctl.render.local import UNIX_SOCKET_MAX, ipc_socket_example, proc_spec

    for p in desired.processes:
        if p.role is Role.ROUTER:
            continue
        env = proc_spec(p, desired.config_dir).env
        key = "VLLM_RPC_BASE_PATH" if "VLLM_RPC_BASE_PATH" in env else "TMPDIR"
        base = env.get(key) or tempfile.gettempdir()
        sock = ipc_socket_example(base)
        if len(sock.encode()) > UNIX_SOCKET_MAX:
            over = len(sock.encode()) - UNIX_SOCKET_MAX
            where = _env_field(spec, p.role, key)
            out.add(
                where,
                f"{key}={base} is {over} bytes too long for process {p.name}: vLLM's IPC sockets ({base}/<uuid4>) "
                f"must fit the {UNIX_SOCKET_MAX}-byte Unix socket path limit",
                f"use a folder of at most {len(base.encode()) - over} bytes",
            )
            return


def _env_field(spec: ClusterSpec, role: Role, key: str) -> tuple[str, ...]:
    """Where the spec set `key` for a process of `role` (<pool>.env wins over engine.env), else the state folder."""
    if key in spec.pool(role).env:
        return (role.value, "env", key)
    if key in spec.engine.env:
        return ("engine", "env", key)
    return ("target", "state_dir")


def render_check(loaded: LoadedSpec, desired: DesiredState) -> None:
    """Render in memory for the spec's target; a refusal becomes a located validation error."""
    from disaggctl.render import render

    try:
        render(desired, loaded.spec, None)
    except SpecError:
        raise
    except DisaggError as e:
        raise located_render_error(loaded, e) from None


def located_render_error(loaded: LoadedSpec, e: DisaggError) -> SpecError:
    """A renderer's refusal, located at the field it names (`target.workdir: ...`), else at `target`."""
    text = str(e)
    head = text.split(":", 1)[0]
    path: tuple[str | int, ...] = ("target",)
    if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", head):
        path = tuple(head.split("."))
    return loaded.error([Issue(path, f"render would refuse this: {text}", "change the spec so render accepts it")])
