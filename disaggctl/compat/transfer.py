"""The KV transfer plan and the compatibility report of a placed, compiled deployment.

Transfer time of a typical prompt (workload.isl tokens) over a link is modelled as the bytes
the busiest GPU moves divided by that GPU's link bandwidth (NVLink inside one NVLink domain,
else its scale-out NIC). Decode GPUs each receive their share of the KV (MLA: the whole latent
cache); prefill GPUs each send their share (several decode ranks may read one prefill rank).
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

from disaggctl import distinfo
from disaggctl.compat import fingerprint as fp
from disaggctl.compat.nixl import KvModel, read_sources, tp_ratio
from disaggctl.compat.report import CompatReport, InstanceFingerprint, LinkEstimate, TransferPlan
from disaggctl.compat.spec_rules import kv_model
from disaggctl.deployment import Instance, Placement, Process
from disaggctl.resources import cache_dir, write_cache_json
from disaggctl.spec import ClusterSpec, LocalTarget, Role


def environment_versions(spec: ClusterSpec) -> dict[str, str]:
    """NIXL's and UCX's versions where disaggctl can know them: a local target runs this environment's."""
    if not isinstance(spec.target, LocalTarget):
        return {}
    out: dict[str, str] = {}
    nixl = distinfo.installed_version("nixl")
    if nixl is None:
        return out
    out["nixl"] = nixl
    ucx = _bundled_ucx_version()
    if ucx:
        out["ucx"] = ucx
    return out


@lru_cache(maxsize=1)
def _bundled_ucx_version() -> str | None:
    """The UCX the NIXL wheel bundles (ucp_get_version_string of its libucp), if it loads."""
    for dist in ("nixl_cu12", "nixl_cu13", "nixl"):
        spec = importlib.util.find_spec(dist)
        if spec is None or not spec.origin:
            continue
        libs = sorted(Path(spec.origin).parent.parent.glob(f"{dist}.libs/libucp-*.so*"))
        if not libs:
            continue
        return _cached_ucx_version(libs[0])
    return None


def _ucx_cache_file() -> Path:
    return cache_dir() / "ucx-version.json"


UCX_CACHE_ENTRIES = 16  # libraries remembered (one per environment: several venvs side by side)


def _cached_ucx_version(lib: Path) -> str | None:
    """Loading libucp initialises UCX: ~0.4 s of (mostly system) CPU on every validate/plan of a local NIXL
    spec. Its answer is kept in the user's cache folder per library path (up to UCX_CACHE_ENTRIES, so
    environments side by side do not evict each other), with the library's size and mtime: a reinstalled
    wheel is asked again. The cache is an optimisation only: unreadable or unwritable, it is ignored."""
    try:
        st = lib.stat()
    except OSError:
        return None
    path, stamp = str(lib), f"{st.st_size}:{st.st_mtime_ns}"
    cache = _ucx_cache_file()
    entries: dict[str, dict[str, str]] = {}
    try:
        saved = json.loads(cache.read_text())
        if isinstance(saved, dict) and isinstance(saved.get("libraries"), dict):
            entries = {k: v for k, v in saved["libraries"].items() if isinstance(v, dict)}
        hit = entries.get(path, {})
        if hit.get("stamp") == stamp and isinstance(hit.get("version"), str):
            return str(hit["version"])
    except (OSError, ValueError):
        pass
    version = _load_ucx_version(lib)
    if version is not None:
        entries.pop(path, None)
        entries[path] = {"stamp": stamp, "version": version}  # newest last; the oldest are dropped
        kept = dict(list(entries.items())[-UCX_CACHE_ENTRIES:])
        write_cache_json(cache, {"libraries": kept})
    return version


def _load_ucx_version(lib: Path) -> str | None:
    try:
        fn = ctypes.CDLL(str(lib)).ucp_get_version_string
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    value = fn()
    return value.decode() if isinstance(value, bytes) else None


def fingerprints(spec: ClusterSpec, placement: Placement, processes: list[Process]) -> list[InstanceFingerprint]:
    """One fingerprint per vLLM instance, from its head process's argv."""
    model = kv_model(spec)
    mla = bool(model and model.mla)
    versions = environment_versions(spec)
    heads = {p.instance: p for p in processes if p.role is not Role.ROUTER and p.node_rank == 0}
    out = []
    memo: dict[Any, fp.Factors] = {}
    for inst in placement.instances:
        proc = heads.get(inst.name)
        if proc is None:
            continue
        vllm, extra, digest = fp.factors(proc.argv, inst.head.arch, mla, versions, memo)
        out.append(
            InstanceFingerprint.trusted(
                instance=inst.name,
                role=inst.role.value,
                fingerprint=digest,
                vllm_hash_factors=vllm,
                extra_factors=extra,
            )
        )
    return out


def pinned_backend(spec: ClusterSpec, placement: Placement) -> tuple[str | None, str | None]:
    """(`--attention-backend` for every instance, a note for the plan) when one must be pinned.

    vLLM hashes the attention backend into the NIXL handshake and picks a different default per
    architecture (FLASHINFER on Blackwell, FLASH_ATTN on Hopper), so a mixed pair needs a pin:
    the spec's model.attention_backend, else one both architectures support.
    """
    if spec.model.attention_backend:
        return spec.model.attention_backend, None
    archs = {n.arch for i in placement.instances for n in i.nodes}
    if len(archs) <= 1 or None in archs:
        return None, None
    model = kv_model(spec)
    backend = fp.COMMON_BACKEND[bool(model and model.mla)]
    note = (
        f"prefill and decode run on different GPU architectures ({', '.join(sorted(a for a in archs if a))}): "
        f"pinned --attention-backend {backend} on every instance so the NIXL handshake hashes alike "
        "(set model.attention_backend to choose another)"
    )
    return backend, note


