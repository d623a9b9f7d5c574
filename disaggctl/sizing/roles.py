"""One role under load: a pool of prefill instances, a decode instance, an aggregated instance.

The formulas are in docs/sizing.md ("Queueing and the SLA percentile"): a pool of instances
behind the router is one M/G/c queue (`queueing.wait_quantile`), so a pool may run at the
utilisation the SLA percentile allows instead of each instance being its own M/M/1 queue.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from disaggctl.sizing.perf import MULTI_ROUND_REUSE, Perf, Shape
from disaggctl.sizing.queueing import wait_quantile

RHO_MAX = 0.95  # never plan a queue fuller than this
MAX_BATCH = 1024  # decode sequences per DP rank the search considers (vLLM max_num_seqs)
_RHO_GRID = tuple(RHO_MAX * i / 48 for i in range(49))  # 0 .. RHO_MAX
INFEASIBLE = (math.inf, math.inf, 0.0, math.inf)


@dataclass(frozen=True)
class Workload:
    isl: int
    osl: int
    multi_round_share: float = 0.0

    @property
    def isl_eff(self) -> int:
        """Prompt tokens that must really be prefilled (earlier rounds' KV is reused)."""
        return max(1, round(self.isl * (1 - MULTI_ROUND_REUSE * self.multi_round_share)))

    @property
    def ctx(self) -> float:
        """Average cached context of a decoding sequence (the average live sequence)."""
        return self.isl + self.osl / 2


def _pow2_at_least(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, n))))


def prefill_budget(isl: int) -> int:
    """max_num_batched_tokens of a prefill instance: a whole prompt per step, 8k..32k."""
    return min(32768, max(8192, _pow2_at_least(isl)))


@dataclass(frozen=True, eq=False)
class PrefillRole:
    shape: Shape
    max_batched_tokens: int
    max_seqs: int
    latency_one: float  # seconds to prefill one prompt alone
    latency_full: float  # seconds for a full step of batched prompts
    service: float  # seconds of instance time per prompt under load
    mu: float  # prompts/s one instance sustains
    _tables: dict[tuple[int, float], list[float]] = field(default_factory=dict, repr=False)

    def latency(self, rho: float, q: float, servers: int = 1) -> float:
        """Prefill latency at quantile q of a pool of `servers` instances at utilisation rho."""
        base = self.latency_one + rho * (self.latency_full - self.latency_one)
        return base + wait_quantile(servers, rho, self.service, q)

    def _table(self, servers: int, q: float) -> list[float]:
        key = (servers, q)
        if key not in self._tables:
            self._tables[key] = [self.latency(r, q, servers) for r in _RHO_GRID]
        return self._tables[key]

    def capacity(self, budget_s: float, q: float, servers: int = 1) -> float:
        """Largest prompts/s a pool of `servers` instances sustains with its q-latency within budget.

        The latency is tabulated on a grid of utilisations and interpolated linearly between the two
        grid points around the budget (the latency is increasing and convex in rho, so the chord is
        above it: the interpolated utilisation keeps the budget).
        """
        table = self._table(servers, q)
        i = bisect.bisect_right(table, budget_s)
        if i == 0:
            return 0.0
        if i == len(table):
            return RHO_MAX * self.mu * servers
        lo_r, lo_l, hi_r, hi_l = _RHO_GRID[i - 1], table[i - 1], _RHO_GRID[i], table[i]
        rho = lo_r + (hi_r - lo_r) * (budget_s - lo_l) / (hi_l - lo_l) if hi_l > lo_l else lo_r
        return rho * self.mu * servers


def prefill_role(perf: Perf, shape: Shape, isl: int) -> PrefillRole:
    m = prefill_budget(isl)
    k = max(1, m // isl)  # prompts batched per step when they are short
    one = perf.prefill_time(shape, isl, 1, m)
    full = perf.prefill_time(shape, isl, k, m)
    service = full / k / (shape.pp * shape.dp)
    return PrefillRole(shape, m, min(256, max(16, 2 * k)), one, full, service, 1 / service)


def max_batch(perf: Perf, shape: Shape, wl: Workload, max_batched_tokens: int) -> int:
    """Largest decode batch per DP rank whose average live sequences (ISL + OSL/2) fit in the KV cache."""
    cap = perf.kv_capacity_tokens(shape, max_batched_tokens, MAX_BATCH)
    return int(min(MAX_BATCH, cap // wl.ctx))


def largest_batch(check: Callable[[float], bool], top: float, lo: float = 0.0) -> float:
    """Largest b in (lo, top] with check(b) true, assuming check is monotone (true, then false); lo if none."""
    if top <= lo:
        return lo
    if check(top):
        return top
    hi = top
    for _ in range(24):
        mid = (lo + hi) / 2
        if check(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo < 0.02 * max(1.0, lo):
            break
    return lo


def agg_point(
    perf: Perf, shape: Shape, chunk: int, wl: Workload, q: float, b: float, servers: int = 1
) -> tuple[float, float, float, float]:
    """(tpot, ttft, requests/s, itl at quantile q) of one aggregated instance, b sequences per DP rank.

    Chunked prefill: keeping b sequences decoding needs p = b x isl / osl prompt tokens per step.
    The scheduler puts waiting prompt tokens into a step up to its room (chunk - b): whole
    prompts when they fit (several short ones share a step), chunks of a longer one otherwise.
    So the steps that carry prompt tokens carry r = min(room, max(isl, p)) of them, a share
    f = p / r of the steps does (f > 1: the batch cannot be kept full) and takes t_mixed(b, r);
    the others take t_decode(b). A new prompt needs ceil(isl / room) such steps and waits in the
    pool of `servers` instances the router spreads prompts over, at utilisation p / room. A sequence holds its slot
    (max_num_seqs) while it is prefilled and while it decodes, so an instance finishes
    b / (prefill + osl x tpot) requests/s per DP rank (Little's law).
    """
    isl = wl.isl_eff
    room = chunk - b
    if room <= 0 or b <= 0:
        return INFEASIBLE
    need = b * isl / wl.osl
    r = min(room, max(isl, need))
    share = need / r
    if share > 1:
        return INFEASIBLE
    full = perf.mixed_step(shape, b, wl.ctx, r, isl)
    plain = perf.decode_step(shape, b, wl.ctx)
    tpot = share * full + (1 - share) * plain
    rho = need / room  # share of the steps' prompt-token room in use: the prompt queue's utilisation
    if rho > RHO_MAX:
        return INFEASIBLE
    service = math.ceil(isl / room) * full
    ttft = service + wait_quantile(servers, rho, service, q)
    itl = full if share > 1 - q else plain
    return tpot, ttft, shape.pp * shape.dp * b / (service + wl.osl * tpot), itl


def disagg_closed_loop(
    perf: Perf, pre: PrefillRole, dshape: Shape, x: int, y: int, clients: float, wl: Workload, q: float,
    t_kv: float,
) -> tuple[float, float, float]:
    """(ttft, tpot, requests/s) of x prefill and y decode instances under `clients` clients.

    Closed loop (Little's law): clients = rate x (ttft + osl x tpot); prefill saturates at x mu.
    `perf` is the decode role's model; `t_kv` the KV transfer time of one prompt.
    """
    tpot = perf.decode_step(dshape, clients / (y * dshape.pp * dshape.dp), wl.ctx)
    rate = clients / (pre.latency_one + t_kv + tpot + wl.osl * tpot)
    rate = min(rate, x * pre.mu * RHO_MAX)
    ttft = max(pre.latency(rate / (x * pre.mu), q, x) + t_kv + tpot, clients / rate - wl.osl * tpot)
    return ttft, tpot, rate
