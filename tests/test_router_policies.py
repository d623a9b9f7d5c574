"""Choosing among several prefill and decode instances."""

from __future__ import annotations

import random
import threading
import time

from disaggctl.router.config import Upstream
from disaggctl.router.policies import Pool
from tests.plugins.standin import Standin, post_json

LONG = "The quick brown fox jumps over the lazy dog. " * 4


def pool(n: int, policy: str) -> Pool:
    p = Pool(
        "decode",
        [Upstream(name=f"d{i}", url=f"http://h{i}") for i in range(n)],
        policy,  # type: ignore[arg-type]
        rng=random.Random(7),
    )
    return p


def test_round_robin_cycles() -> None:
    p = pool(3, "round_robin")
    assert [p.pick().name for _ in range(6)] == ["d0", "d1", "d2", "d0", "d1", "d2"]  # type: ignore[union-attr]


def test_least_loaded_picks_fewest_in_flight_and_spreads_ties() -> None:
    p = pool(3, "least_loaded")
    p.instances[0].in_flight = 5
    p.instances[1].in_flight = 1
    p.instances[2].in_flight = 3
    assert {p.pick().name for _ in range(10)} == {"d1"}  # type: ignore[union-attr]
    for i in p.instances:
        i.in_flight = 0
    assert {p.pick().name for _ in range(9)} == {"d0", "d1", "d2"}  # type: ignore[union-attr]


def test_power_of_two_never_picks_the_busiest_of_two() -> None:
    p = pool(2, "power_of_two")
    p.instances[0].in_flight = 9
    assert {p.pick().name for _ in range(20)} == {"d1"}  # type: ignore[union-attr]


def test_random_and_cache_aware_pick_every_instance() -> None:
    for policy in ("random", "cache_aware"):
        p = pool(3, policy)
        assert {p.pick().name for _ in range(60)} == {"d0", "d1", "d2"}  # type: ignore[union-attr]


def test_unhealthy_and_excluded_instances_are_skipped() -> None:
    p = pool(3, "round_robin")
    p.instances[1].healthy = False
    assert {p.pick().name for _ in range(6)} == {"d0", "d2"}  # type: ignore[union-attr]
    assert p.pick(exclude=[p.instances[0], p.instances[2]]) is p.instances[1]  # stale health: still tried
    assert p.pick(exclude=p.instances) is None


def test_round_robin_spreads_requests_over_two_decodes(standin: Standin) -> None:
    d0 = standin.engine("decode-0", kv="nixl", role="kv_consumer")
    d1 = standin.engine("decode-1", kv="nixl", role="kv_consumer")
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer")
    r = standin.router(kv_kind="nixl", prefill=[p], decode=[d0, d1], decode_policy="round_robin")
    for i in range(6):
        assert (
            post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG + str(i), "max_tokens": 1})[0] == 200
        )
    assert len(d0.requests()) == 3 and len(d1.requests()) == 3
    assert len(p.requests()) == 6


def test_least_loaded_avoids_the_busy_decode(standin: Standin) -> None:
    slow = standin.engine("decode-0", args=("--standin-latency-ms", "60000"))  # held until stopped
    fast = standin.engine("decode-1")
    r = standin.router(kv_kind="nixl", prefill=[], decode=[slow, fast], decode_policy="least_loaded")
    hold = threading.Thread(
        target=lambda: post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1})
    )
    hold.start()
    deadline = time.monotonic() + 10
    while not slow.requests() and not fast.requests():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # ties rotate from the first instance: the held request sits on the slow one
    assert len(slow.requests()) == 1
    for i in range(4):
        post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": f"y{i}", "max_tokens": 1})
    # while one request is open on the slow instance, every new one goes to the idle one
    assert len(slow.requests()) == 1 and len(fast.requests()) == 4
    slow.stop()  # releases the held request (the router retries it on the fast instance)
    hold.join(30)
    assert not hold.is_alive()