def _domain(inst: Instance) -> str | None:
    domains = {n.nvlink_domain for n in inst.nodes}
    return domains.pop() if len(domains) == 1 else None


def _link_gbs(spec: ClusterSpec, a: Instance, b: Instance, kind: str) -> float | None:
    """GB/s per GPU per direction of the slower side's link (profiles per GPU type)."""
    from disaggctl.sizing.hardware import PROFILE_OF, load_gpu

    rates: list[float] = []
    for inst in (a, b):
        gpu = inst.head.gpu
        if gpu in PROFILE_OF:
            g = load_gpu(gpu)
            rates.append(g.nvlink_gbps if kind == "nvlink" else g.nic_gbps / 8)
            continue
        hw = spec.hardware
        rate = hw.nvlink_gbps if kind == "nvlink" else (hw.nic_gbps / 8 if hw.nic_gbps else None)
        if rate is None:
            return None
        rates.append(rate)
    return min(rates) if rates else None


def _link_classes(
    pre: list[Instance], dec: list[Instance], domains: dict[str, str | None]
) -> tuple[Counter[str], dict[str, tuple[Instance, Instance]]]:
    """Pairs per link kind (same NVLink domain: nvlink, else nic) and one example pair of each.

    Linear in the instances: counted per domain, not per pair (16 NVL72 racks have 20k pairs).
    """
    p_by: dict[str | None, list[Instance]] = {}
    d_by: dict[str | None, list[Instance]] = {}
    for i in pre:
        p_by.setdefault(domains[i.name], []).append(i)
    for i in dec:
        d_by.setdefault(domains[i.name], []).append(i)
    kinds: Counter[str] = Counter()
    example: dict[str, tuple[Instance, Instance]] = {}
    for dom, ps in p_by.items():
        local = d_by.get(dom, []) if dom is not None else []
        if local:
            kinds["nvlink"] += len(ps) * len(local)
            example.setdefault("nvlink", (ps[0], local[0]))
        remote = len(dec) - len(local)
        if remote:
            kinds["nic"] += len(ps) * remote
            other = next(d for d in dec if d not in local)
            example.setdefault("nic", (ps[0], other))
    return kinds, example


def _busiest_gpu_bytes(total: float, p: Instance, d: Instance, model: KvModel) -> float:
    if model.mla:
        sink = total
        source = total * max(1, d.tensor_parallel // p.tensor_parallel) / p.pipeline_parallel
    else:
        sink = total / min(d.tensor_parallel, model.kv_heads)
        source = total / (min(p.tensor_parallel, model.kv_heads) * p.pipeline_parallel)
    return max(sink, source)


def _kv_bytes(spec: ClusterSpec) -> float:
    m = spec.model
    if m.kv_cache_dtype.startswith("fp8"):
        return 1.0
    return 4.0 if m.dtype == "float32" else 2.0


def transfer_plan(spec: ClusterSpec, placement: Placement) -> TransferPlan | None:
    """TP ratio, ranks read, KV bytes and the links between every prefill and decode instance."""
    pre, dec = placement.by_role(Role.PREFILL), placement.by_role(Role.DECODE)
    p_tp, d_tp = spec.prefill.tensor_parallel, spec.decode.tensor_parallel
    ratio = tp_ratio(d_tp, p_tp)
    if not pre or not dec or ratio is None:
        return None
    arch = spec.model.resolved_architecture()
    model = kv_model(spec) or KvModel(kv_heads=max(p_tp, d_tp))
    per_token = arch.kv_bytes_per_token(_kv_bytes(spec)) if arch else None
    isl = spec.workload.isl
    total = per_token * isl if per_token else None
    domains = {i.name: _domain(i) for i in (*pre, *dec)}
    kinds, example = _link_classes(pre, dec, domains)
    links = []
    for kind, (p, d) in sorted(example.items()):
        gbs = _link_gbs(spec, p, d, kind)
        ms = _busiest_gpu_bytes(total, p, d, model) / (gbs * 1e9) * 1e3 if total and gbs else None
        links.append(
            LinkEstimate(
                kind=kind,
                gb_per_s=gbs,
                pairs=kinds[kind],
                example=[p.name, d.name],
                transfer_ms=round(ms, 3) if ms is not None else None,
            )
        )
    return TransferPlan(
        prefill_tp=p_tp,
        decode_tp=d_tp,
        prefill_pp=spec.prefill.pipeline_parallel,
        tp_ratio=ratio,
        reads={str(r): read_sources(r, p_tp, d_tp, model) for r in range(d_tp)},
        kv_bytes_per_token=per_token,
        typical_prompt_tokens=isl,
        typical_prompt_bytes=total,
        links=links,
        domains={k: v or "mixed" for k, v in domains.items()},
    )


def build_report(spec: ClusterSpec, placement: Placement, processes: list[Process]) -> CompatReport:
    return CompatReport(
        kv_transfer=spec.kv_transfer.kind,
        fingerprints=fingerprints(spec, placement, processes),
        transfer=transfer_plan(spec, placement),
    )
