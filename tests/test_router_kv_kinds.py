"""Shared-storage and LMCache hand-offs through the router, with stand-ins that speak each protocol."""

from __future__ import annotations

import json

from tests.plugins.standin import Standin, free_port, http, metric_sum, post_json

LONG = "The quick brown fox jumps over the lazy dog. " * 4


def external(engine_metrics: dict[str, float]) -> float:
    return metric_sum(engine_metrics, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")


def test_shared_storage_prefills_then_decodes_the_original_body(standin: Standin) -> None:
    p, d, r = standin.pair("shared-storage")
    body = {"model": "tiny", "prompt": LONG, "max_tokens": 4}
    status, via = post_json(r.url + "/v1/completions", body)
    assert status == 200
    [pre] = p.requests()
    [dec] = d.requests()
    assert pre["body"]["max_tokens"] == 1 and "kv_transfer_params" not in pre["body"]
    assert dec["body"] == body
    assert external(d.metrics()) > 0  # the decode found the prompt's KV in the shared folder
    _, direct = post_json(p.url + "/v1/completions", body)
    assert via["choices"][0]["text"] == direct["choices"][0]["text"]


def test_lmcache_flow_tokenizes_sends_disagg_spec_and_waits_for_notification(standin: Standin) -> None:
    p, d, r = standin.pair("lmcache")
    status, via = post_json(
        r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 5}, headers={"X-Request-Id": "lm-1"}
    )
    assert status == 200, via
    [tok] = p.requests("/tokenize")
    assert tok["body"] == {"prompt": LONG}
    [pre] = p.requests("/v1/completions")
    ids = pre["body"]["prompt"]
    assert isinstance(ids, list) and all(isinstance(x, int) for x in ids)
    assert pre["body"]["max_tokens"] == 1 and pre["body"]["stream"] is False
    assert pre["body"]["kv_transfer_params"] == {
        "ret_first_tok": True,
        "disagg_spec": {
            "req_id": "lm-1",
            "receiver_host": "127.0.0.1",
            "receiver_init_port": d.lmcache_init_ports,
            "receiver_alloc_port": d.lmcache_alloc_ports,
        },
    }
    [dec] = d.requests("/v1/completions")
    assert dec["body"]["prompt"][:-1] == ids and len(dec["body"]["prompt"]) == len(ids) + 1
    assert dec["body"]["max_tokens"] == 4 and "kv_transfer_params" not in dec["body"]
    assert external(d.metrics()) == len(ids)  # the pushed prompt: every token but the recomputed last
    _, direct = post_json(d.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 5})
    assert via["choices"][0]["text"] == direct["choices"][0]["text"]
    assert via["usage"]["prompt_tokens"] == len(ids) and via["usage"]["completion_tokens"] == 5
    assert r.metrics()["disaggctl_router_lmcache_notifications_received"] == 1


def test_lmcache_waits_for_one_notification_per_decoder_rank(standin: Standin) -> None:
    proxy = free_port()
    d = standin.engine("decode-0", kv="lmcache", role="kv_consumer", lmcache_ranks=2)
    p = standin.engine("prefill-0", kv="lmcache", role="kv_producer", proxy_port=proxy)
    r = standin.router(
        kv_kind="lmcache", prefill=[p], decode=[d], lmcache_proxy_bind="127.0.0.1", lmcache_proxy_port=proxy
    )
    status, _ = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 3})
    assert status == 200
    assert r.metrics()["disaggctl_router_lmcache_notifications_received"] == 2


def test_lmcache_chat_streaming_is_converted_to_chat_chunks(standin: Standin) -> None:
    p, d, r = standin.pair("lmcache")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": LONG}],
        "max_completion_tokens": 4,
        "stream": True,
    }
    status, hdrs, raw = http("POST", r.url + "/v1/chat/completions", body)
    assert status == 200 and hdrs["Content-Type"].startswith("text/event-stream")
    events = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    _, direct = post_json(d.url + "/v1/chat/completions", dict(body, stream=False))
    assert text == direct["choices"][0]["message"]["content"]
    [tok] = p.requests("/tokenize")
    assert tok["body"]["messages"] == body["messages"]
    [pre] = p.requests("/v1/completions")
    assert "messages" not in pre["body"] and "max_completion_tokens" not in pre["body"]


def test_lmcache_chat_non_streaming(standin: Standin) -> None:
    _, d, r = standin.pair("lmcache")
    body = {"model": "tiny", "messages": [{"role": "user", "content": LONG}], "max_tokens": 3}
    status, via = post_json(r.url + "/v1/chat/completions", body)
    assert status == 200 and via["object"] == "chat.completion"
    _, direct = post_json(d.url + "/v1/chat/completions", body)
    assert via["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]


def test_lmcache_short_prompt_goes_to_decode_without_disagg_spec(standin: Standin) -> None:
    p, d, r = standin.pair("lmcache")
    status, _ = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert status == 200
    assert p.requests() == []
    assert d.requests()[0]["body"] == {"model": "tiny", "prompt": "hi", "max_tokens": 2}


def test_lmcache_max_tokens_one_is_answered_by_prefill(standin: Standin) -> None:
    _p, d, r = standin.pair("lmcache")
    status, via = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 1})
    assert status == 200 and len(via["choices"][0]["text"].split()) == 1
    assert d.requests("/v1/completions") == []


def test_lmcache_missing_notification_is_a_clear_error(standin: Standin) -> None:
    # a prefill with no proxy configured never notifies: the router times out naming the prefill
    d = standin.engine("decode-0", kv="lmcache", role="kv_consumer")
    p = standin.engine("prefill-0", kv="lmcache", role="kv_producer", proxy_port=None)
    r = standin.router(kv_kind="lmcache", prefill=[p], decode=[d], lmcache_notify_timeout_s=2)
    status, out = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 3})
    assert status == 502, out
    assert "prefill-0" in out["error"]["message"] and "notification" in out["error"]["message"]


def test_lmcache_token_id_prompt_skips_tokenize(standin: Standin) -> None:
    p, d, r = standin.pair("lmcache")
    ids = list(range(100, 140))
    status, via = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 3})
    assert status == 200, via
    assert p.requests("/tokenize") == []
    assert p.requests("/v1/completions")[0]["body"]["prompt"] == ids
    _, direct = post_json(d.url + "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 3})
    assert via["choices"][0]["text"] == direct["choices"][0]["text"]
    status, out = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": ["a" * 80, "b" * 80]})
    assert status == 400 and "one string" in out["error"]["message"]
