"""The pair canary (health.run_pair_canary): proven by decode's answer for its own request, so
live traffic neither hides a failed canary nor fails a good one. Stand-in engines emulate what
vLLM 0.32 reports per request (usage.prompt_tokens_details.cached_tokens, NIXL's
remote_prefill_cached_tokens override); tests/test_canary_vllm_source.py ties that to vLLM's code."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from disaggctl.health import HealthError, PairTarget, run_canary, run_pair_canary
from tests.plugins.standin import MODEL, Standin, http, post_json

PROMPT = "The quick brown fox jumps over the lazy dog " * 6
DETAILS = ("--enable-prompt-tokens-details",)


def _pair(standin: Standin, kv: str, decode_extra: dict[str, str] | None = None) -> tuple[PairTarget, str]:
    extra = {"shared_storage_path": str(standin.tmp / "kv")} if kv == "shared-storage" else None
    p = standin.engine("prefill-0", kv=kv, role="kv_producer", extra=extra, args=DETAILS)
    d = standin.engine("decode-0", kv=kv, role="kv_consumer", extra=decode_extra or extra, args=DETAILS)
    return PairTarget("prefill-0", p.url, "decode-0", d.url), d.url


@pytest.mark.parametrize("kv", ["nixl", "shared-storage"])
def test_pair_canary_proves_its_own_transfer(standin: Standin, kv: str) -> None:
    pair, _ = _pair(standin, kv)
    res = run_pair_canary(pair, MODEL, PROMPT, 4, kv, 30.0)
    assert res.evidence == "request" and res.through == pair
    assert res.kv_transferred and not res.recomputed
    assert res.kv_tokens == res.prompt_tokens - 1  # decode computes only the last prompt token


def test_recompute_fails_the_canary_even_while_live_traffic_moves_the_metrics(standin: Standin, tmp_path: Path) -> None:
    # decode looks in another folder than prefill writes to: it recomputes the canary's prompt,
    # while a good pair sharing that decode keeps its KV-received counters rising
    pair, decode_url = _pair(standin, "shared-storage", {"shared_storage_path": str(tmp_path / "elsewhere")})
    good = standin.engine("prefill-1", kv="shared-storage", role="kv_producer",
                          extra={"shared_storage_path": str(tmp_path / "elsewhere")}, args=DETAILS)  # fmt: skip
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            body = {"model": MODEL, "prompt": f"live {i} " + PROMPT, "max_tokens": 1}
            post_json(good.url + "/v1/completions", body)
            post_json(decode_url + "/v1/completions", dict(body, max_tokens=2))  # loads from prefill-1
            i += 1

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        # the metrics-based canary is fooled: live traffic's transfers look like the canary's
        fooled = run_canary(pair.prefill_url, MODEL, PROMPT, 4, [decode_url + "/metrics"], 30.0, False)
        assert fooled.kv_tokens > 0
        with pytest.raises(HealthError) as e:
            run_pair_canary(pair, MODEL, PROMPT, 4, "shared-storage", 30.0)
        assert e.value.name == "decode-0" and "received no KV" in str(e.value)
    finally:
        stop.set()
        t.join(10)


def test_live_recompute_traffic_does_not_fail_a_good_canary(standin: Standin) -> None:
    pair, decode_url = _pair(standin, "nixl")
    stop = threading.Event()

    def traffic() -> None:  # requests decode prefills itself: its local_compute counter rises
        while not stop.is_set():
            post_json(decode_url + "/v1/completions", {"model": MODEL, "prompt": PROMPT * 3, "max_tokens": 1})

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        for _ in range(3):
            assert run_pair_canary(pair, MODEL, PROMPT, 4, "nixl", 30.0).kv_transferred
    finally:
        stop.set()
        t.join(10)


def test_prefill_that_keeps_no_kv_is_named(standin: Standin) -> None:
    p = standin.engine("prefill-0", kv="nixl", role="kv_consumer", args=DETAILS)  # wrong role
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer", args=DETAILS)
    with pytest.raises(HealthError) as e:
        run_pair_canary(PairTarget("prefill-0", p.url, "decode-0", d.url), MODEL, PROMPT, 4, "nixl", 30.0)
    assert e.value.name == "prefill-0" and "kept no KV" in str(e.value)


def test_decode_without_prompt_details_says_how_to_fix(standin: Standin) -> None:
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer", args=DETAILS)
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer")
    with pytest.raises(HealthError) as e:
        run_pair_canary(PairTarget("prefill-0", p.url, "decode-0", d.url), MODEL, PROMPT, 4, "nixl", 30.0)
    assert "--enable-prompt-tokens-details" in str(e.value)


def test_every_pair_canary_request_goes_through_the_given_transport(standin: Standin) -> None:
    # the systemd target passes a transport through its SSH connections (bastion-only hosts):
    # the pair canary must not open a connection of its own from this machine
    from collections.abc import Mapping

    from disaggctl.health import urllib_request

    pair, decode_url = _pair(standin, "nixl")
    seen: list[tuple[str, str]] = []

    def request(
        method: str, url: str, body: bytes | None, timeout_s: float, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        seen.append((method, url))
        return urllib_request(method, url, body, timeout_s, headers)

    res = run_pair_canary(pair, MODEL, PROMPT, 4, "nixl", 30.0, block_size=16, request=request)
    assert res.kv_transferred
    assert ("POST", pair.prefill_url + "/v1/completions") in seen
    assert ("POST", decode_url + "/v1/completions") in seen
    assert ("POST", decode_url + "/tokenize") in seen  # block_size: the prompt's length is asked


def _failing_first_pulls(standin: Standin, n: int) -> PairTarget:
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer", args=DETAILS)
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer", args=DETAILS,
                       env={"STANDIN_FAIL_FIRST_PULLS": str(n)})  # fmt: skip
    return PairTarget("prefill-0", p.url, "decode-0", d.url)


def test_a_first_failed_pull_after_a_restart_is_pulled_again_and_reported(standin: Standin) -> None:
    # vLLM's first pull from a prefill handshakes; a failed handshake fails that request only
    from disaggctl.health import PAIR_CANARY_PULLS, failed_pulls_note

    pair = _failing_first_pulls(standin, PAIR_CANARY_PULLS - 1)
    res = run_pair_canary(pair, MODEL, PROMPT, 4, "nixl", 30.0, sleep=lambda s: None)
    assert res.kv_transferred and not res.recomputed
    assert len(res.failed_pulls) == PAIR_CANARY_PULLS - 1
    assert all("HTTP 500" in f for f in res.failed_pulls)
    assert f"after {PAIR_CANARY_PULLS - 1} failed KV pull(s)" in failed_pulls_note(res)


def test_pulls_that_keep_failing_fail_the_canary_naming_decode(standin: Standin) -> None:
    from disaggctl.health import PAIR_CANARY_PULLS

    pair = _failing_first_pulls(standin, PAIR_CANARY_PULLS)
    with pytest.raises(HealthError) as e:
        run_pair_canary(pair, MODEL, PROMPT, 4, "nixl", 30.0, sleep=lambda s: None)
    assert e.value.name == "decode-0" and "HTTP 500" in str(e.value)
    assert f"{PAIR_CANARY_PULLS - 1} failed pull(s) before" in str(e.value)


def test_a_prefill_error_is_not_pulled_again(standin: Standin) -> None:
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer", args=DETAILS, env={"STANDIN_FAIL_STATUS": "500"})
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer", args=DETAILS)
    with pytest.raises(HealthError) as e:
        run_pair_canary(PairTarget("prefill-0", p.url, "decode-0", d.url), MODEL, PROMPT, 4, "nixl", 30.0)
    assert e.value.name == "prefill-0" and "failed pull" not in str(e.value)
    _, _, seen = http("GET", d.url + "/standin/requests", None, None)
    assert [r for r in json.loads(seen) if "completions" in str(r.get("path"))] == []  # decode never asked
