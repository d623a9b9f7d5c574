"""Why no layout was recommended, as an error with its own exit code (docs/sizing.md, "Exit codes").

* 3 does not fit: no layout holds the weights plus the KV cache of one ISL+OSL sequence;
* 5 load beyond capacity: the SLA is met without the requested --rate / --concurrency, but
  not with it; the message names the capacity;
* 4 SLA unreachable: not even an idle deployment meets it; the message gives the best TTFT and
  TPOT any layout reaches.
"""

from __future__ import annotations

from dataclasses import replace

from disaggctl.sizing.errors import CapacityError, DoesNotFitError, SlaUnreachableError
from disaggctl.sizing.plan import Problem
from disaggctl.sizing.search import Result, floors, min_fit, search


def _fleet(problem: Problem) -> str:
    return " + ".join(f"{p.gpus} x {p.gpu.key}" for p in problem.pools)


def check_outcome(problem: Problem, result: Result) -> None:
    """Return when a layout is recommended; raise the matching error otherwise."""
    if result.best is not None:
        return
    wl = problem.workload
    if problem.rate is not None or problem.concurrency is not None:
        result = _check_capacity(problem)
    if not result.candidates:
        w, kv, usable = min_fit(problem)
        raise DoesNotFitError(
            f"does not fit: {problem.model.name} needs {w:.0f} GB of weights plus {kv:.1f} GB of KV cache for one "
            f"{wl.isl + wl.osl}-token sequence, and no layout of {_fleet(problem)} ({usable:.0f} GB usable per "
            "GPU) holds them; add GPUs or allow a smaller --quantization")
    ttft, tpot = floors(problem)
    sla = problem.sla
    itl = f", ITL <= {sla.itl_ms:g} ms" if sla.itl_ms else ""
    raise SlaUnreachableError(
        f"SLA unreachable: no layout of {_fleet(problem)} meets TTFT <= {sla.ttft_ms:g} ms (p{sla.percentile:g}), "
        f"TPOT <= {sla.tpot_ms:g} ms{itl}; the best achievable for one {wl.isl}-token prompt is TTFT {ttft:.0f} ms "
        f"and TPOT {tpot:.1f} ms (each on its best layout, without load)")


def _check_capacity(problem: Problem) -> Result:
    """Raise CapacityError when the SLA is met without the requested load; else the unloaded result."""
    free = search(replace(problem, rate=None, concurrency=None))
    cap = free.best
    if cap is None:
        return free
    where = f"{cap.mode} {cap.layout}, {cap.weights}/{cap.kv_dtype}"
    if problem.rate is not None:
        raise CapacityError(
            f"load beyond capacity: --rate {problem.rate:g} req/s, but {_fleet(problem)} serve at most "
            f"{cap.request_rate:.2f} req/s within the SLA ({where})")
    clients = cap.request_rate * (cap.ttft_ms + problem.workload.osl * cap.tpot_ms) / 1000
    raise CapacityError(
        f"load beyond capacity: --concurrency {problem.concurrency}, but {_fleet(problem)} keep the SLA up to about "
        f"{clients:.0f} concurrent clients ({cap.request_rate:.2f} req/s, {where}); beyond that the KV cache "
        "or the SLA runs out")
