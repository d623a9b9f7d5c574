"""Upstream pools and the policies that pick one instance per request.

`in_flight` is the router's own count of requests it has open on an instance: it is exact for
this router, costs nothing to read, and is what `least_loaded`, `power_of_two` and the
prefill-queue limit use (no polling of engine metrics on the request path).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from disaggctl.router.config import Policy, Upstream


@dataclass(eq=False, slots=True)
class Instance:
    up: Upstream
    role: str  # "prefill" | "decode"
    in_flight: int = 0
    healthy: bool = True  # optimistic until the first health poll says otherwise
    last_error: str | None = None
    failures: int = field(default=0)
    failed_at: float = -1e9  # time.monotonic() of the last failed call (not health poll)
    draining: bool = False  # taken out of rotation: no new requests, open ones finish
    # NIXL prefill: disaggregated requests whose KV this instance holds until their decode leg ends
    kv_held: int = 0
    # NIXL prefill: the request tasks whose decode leg pulls KV it held (handoff.Handoff.decode_leg),
    # and those of them cancelled because nothing listens at it any more (gone)
    legs: set[asyncio.Task[Any]] = field(default_factory=set)
    cut: set[asyncio.Task[Any]] = field(default_factory=set)

    name: str = field(init=False)
    url: str = field(init=False)  # base URL without a trailing "/"

    def __post_init__(self) -> None:
        self.name = self.up.name
        self.url = self.up.url.rstrip("/")

    def gone(self) -> None:
        """Nothing listens at the instance: stop the decode legs still pulling KV it held."""
        for leg in self.legs:
            if leg not in self.cut:
                self.cut.add(leg)
                leg.cancel()

    @property
    def state(self) -> str:
        """active | draining | drained | down (see docs/router.md "Drain")."""
        if self.draining:
            return "drained" if self.in_flight <= 0 and self.kv_held <= 0 else "draining"
        return "active" if self.healthy else "down"


STATES = ("active", "draining", "drained", "down")


Picker = Callable[[Sequence[Instance]], Instance]


def make_picker(policy: Policy, rng: random.Random | None = None) -> Picker:
    """A function choosing among candidates (never empty). cache_aware has no prefix index here:
    it falls back to least_loaded (documented in docs/router.md)."""
    r = rng or random.Random()
    counter = itertools.count()

    def round_robin(c: Sequence[Instance]) -> Instance:
        return c[next(counter) % len(c)]

    def least_loaded(c: Sequence[Instance]) -> Instance:
        # rotate the start so ties (the common idle case) spread over instances
        start = next(counter) % len(c)
        best = c[start]
        for i in range(1, len(c)):
            cand = c[(start + i) % len(c)]
            if cand.in_flight < best.in_flight:
                best = cand
        return best

    def rand(c: Sequence[Instance]) -> Instance:
        return c[r.randrange(len(c))]

    def power_of_two(c: Sequence[Instance]) -> Instance:
        if len(c) == 1:
            return c[0]
        a, b = r.sample(range(len(c)), 2)
        return c[a] if c[a].in_flight <= c[b].in_flight else c[b]

    pickers: dict[str, Picker] = {
        "round_robin": round_robin,
        "least_loaded": least_loaded,
        "cache_aware": least_loaded,
        "random": rand,
        "power_of_two": power_of_two,
    }
    return pickers[policy]


class Pool:
    def __init__(self, role: str, ups: Sequence[Upstream], policy: Policy, rng: random.Random | None = None) -> None:
        self.role = role
        self.instances = [Instance(u, role) for u in ups]
        self.pick_from = make_picker(policy, rng)

    def pick(self, exclude: Sequence[Instance] = ()) -> Instance | None:
        """Choose among healthy instances not yet tried; if none is healthy, try the untried
        unhealthy ones too (health is polled, so it can be stale)."""
        if not exclude:  # the common case, kept cheap
            healthy = [i for i in self.instances if i.healthy and not i.draining]
            if healthy:
                return self.pick_from(healthy)
        untried = [i for i in self.instances if not i.draining and i not in exclude]
        if not untried:
            return None
        healthy = [i for i in untried if i.healthy]
        return self.pick_from(healthy or untried)

    def min_in_flight(self) -> int:
        healthy = [i.in_flight for i in self.instances if i.healthy and not i.draining]
        return min(healthy) if healthy else 0

    def any_healthy(self) -> bool:
        return any(i.healthy and not i.draining for i in self.instances)

    def out(self, window_s: float) -> bool:
        """Every instance is out of service: drained or draining, or unhealthy after a real call
        failed within `window_s` (a failed health poll alone does not count: it can lag)."""
        now = None
        for i in self.instances:
            if i.draining:
                continue
            if i.healthy:
                return False
            now = time.monotonic() if now is None else now
            if now - i.failed_at >= window_s:
                return False
        return True

    def get(self, name: str) -> Instance | None:
        return next((i for i in self.instances if i.name == name), None)
