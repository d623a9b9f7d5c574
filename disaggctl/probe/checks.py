"""What is wrong with a probed host: the problems placement avoids unless told not to.

`detect_problems` is pure: a HostTopology (and the GPU count the spec expects) in, a list of
`Problem`s out. Severity "error" means placement refuses the GPU (or host, when `gpu` is None);
"warning" is shown but does not block.
"""

from __future__ import annotations

from collections import defaultdict

from disaggctl.probe.fields import driver_major
from disaggctl.topology import Gpu, HostTopology, Problem
from disaggctl.versions import MIN_BLACKWELL_DRIVER_MAJOR

# Fabric states of a GPU that is not part of a multi-node NVLink fabric at all.
_NO_FABRIC = {"not_supported"}
# Data-center boards (HGX, NVL trays) carry an even number of GPUs; an odd count above one
# almost always means one fell off the bus.
_ODD_COUNT_HINT = "set hosts[].gpus in the spec so the probe can check the exact count"


def _has_nvlink(g: Gpu) -> bool:
    return bool(g.nvlink_peers) or g.nvlink_active > 0


def _gpu_missing(topo: HostTopology, expected: int | None) -> list[Problem]:
    n = len(topo.gpus)
    if expected is not None and n < expected:
        return [Problem(code="gpu_missing", message=f"found {n} of {expected} GPUs the spec expects", severity="error")]
    if expected is None and n > 1 and n % 2 and topo.source != "count":  # "count": the spec's own number
        return [Problem(code="gpu_missing", severity="warning",
                        message=f"found {n} GPUs, an odd count: a GPU may be missing ({_ODD_COUNT_HINT})")]
    return []


def _nvlink(topo: HostTopology) -> list[Problem]:
    gpus = topo.gpus
    linked = [g for g in gpus if _has_nvlink(g)]
    out: list[Problem] = []
    if not linked or len(gpus) < 2:
        return out  # a PCIe-only host (or one GPU): nothing to compare against
    for g in gpus:
        if not _has_nvlink(g):
            down = f" ({len(g.nvlinks)} links, none active)" if g.nvlinks else ""
            out.append(Problem(code="nvlink_down", gpu=g.index, severity="error",
                               message=f"GPU {g.index} has no NVLink to any other GPU{down} while "
                                       f"{len(linked)} GPUs of this host do"))
    most = max((g.nvlink_active for g in gpus), default=0)
    for g in linked:
        if g.nvlinks and 0 < g.nvlink_active < most:
            out.append(Problem(code="nvlink_degraded", gpu=g.index, severity="warning",
                               message=f"GPU {g.index} has {g.nvlink_active} of {len(g.nvlinks)} NVLinks active "
                                       f"(others have {most}): reduced NVLink bandwidth"))
    return out


def _fabric(g: Gpu) -> list[Problem]:
    state, status = g.fabric_state, g.fabric_status
    if state is None or state in _NO_FABRIC:
        return []
    if state != "completed" or (status is not None and status != "success"):
        return [Problem(code="fabric_incomplete", gpu=g.index, severity="error",
                        message=f"GPU {g.index}: NVLink fabric state {state}"
                                f"{f', status {status}' if status else ''} (needs completed/success; "
                                "check nvidia-fabricmanager / the NVL72 partition)")]
    if g.fabric_health in ("unhealthy", "limited_capacity"):
        return [Problem(code="fabric_unhealthy", gpu=g.index, severity="warning",
                        message=f"GPU {g.index}: NVLink fabric health is {g.fabric_health}")]
    return []


def _mixed(topo: HostTopology) -> list[Problem]:
    models: dict[str, list[int]] = defaultdict(list)
    for g in topo.gpus:
        if g.name:
            models[g.name].append(g.index)
    if len(models) < 2:
        return []
    desc = "; ".join(f"{name}: GPU {', '.join(map(str, idx))}" for name, idx in sorted(models.items()))
    # A warning: the host is usable, but one instance must not span two models (placement checks that).
    return [Problem(code="mixed_gpus", severity="warning", message=f"more than one GPU model on this host ({desc})")]


def _driver(topo: HostTopology) -> list[Problem]:
    major = driver_major(topo.driver_version)
    if major is None or major >= MIN_BLACKWELL_DRIVER_MAJOR:
        return []
    if not any(g.is_blackwell for g in topo.gpus):
        return []
    return [Problem(code="driver_old", severity="error",
                    message=f"driver {topo.driver_version} is older than R{MIN_BLACKWELL_DRIVER_MAJOR}, "
                            "the first branch that supports Blackwell GPUs")]


def detect_problems(topo: HostTopology, expected_gpus: int | None = None) -> list[Problem]:
    """Every problem of one host, host-wide ones first, then per GPU in index order."""
    if not topo.gpus:
        why = "; ".join(topo.warnings) if topo.warnings else "the probe found no GPU"
        return [Problem(code="no_gpus", severity="error", message=f"no NVIDIA GPU found ({why})")]
    out = _gpu_missing(topo, expected_gpus) + _driver(topo) + _mixed(topo) + _nvlink(topo)
    for g in topo.gpus:
        out.extend(_fabric(g))
        if g.mig_enabled:
            out.append(Problem(code="mig_enabled", gpu=g.index, severity="error",
                               message=f"GPU {g.index} has MIG mode enabled (vLLM needs whole GPUs: "
                                       f"`nvidia-smi -i {g.index} -mig 0`)"))
        if g.ecc_uncorrected:
            out.append(Problem(code="ecc_uncorrected", gpu=g.index, severity="warning",
                               message=f"GPU {g.index} has {g.ecc_uncorrected} uncorrected ECC errors"))
    return sorted(out, key=lambda p: (p.gpu is not None, p.gpu or 0))
