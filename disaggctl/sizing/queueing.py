"""Waiting time at an SLA percentile in a pool of servers (docs/sizing.md, "Queueing").

A pool of `c` identical servers (prefill instances, or the prompt side of aggregated
instances) fed by one router is an M/G/c queue. Its waiting-time tail is taken from M/M/c
(Erlang C) and scaled by the Allen-Cunneen factor (1 + cv^2) / 2 for the service-time
variability `cv` (cv = 1: exponential, M/M/c; cv = 0: deterministic, M/D/c).

  P(wait > 0) = C(c, a)                                     (Erlang C, a = c x rho)
  P(W > t)    = C(c, a) x exp(-c (1 - rho) t / s)            (M/M/c, s = service time)
  W_q         = s x ln(C(c, a) / (1 - q)) / (c (1 - rho))    when C(c, a) > 1 - q, else 0
  W_q(M/G/c)  ~ W_q(M/M/c) x (1 + cv^2) / 2                  (Allen-Cunneen)

Sources: Kleinrock, Queueing Systems Vol. 1 (1975), sec. 3.5 (M/M/c, Erlang C and its waiting
time distribution); Allen, Probability, Statistics and Queueing Theory (1990), the
Allen-Cunneen M/G/c approximation; Kingman (1961) for the single-server heavy-traffic case.
"""

from __future__ import annotations

import math

# Squared coefficient of variation of a prompt's service time. Prefill time is near-deterministic
# for a given prompt length; the spread of real prompt lengths (InferenceMAX draws 80-100% of
# the nominal ISL) adds a little. Assumption, not a measurement.
SERVICE_CV2 = 0.25


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in M/M/c with `offered` = lambda / mu Erlangs (< servers).

    Computed with the numerically stable Erlang B recursion B(k) = a B(k-1) / (k + a B(k-1)).
    """
    if offered <= 0:
        return 0.0
    if offered >= servers:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    rho = offered / servers
    return b / (1 - rho + rho * b)


def wait_quantile(servers: int, rho: float, service_s: float, q: float, cv2: float = SERVICE_CV2) -> float:
    """Waiting time (s) at quantile q of a pool of `servers` servers at utilisation rho."""
    if rho <= 0:
        return 0.0
    if rho >= 1:
        return math.inf
    c = max(1, servers)
    p_wait = erlang_c(c, rho * c)
    if p_wait <= 1 - q:
        return 0.0
    mmc = service_s * math.log(p_wait / (1 - q)) / (c * (1 - rho))
    return mmc * (1 + cv2) / 2
