"""The one health gate of every target: wait until instances are healthy, until the router sees its
upstreams, then one canary request end to end with the same inputs for every connector.

A target says only where its processes answer (`urls`: process name -> base URL, from the spec
for systemd and local, from the job's state file on Slurm) and, optionally, how to tell a process
died (`alive`) and how HTTP is spoken (`probe`/`fetch` for /health, `request` for the POSTs and
metrics of both canaries, router and pair; default: from this machine). The systemd target passes
all three through its SSH connections (`targets/systemd/access.py`): hosts behind a bastion are
checked the same way.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from disaggctl.health import (
    PAIR_CANARY_KINDS,
    CanaryResult,
    HealthProgress,
    PairTarget,
    Probe,
    Request,
    failed_pulls_note,
    http_probe,
    run_canary,
    run_pair_canary,
    urllib_request,
    wait_healthy,
)

if TYPE_CHECKING:
    from disaggctl.deployment import DesiredState
    from disaggctl.spec import ClusterSpec

# fetch(url, timeout_s) -> body: an HTTP GET (raises OSError/ValueError when it fails)
Fetch = Callable[[str, float], bytes]


def http_fetch(url: str, timeout_s: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        body: bytes = r.read()
        return body


@dataclass(frozen=True)
class CanaryInputs:
    """Everything the canary gets, derived from the spec once for every target."""

    prompt: str
    max_tokens: int
    timeout_s: float
    require_kv_transfer: bool
    block_size: int | None  # shared-storage: steer the prompt clear of the length it cannot find


def canary_inputs(spec: ClusterSpec, desired: DesiredState) -> CanaryInputs:
    h = spec.health
    block = (spec.decode.block_size or 32) if desired.kv_kind == "shared-storage" else None
    return CanaryInputs(h.canary.prompt, h.canary.max_tokens, h.request_timeout_s, h.canary.require_kv_transfer, block)


@dataclass
class HealthGate:
    """wait(names) per start phase, then router_sees_upstreams() and canary(); run() does all three."""

    spec: ClusterSpec
    desired: DesiredState
    urls: Mapping[str, str] = field(default_factory=dict)  # process -> base URL; default: the spec's
    router_url: str = ""  # default: the deployment's
    probe: Probe = http_probe
    fetch: Fetch = http_fetch
    request: Request = urllib_request

    def __post_init__(self) -> None:
        if not self.urls:
            self.urls = {p.name: p.health_url.rsplit("/", 1)[0] for p in self.desired.processes if p.health_url}
        self.router_url = (self.router_url or self.desired.router_url).rstrip("/")

    def health_urls(self, names: Iterable[str] | None = None) -> dict[str, str]:
        wanted = set(self.urls) if names is None else set(names)
        return {n: u.rstrip("/") + "/health" for n, u in self.urls.items() if n in wanted}

    def wait(
        self,
        names: Iterable[str] | None = None,
        alive: Callable[[str], bool] | None = None,
        on_progress: Callable[[HealthProgress], None] | None = None,
    ) -> dict[str, float]:
        """Every named process (default: all) answers /health with 200; HealthError names the first not."""
        h = self.spec.health
        targets = self.health_urls(names)
        if not targets:
            return {}
        return wait_healthy(
            targets, h.startup_timeout_s, h.interval_s, alive=alive, on_progress=on_progress, probe=self.probe
        )

    def router_sees_upstreams(self, timeout_s: float | None = None) -> bool:
        """The builtin router's /health marks every upstream healthy (other routers: True at once).

        The router checks its upstreams on its own interval: right after a restart it may still route
        around an instance (a canary then prefills locally and shows no KV transfer). False at the
        timeout: the canary then reports what it sees.
        """
        if self.spec.router.kind != "builtin":
            return True
        h = self.spec.health
        deadline = time.monotonic() + (min(h.startup_timeout_s, 120.0) if timeout_s is None else timeout_s)
        while True:
            try:
                body = json.loads(self.fetch(self.router_url + "/health", 5.0))
                pools = [*body.get("prefill", []), *body.get("decode", [])]
                if pools and all(i.get("healthy") for i in pools):
                    return True
            except (OSError, ValueError, AttributeError):
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(h.interval_s)

    def decode_metrics(self) -> list[str]:
        decode = {p.name for p in self.desired.processes if p.role.value == "decode"}
        return [u.rstrip("/") + "/metrics" for n, u in self.urls.items() if n in decode]

    def canary(self) -> CanaryResult:
        """One completion through the router, then (NIXL, shared-storage) a pair canary through every
        prefill and every decode instance, each proven by decode's answer for its own request.

        With pair canaries the router's request must be served but its KV is not judged from decode's
        global metrics (live traffic moves them too); LMCache keeps the metrics check.
        """
        c = canary_inputs(self.spec, self.desired)
        per_request = self.desired.kv_kind in PAIR_CANARY_KINDS
        routed = run_canary(
            self.router_url,
            self.desired.model_name,
            c.prompt,
            c.max_tokens,
            self.decode_metrics(),
            c.timeout_s,
            c.require_kv_transfer and not per_request,
            block_size=c.block_size,
            request=self.request,
        )
        if not per_request:
            return routed
        results = [self.pair_canary(p, d) for p, d in self.pairs()]
        return results[0] if results else routed

    def instances(self, role: str) -> list[str]:
        """Instance names of a role that answer HTTP (head processes), in spec order."""
        return [p.name for p in self.desired.processes if p.role.value == role and p.name in self.urls]

    def pairs(self, prefill: list[str] | None = None, decode: list[str] | None = None) -> list[tuple[str, str]]:
        """Pairs that put every named prefill and every named decode through one canary."""
        ps = self.instances("prefill") if prefill is None else prefill
        ds = self.instances("decode") if decode is None else decode
        if not ps or not ds:
            return []
        return [(ps[i % len(ps)], ds[i % len(ds)]) for i in range(max(len(ps), len(ds)))]

    def pair_canary(self, prefill: str, decode: str) -> CanaryResult:
        """One request through `prefill` and `decode` directly (not through the router)."""
        c = canary_inputs(self.spec, self.desired)
        pair = PairTarget(prefill, self.urls[prefill], decode, self.urls[decode])
        return run_pair_canary(pair, self.desired.model_name, c.prompt, c.max_tokens, self.desired.kv_kind,
                               c.timeout_s, c.require_kv_transfer, block_size=c.block_size,
                               request=self.request)  # fmt: skip

    def run(
        self,
        alive: Callable[[str], bool] | None = None,
        on_progress: Callable[[HealthProgress], None] | None = None,
    ) -> CanaryResult:
        self.wait(None, alive, on_progress)
        self.router_sees_upstreams()
        return self.canary()


def canary_summary(res: CanaryResult) -> str:
    """The one line every target prints after a canary."""
    kv = f"decode received the KV of {res.kv_tokens:g} prompt tokens" if res.kv_transferred else "no KV transfer"
    if res.through is not None:
        return (
            f"canary {res.request_id} via {res.through.prefill} -> {res.through.decode}: {res.prompt_tokens} prompt "
            f"tokens -> {res.completion_tokens} tokens {res.text!r} in {res.latency_s:.2f} s ({kv} for this request)"
            + failed_pulls_note(res)
        )
    return (
        f"canary: {res.prompt_tokens} prompt tokens -> {res.completion_tokens} tokens {res.text!r} "
        f"in {res.latency_s:.2f} s ({kv}; {res.kv_tokens:g} prompt tokens received by decode from prefill)"
    )
