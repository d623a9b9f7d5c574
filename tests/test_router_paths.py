"""Conditional disaggregation: short prompts and a long prefill queue go straight to decode."""

from __future__ import annotations

import threading
import time

from tests.plugins.standin import Standin, StandinPD, http, metric_sum, parse_metrics, post_json

LONG = "The quick brown fox jumps over the lazy dog. " * 4


def requests_by(r_url: str, path: str, reason: str | None = None) -> float:
    _, _, text = http("GET", r_url + "/metrics")
    m = parse_metrics(text.decode())
    labels = {"path": path} if reason is None else {"path": path, "reason": reason}
    return metric_sum(m, "disaggctl_router_requests_total", **labels)


def test_short_prompt_takes_the_local_path(standin_pd: StandinPD) -> None:
    p, d, r = standin_pd.prefill, standin_pd.decode, standin_pd.router
    p.reset()
    d.reset()
    local0 = requests_by(r.url, "local_prefill", "short_prompt")
    dis0 = requests_by(r.url, "disaggregated")
    status, out = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": "hi there", "max_tokens": 3})
    assert status == 200 and len(out["choices"][0]["text"].split()) == 3
    assert p.requests() == []  # prefill never saw it
    [dec] = d.requests()
    assert "kv_transfer_params" not in dec["body"]
    assert requests_by(r.url, "local_prefill", "short_prompt") == local0 + 1
    assert requests_by(r.url, "disaggregated") == dis0
    post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 3})
    assert requests_by(r.url, "disaggregated") == dis0 + 1


def test_metrics_expose_ttft_errors_and_upstreams(standin_pd: StandinPD) -> None:
    r = standin_pd.router
    post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
    status, hdrs, text = http("GET", r.url + "/metrics")
    assert status == 200 and hdrs["Content-Type"].startswith("text/plain")
    m = parse_metrics(text.decode())
    assert metric_sum(m, "disaggctl_router_ttft_seconds_count", path="disaggregated") >= 1
    assert m['disaggctl_router_ttft_seconds_bucket{path="disaggregated",le="+Inf"}'] >= 1
    assert m['disaggctl_router_upstream_healthy{upstream="decode-0",role="decode"}'] == 1
    assert "# TYPE disaggctl_router_errors_total counter" in text.decode()
    assert "# TYPE disaggctl_router_upstream_failures_total counter" in text.decode()


def test_threshold_zero_always_disaggregates(standin: Standin) -> None:
    p, _d, r = standin.pair("nixl", local_prefill_threshold=0)
    post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert len(p.requests()) == 1
    assert requests_by(r.url, "disaggregated") == 1


def test_full_prefill_queue_sends_new_requests_to_decode(standin: Standin) -> None:
    # prefill holds each request 5 s; with max_prefill_queue 1, a second long prompt must not queue
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer", args=("--standin-latency-ms", "5000"))
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer")
    r = standin.router(kv_kind="nixl", prefill=[p], decode=[d], max_prefill_queue=1)
    results: list[int] = []
    t = threading.Thread(
        target=lambda: results.append(
            post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})[0]
        )
    )
    t.start()
    deadline = time.monotonic() + 10
    while metric_sum(r.metrics(), "disaggctl_router_upstream_in_flight", role="prefill") < 1:
        assert time.monotonic() < deadline, "the first request never reached prefill"
        time.sleep(0.02)
    status, _ = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG + "!", "max_tokens": 2})
    assert status == 200
    assert requests_by(r.url, "local_prefill", "prefill_queue") == 1
    t.join(20)
    assert results == [200]
    assert requests_by(r.url, "disaggregated") == 1
    assert len(p.requests()) == 1 and len(d.requests()) == 2


def test_no_prefill_instances_means_local(standin: Standin) -> None:
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer")
    r = standin.router(kv_kind="nixl", prefill=[], decode=[d])
    status, _ = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
    assert status == 200
    assert requests_by(r.url, "local_prefill", "no_prefill") == 1
