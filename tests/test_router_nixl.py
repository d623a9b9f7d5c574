"""The builtin router's NIXL hand-off, checked against what the stand-in engines received."""

from __future__ import annotations

import json

from tests.plugins.standin import StandinPD, http, metric_sum, post_json

LONG = "The quick brown fox jumps over the lazy dog. " * 4  # ~45 tokens at 4 chars/token


def test_nixl_handoff_passes_kv_transfer_params_and_request_id(standin_pd: StandinPD) -> None:
    p, d, r = standin_pd.prefill, standin_pd.decode, standin_pd.router
    p.reset()
    d.reset()
    status, out = post_json(
        r.url + "/v1/completions",
        {"model": "tiny", "prompt": LONG, "max_tokens": 5},
        headers={"X-Request-Id": "req-abc"},
    )
    assert status == 200, out
    [pre] = p.requests("/v1/completions")
    [dec] = d.requests("/v1/completions")
    # prefill: max_tokens 1, no stream, the NIXL "please keep the KV for remote decode" params
    assert pre["body"]["max_tokens"] == 1
    assert pre["body"]["stream"] is False
    assert pre["body"]["kv_transfer_params"] == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
    # decode: the original body plus exactly what prefill returned, same request id
    ktp = dec["body"]["kv_transfer_params"]
    assert ktp["do_remote_prefill"] is True and ktp["remote_engine_id"]
    assert ktp["remote_block_ids"] and ktp["remote_request_id"]
    assert dec["body"]["max_tokens"] == 5 and dec["body"]["prompt"] == LONG
    assert pre["headers"]["x-request-id"] == dec["headers"]["x-request-id"] == "req-abc"


def test_nixl_output_equals_direct_and_decode_counts_external_kv(standin_pd: StandinPD) -> None:
    d, r = standin_pd.decode, standin_pd.router
    before = metric_sum(d.metrics(), "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    _, via = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG + "x", "max_tokens": 7})
    _, direct = post_json(d.url + "/v1/completions", {"model": "tiny", "prompt": LONG + "x", "max_tokens": 7})
    assert via["choices"][0]["text"] == direct["choices"][0]["text"]
    assert len(via["choices"][0]["text"].split()) == 7
    after = metric_sum(d.metrics(), "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    assert after > before


def test_request_id_generated_when_client_sends_none(standin_pd: StandinPD) -> None:
    p, d, r = standin_pd.prefill, standin_pd.decode, standin_pd.router
    p.reset()
    d.reset()
    status, hdrs, _ = http("POST", r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
    assert status == 200
    rid = p.requests()[0]["headers"]["x-request-id"]
    assert rid and rid == d.requests()[0]["headers"]["x-request-id"] == hdrs["X-Request-Id"]


def test_chat_max_completion_tokens_is_one_on_prefill_and_kept_on_decode(standin_pd: StandinPD) -> None:
    p, d, r = standin_pd.prefill, standin_pd.decode, standin_pd.router
    p.reset()
    d.reset()
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": LONG}],
        "max_completion_tokens": 4,
        "max_tokens": 9,
        "stream_options": {"include_usage": True},
        "min_tokens": 2,
    }
    status, out = post_json(r.url + "/v1/chat/completions", body)
    assert status == 200, out
    [pre] = p.requests("/v1/chat/completions")
    [dec] = d.requests("/v1/chat/completions")
    assert pre["body"]["max_completion_tokens"] == 1 and pre["body"]["max_tokens"] == 1
    assert "stream_options" not in pre["body"] and "min_tokens" not in pre["body"]
    assert dec["body"]["max_completion_tokens"] == 4 and dec["body"]["min_tokens"] == 2
    assert dec["body"]["kv_transfer_params"]["do_remote_prefill"] is True
    assert out["object"] == "chat.completion"
    assert len(out["choices"][0]["message"]["content"].split()) == 4


def sse_texts(raw: bytes, chat: bool) -> list[str]:
    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            ev = json.loads(line[6:])
            for c in ev.get("choices", []):
                out.append(c["delta"].get("content", "") if chat else c["text"])
    return out


def test_streaming_is_passed_through(standin_pd: StandinPD) -> None:
    d, r = standin_pd.decode, standin_pd.router
    body = {"model": "tiny", "prompt": LONG, "max_tokens": 6, "stream": True}
    status, hdrs, raw = http("POST", r.url + "/v1/completions", body)
    assert status == 200 and hdrs["Content-Type"].startswith("text/event-stream")
    _, _, direct = http("POST", d.url + "/v1/completions", body)
    assert raw.rstrip().endswith(b"data: [DONE]")
    assert sse_texts(raw, chat=False) == sse_texts(direct, chat=False)
    assert len(sse_texts(raw, chat=False)) == 6


def test_chat_streaming_is_passed_through(standin_pd: StandinPD) -> None:
    r = standin_pd.router
    body = {"model": "tiny", "messages": [{"role": "user", "content": LONG}], "max_tokens": 3, "stream": True}
    status, _, raw = http("POST", r.url + "/v1/chat/completions", body)
    assert status == 200
    texts = sse_texts(raw, chat=True)
    assert texts[0] == "" and len([t for t in texts if t]) == 3


def test_upstream_4xx_is_passed_to_the_client(standin_pd: StandinPD) -> None:
    status, out = post_json(
        standin_pd.router.url + "/v1/completions", {"model": "no-such-model", "prompt": LONG, "max_tokens": 2}
    )
    assert status == 404 and "no-such-model" in out["error"]["message"]


def test_bad_json_is_a_clear_400(standin_pd: StandinPD) -> None:
    status, _, data = http("POST", standin_pd.router.url + "/v1/completions", None)
    assert status == 400 and b"JSON object" in data
