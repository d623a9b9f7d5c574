"""Prometheus text exposition for the router, written by hand (no client library on the hot path).

Counters are plain dict increments keyed by label tuples; rendering happens only on scrape.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict

PREFIX = "disaggctl_router"
# TTFT buckets (seconds): sub-millisecond router overhead up to long prefills
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Labels = tuple[tuple[str, str], ...]


def _fmt(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1


class RouterMetrics:
    def __init__(self) -> None:
        self.requests: dict[Labels, int] = defaultdict(int)  # (endpoint, path, reason)
        self.errors: dict[Labels, int] = defaultdict(int)  # (kind, status)
        self.upstream_failures: dict[Labels, int] = defaultdict(int)  # (upstream, role)
        self.retries: dict[Labels, int] = defaultdict(int)  # (role)
        self.ttft: dict[Labels, Histogram] = {}  # (path)
        self.gauges: dict[str, dict[Labels, float]] = {}  # name -> labels -> value (filled on scrape)
        self.aggregated_fallbacks: dict[Labels, int] = defaultdict(int)  # (role that served it alone)
        self.error_in_200 = 0  # answers sent with status 200 that carry an error object

    def request(self, endpoint: str, path: str, reason: str) -> None:
        self.requests[(("endpoint", endpoint), ("path", path), ("reason", reason))] += 1

    def error(self, kind: str, status: int) -> None:
        self.errors[(("kind", kind), ("status", str(status)))] += 1

    def upstream_failure(self, upstream: str, role: str) -> None:
        self.upstream_failures[(("upstream", upstream), ("role", role))] += 1

    def retry(self, role: str) -> None:
        self.retries[(("role", role),)] += 1

    def aggregated(self, role: str) -> None:
        self.aggregated_fallbacks[(("role", role),)] += 1

    def observe_ttft(self, path: str, seconds: float) -> None:
        key = (("path", path),)
        h = self.ttft.get(key)
        if h is None:
            h = self.ttft[key] = Histogram(TTFT_BUCKETS)
        h.observe(seconds)

    def render(self) -> str:
        out: list[str] = []

        def counter(name: str, help_: str, values: dict[Labels, int]) -> None:
            out.append(f"# HELP {PREFIX}_{name} {help_}")
            out.append(f"# TYPE {PREFIX}_{name} counter")
            for labels, v in sorted(values.items()):
                out.append(f"{PREFIX}_{name}{_fmt(labels)} {v}")

        counter(
            "requests_total", "Generation requests by the path taken (disaggregated or local_prefill).", self.requests
        )
        counter("errors_total", "Requests answered with an error, by kind and HTTP status.", self.errors)
        counter(
            "upstream_failures_total",
            "Failed calls to an upstream (connect error, timeout, 5xx).",
            self.upstream_failures,
        )
        counter("retries_total", "Calls retried on another instance after an upstream failure.", self.retries)
        counter(
            "aggregated_fallback_total",
            "Requests served by one role alone (prefill and decode on one instance) because every instance of "
            "the other role was out (drained, down, failing).",
            self.aggregated_fallbacks,
        )
        counter(
            "error_in_200_total",
            "Answers sent with HTTP 200 that carry an error (a JSON body or an SSE event with an error object).",
            {(): self.error_in_200},
        )
        out.append(f"# HELP {PREFIX}_ttft_seconds Time from request arrival to the first response byte to the client.")
        out.append(f"# TYPE {PREFIX}_ttft_seconds histogram")
        for labels, h in sorted(self.ttft.items()):
            cum = 0
            for le, n in zip(h.buckets, h.counts, strict=False):
                cum += n
                out.append(f"{PREFIX}_ttft_seconds_bucket{_fmt((*labels, ('le', repr(le))))} {cum}")
            out.append(f"{PREFIX}_ttft_seconds_bucket{_fmt((*labels, ('le', '+Inf')))} {h.count}")
            out.append(f"{PREFIX}_ttft_seconds_sum{_fmt(labels)} {h.sum}")
            out.append(f"{PREFIX}_ttft_seconds_count{_fmt(labels)} {h.count}")
        for name, values in self.gauges.items():
            out.append(f"# TYPE {PREFIX}_{name} gauge")
            for labels, v in sorted(values.items()):
                out.append(f"{PREFIX}_{name}{_fmt(labels)} {v}")
        return "\n".join(out) + "\n"
