"""Health gates shared by every target: wait for `/health`, then one canary request end to end.

    wait_healthy   poll each instance's /health until all answer 200 (or a process dies, or time runs out)
    run_canary     one /v1/completions through the router; decode's metrics must show that the KV came
                   from prefill (external KV transfer) and that decode did not recompute the prompt
    run_pair_canary  one request through a named prefill and a named decode instance, proven by decode's
                   own answer for that request (see below): holds with live traffic running
    kv_received    the KV-transfer counter from a vLLM Prometheus text

Stdlib HTTP only (urllib): this runs in the CLI and must stay light. Clocks and sleeps are
injected so tests never wait for real time.

Metric names, from vLLM 0.32 (`vllm/v1/metrics/loggers.py`, `stats.py`):
  vllm:prompt_tokens_by_source_total{source="local_compute"|"local_cache_hit"|"external_kv_transfer"}
  vllm:external_prefix_cache_hits_total   tokens a KV connector supplied
Both count the same tokens (the connector's external hits); `kv_received` takes the larger so it
works whichever one a build exports, without counting a token twice.

Per-request evidence (the pair canary), from vLLM 0.32's own code: decode's answer carries
`usage.prompt_tokens_details.cached_tokens` when it runs with `--enable-prompt-tokens-details`
(`entrypoints/openai/completion/serving.py`); it is the request's `PrefillStats.num_cached_tokens`
= local prefix-cache hits + tokens the connector loaded, set when the request is first scheduled
(`v1/core/sched/scheduler.py`, `v1/metrics/stats.py PrefillStats.set`). A KV load that fails
and is recomputed goes through that first lookup again with no external tokens, so it shows 0.
The canary's prompt starts with its own request id, so no local prefix-cache block can match:
cached tokens on decode are this request's KV from prefill. One catch: for NIXL, decode replaces
that count by `kv_transfer_params["remote_prefill_cached_tokens"]` (prefill's own hits,
`v1/engine/output_processor.py`), which the canary therefore leaves out of what it hands decode.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from disaggctl.errors import DisaggError

Clock = Callable[[], float]
Sleep = Callable[[float], None]
# probe(url, timeout_s) -> (healthy, detail)
Probe = Callable[[str, float], tuple[bool, str]]
# request(method, url, body, timeout_s, headers) -> (status, body); raises OSError when no answer
Request = Callable[[str, str, bytes | None, float, Mapping[str, str]], tuple[int, bytes]]

PROMPT_BY_SOURCE = "vllm:prompt_tokens_by_source_total"
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"


class HealthError(DisaggError):
    """An instance never became healthy, its process died, or the canary failed."""

    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        self.detail = detail
        super().__init__(f"{name}: {detail}")


class HttpStatusError(HealthError):
    """A canary call answered with an HTTP error status (kept for callers that judge by it)."""

    def __init__(self, name: str, detail: str, status: int) -> None:
        self.status = status
        super().__init__(name, detail)


@dataclass(frozen=True)
class HealthProgress:
    """One observation of one target while waiting (for progress displays)."""

    name: str
    healthy: bool
    elapsed_s: float
    detail: str  # "200 OK", "connection refused", ...


# --------------------------------------------------------------------------- /health


def http_probe(url: str, timeout_s: float) -> tuple[bool, str]:
    """GET url; healthy on HTTP 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200, f"{r.status}"
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return False, str(reason)


def wait_healthy(
    targets: Mapping[str, str],
    timeout_s: float,
    interval_s: float,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    alive: Callable[[str], bool] | None = None,
    on_progress: Callable[[HealthProgress], None] | None = None,
    probe: Probe = http_probe,
) -> dict[str, float]:
    """Poll every target (name -> /health URL) until each answers 200.

    Returns name -> seconds from the start until it was first healthy. Raises HealthError
    naming the first target that is still unhealthy at `timeout_s`, or whose process `alive`
    reports dead (checked before each probe, so a crash is reported at once, not at timeout).
    """
    start = clock()
    ready: dict[str, float] = {}
    last: dict[str, str] = {name: "not checked yet" for name in targets}
    while True:
        for name, url in targets.items():
            if name in ready:
                continue
            if alive is not None and not alive(name):
                raise HealthError(name, f"process exited before {url} answered (last: {last[name]})")
            per_try = max(0.5, min(5.0, interval_s * 2))
            ok, detail = probe(url, per_try)
            last[name] = detail
            elapsed = clock() - start
            if ok:
                ready[name] = elapsed
            if on_progress is not None:
                on_progress(HealthProgress(name, ok, elapsed, detail))
        if len(ready) == len(targets):
            return ready
        if clock() - start >= timeout_s:
            name = next(n for n in targets if n not in ready)
            raise HealthError(name, f"{targets[name]} not healthy after {timeout_s:g} s (last: {last[name]})")
        sleep(interval_s)


# --------------------------------------------------------------------------- metrics


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value); comments skipped."""
    out: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        out.append((m.group(1), labels, value))
    return out


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of every sample `name` whose labels include `labels` (all engines, all models)."""
    total = 0.0
    for n, lab, v in parse_metrics(text):
        if n == name and all(lab.get(k) == want for k, want in labels.items()):
            total += v
    return total


def kv_received(metrics_text: str) -> float:
    """Prompt tokens whose KV this instance loaded from elsewhere (a KV connector), cumulative."""
    by_source = metric_sum(metrics_text, PROMPT_BY_SOURCE, source="external_kv_transfer")
    hits = metric_sum(metrics_text, EXTERNAL_HITS)
    return max(by_source, hits)


def computed_locally(metrics_text: str) -> float:
    """Prompt tokens this instance prefilled itself (no cache, no connector), cumulative."""
    return metric_sum(metrics_text, PROMPT_BY_SOURCE, source="local_compute")


# --------------------------------------------------------------------------- canary


@dataclass(frozen=True)
class CanaryResult:
    """What the canary request saw. Token counts are deltas over all decode instances."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    kv_tokens: float  # prompt tokens decode received from prefill
    computed_tokens: float  # prompt tokens decode prefilled itself
    request_id: str
    # "metrics": deltas of decode's global counters (live traffic blurs them); "request": decode's
    # answer for this very request (the pair canary)
    evidence: str = "metrics"
    through: PairTarget | None = None  # the pair canary's instances
    # failed KV pulls before this answer (the pair canary retries those, see run_pair_canary)
    failed_pulls: tuple[str, ...] = ()

    @property
    def kv_transferred(self) -> bool:
        return self.kv_tokens > 0

    @property
    def recomputed(self) -> bool:
        """Decode prefilled the prompt itself instead of loading prefill's KV.

        With NIXL decode still computes the last prompt token; with the shared-storage
        connector it computes the tail after the last full block: both are far fewer than
        the tokens it loaded, which is what "no recompute" means here.
        """
        return self.kv_tokens <= 0 or self.computed_tokens > self.kv_tokens


def urllib_request(
    method: str, url: str, body: bytes | None, timeout_s: float, headers: Mapping[str, str]
) -> tuple[int, bytes]:
    """The default transport: an HTTP request from this machine (an HTTP error status is an answer)."""
    req = urllib.request.Request(url, data=body, headers=dict(headers), method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            data: bytes = r.read()
            return r.status, data
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _get(url: str, timeout_s: float, request: Request = urllib_request) -> str:
    status, body = request("GET", url, None, timeout_s, {})
    if status != 200:
        raise OSError(f"HTTP {status}")
    return body.decode()


def _metrics(urls: list[str], timeout_s: float, request: Request = urllib_request) -> tuple[float, float, float]:
    """(kv received, computed locally, local prefix-cache hits) summed over `urls`."""
    kv = computed = cached = 0.0
    for url in urls:
        try:
            text = _get(url, timeout_s, request)
        except (urllib.error.URLError, OSError) as e:
            raise HealthError("canary", f"cannot read decode metrics at {url}: {e}") from e
        kv += kv_received(text)
        computed += computed_locally(text)
        cached += metric_sum(text, PROMPT_BY_SOURCE, source="local_cache_hit")
    return kv, computed, cached


def _post_json(
    url: str, body: dict[str, object], timeout_s: float, request_id: str, request: Request = urllib_request
) -> dict[str, object]:
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    try:
        status, raw = request("POST", url, json.dumps(body).encode(), timeout_s, headers)
    except (urllib.error.URLError, OSError) as e:
        raise HealthError("canary", f"POST {url} failed: {getattr(e, 'reason', e)}") from e
    if status != 200:
        detail = raw.decode(errors="replace")[:500]
        raise HttpStatusError("canary", f"POST {url} answered HTTP {status}: {detail}", status)
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise HealthError("canary", f"POST {url} returned no JSON: {raw[:200]!r}") from e
    if not isinstance(data, dict):
        raise HealthError("canary", f"POST {url} returned {type(data).__name__}, not an object")
    return data


def _token_count(
    base_url: str, model: str, text: str, timeout_s: float, request: Request = urllib_request
) -> int | None:
    try:
        body: dict[str, object] = {"model": model, "prompt": text}
        data = _post_json(base_url + "/tokenize", body, timeout_s, "disaggctl-tokenize", request)
    except HealthError:
        return None
    count = data.get("count")
    return count if isinstance(count, int) else None


def _steer_clear(
    base_url: str, model: str, text: str, block_size: int, timeout_s: float, request: Request = urllib_request
) -> str:
    for _ in range(4):
        n = _token_count(base_url, model, text, timeout_s, request)
        if n is None or n % block_size != 1:
            return text
        text += " fox"
    return text


def run_canary(
    router_url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    decode_metrics_urls: list[str],
    timeout_s: float,
    require_kv_transfer: bool = True,
    *,
    unique: bool = True,
    block_size: int | None = None,
    settle_s: float = 5.0,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    request: Request = urllib_request,
) -> CanaryResult:
    """Send one completion through the router and check decode's metrics around it.

    `unique` puts a fresh tag in front of the prompt: a prompt decode has seen before would be
    served from its own prefix cache and show no transfer on the second apply.
    Raises HealthError when the request fails or returns no text, and, when
    `require_kv_transfer`, when decode did not receive the KV or recomputed the prompt.
    Metrics are re-read for up to `settle_s` because vLLM may count a request's tokens just
    after the response is sent.

    `block_size` (pass it for the shared-storage connector): vLLM's ExampleConnector stores a
    prompt of n tokens under its first (n-1)//B*B tokens but looks it up under (n-2)//B*B, so a
    prompt of k*B+1 tokens is never found; the prompt is then lengthened by a word (its length
    is asked from the first decode instance's /tokenize).

    `request` is the HTTP transport of every call (default: from this machine; the systemd
    target passes one through its SSH connections).
    """
    request_id = f"disaggctl-canary-{uuid.uuid4().hex[:12]}"
    text_in = f"[{request_id}] {prompt}" if unique else prompt
    if block_size and decode_metrics_urls:
        text_in = _steer_clear(
            decode_metrics_urls[0].rsplit("/", 1)[0], model, text_in, block_size, timeout_s, request
        )
    kv0, comp0, cache0 = _metrics(decode_metrics_urls, timeout_s, request)
    url = router_url.rstrip("/") + "/v1/completions"
    body: dict[str, object] = {
        "model": model,
        "prompt": text_in,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 0,
        "stream": False,
    }
    t0 = clock()
    data = _post_json(url, body, timeout_s, request_id, request)
    latency = clock() - t0
    text, prompt_tokens, completion_tokens = _answer(data, "canary")

    kv, comp = _settled(decode_metrics_urls, timeout_s, (kv0, comp0, cache0), prompt_tokens, clock() + settle_s,
                        clock, sleep, request)  # fmt: skip
    result = CanaryResult(text, prompt_tokens, completion_tokens, latency, kv, comp, request_id)
    if require_kv_transfer:
        _require_transfer(result)
    return result


def _settled(
    urls: list[str],
    timeout_s: float,
    before: tuple[float, float, float],
    prompt_tokens: int,
    deadline: float,
    clock: Clock,
    sleep: Sleep,
    request: Request = urllib_request,
) -> tuple[float, float]:
    """(KV received, computed locally) since `before`, once decode accounted for the whole prompt
    (loaded, computed or cached) or at the deadline."""
    kv0, comp0, cache0 = before
    while True:
        kv1, comp1, cache1 = _metrics(urls, timeout_s, request)
        kv, comp = kv1 - kv0, comp1 - comp0
        if prompt_tokens and kv + comp + (cache1 - cache0) >= prompt_tokens:
            return kv, comp
        if clock() >= deadline:
            return kv, comp
        sleep(0.2)


def _require_transfer(result: CanaryResult) -> None:
    kv, comp, n = result.kv_tokens, result.computed_tokens, result.prompt_tokens
    if not result.kv_transferred:
        raise HealthError(
            "canary",
            f"decode received no KV from prefill ({comp:g} of {n} prompt tokens computed on decode); "
            "check the router's local-prefill threshold and the kv_transfer settings",
        )
    if result.recomputed:
        raise HealthError("canary", f"decode recomputed the prompt: {comp:g} tokens computed locally, {kv:g} received")


# --------------------------------------------------------------------------- the pair canary

# What a router sends prefill for the pull NixlConnector (vLLM 0.32
# `v1/nixl/base_scheduler.py`: do_remote_decode makes prefill keep the blocks for decode).
NIXL_PREFILL_PARAMS: dict[str, object] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
PAIR_CANARY_KINDS = ("nixl", "shared-storage")


def cached_tokens(answer: dict[str, object]) -> int | None:
    """`usage.prompt_tokens_details.cached_tokens` of one answer (None: the engine does not report it)."""
    usage = answer.get("usage")
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return value if isinstance(value, int) else None


@dataclass(frozen=True)
class PairTarget:
    """The two instances one pair canary goes through, by name and base URL."""

    prefill: str
    prefill_url: str
    decode: str
    decode_url: str


def _prefill_step(
    pair: PairTarget,
    kv_kind: str,
    body: dict[str, object],
    timeout_s: float,
    rid: str,
    request: Request = urllib_request,
) -> object:
    """Prefill the canary's prompt on `pair.prefill`; for NIXL the KV handle it keeps for decode."""
    pbody = dict(body, max_tokens=1)
    if kv_kind == "nixl":
        pbody["kv_transfer_params"] = dict(NIXL_PREFILL_PARAMS)
    try:
        data = _post_json(pair.prefill_url.rstrip("/") + "/v1/completions", pbody, timeout_s, rid, request)
    except HealthError as e:
        raise HealthError(pair.prefill, f"canary prefill: {e.detail}") from e
    if kv_kind != "nixl":
        return None
    ktp = data.get("kv_transfer_params")
    if not isinstance(ktp, dict) or not ktp.get("remote_block_ids"):
        raise HealthError(
            pair.prefill,
            f"prefill kept no KV for the canary request {rid} (kv_transfer_params: {json.dumps(ktp)[:200]}); "
            "is it started as a kv_producer?",
        )
    # decode would report prefill's own prefix-cache hits instead of what it loaded (see the top)
    return {k: v for k, v in ktp.items() if k != "remote_prefill_cached_tokens"}


# vLLM 0.32 handshakes with a prefill engine on decode's first pull from it (nixl/base_worker.py
# `_nixl_handshake`: a zmq REQ with a 5 s receive timeout); a failed handshake fails the requests
# waiting on it (HTTP 500, kv_load_failure_policy "fail") and the next request handshakes again.
# So right after a restart the first pull can fail while every later one works: the pair canary
# tries that many pulls before it judges the pair, and reports the failed ones.
PAIR_CANARY_PULLS = 3


def run_pair_canary(
    pair: PairTarget,
    model: str,
    prompt: str,
    max_tokens: int,
    kv_kind: str,
    timeout_s: float,
    require_kv_transfer: bool = True,
    *,
    block_size: int | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
    request: Request = urllib_request,
) -> CanaryResult:
    """One request through `pair.prefill` then `pair.decode`, proven by decode's answer for it.

    Needs decode started with `--enable-prompt-tokens-details` (compile adds it). Raises
    HealthError naming the instance that failed: prefill kept no KV, decode answered nothing,
    or (with `require_kv_transfer`) decode loaded nothing for this request or recomputed it.
    With NIXL a decode that answers 5xx (a failed KV pull: the first pull after a restart
    handshakes) is tried again with a new request, up to PAIR_CANARY_PULLS pulls within
    `timeout_s`; the failed pulls are kept in the result (`failed_pulls`).
    """
    if kv_kind not in PAIR_CANARY_KINDS:
        raise DisaggError(f"the pair canary supports {', '.join(PAIR_CANARY_KINDS)}, not {kv_kind}")
    deadline = clock() + timeout_s
    failed: list[str] = []
    while True:
        try:
            res = _pair_once(pair, model, prompt, max_tokens, kv_kind, timeout_s, require_kv_transfer,
                             block_size, clock, request)  # fmt: skip
            return replace(res, failed_pulls=tuple(failed)) if failed else res
        except HealthError as e:
            cause = e.__cause__
            pulled = isinstance(cause, HttpStatusError) and cause.status >= 500 and e.name == pair.decode
            if kv_kind != "nixl" or not pulled or len(failed) + 1 >= PAIR_CANARY_PULLS or clock() >= deadline:
                if failed:
                    raise HealthError(e.name, f"{e.detail} (and {len(failed)} failed pull(s) before)") from e
                raise
            failed.append(e.detail)
            sleep(0.5)


def _pair_once(
    pair: PairTarget,
    model: str,
    prompt: str,
    max_tokens: int,
    kv_kind: str,
    timeout_s: float,
    require_kv_transfer: bool,
    block_size: int | None,
    clock: Clock,
    request: Request,
) -> CanaryResult:
    rid = f"disaggctl-canary-{uuid.uuid4().hex[:12]}"
    text_in = f"[{rid}] {prompt}"
    if block_size:
        text_in = _steer_clear(pair.decode_url.rstrip("/"), model, text_in, block_size, timeout_s, request)
    body: dict[str, object] = {"model": model, "prompt": text_in, "max_tokens": max_tokens, "temperature": 0,
                               "seed": 0, "stream": False}  # fmt: skip
    t0 = clock()
    ktp = _prefill_step(pair, kv_kind, body, timeout_s, rid, request)
    dbody = dict(body, kv_transfer_params=ktp) if ktp is not None else body
    try:
        data = _post_json(pair.decode_url.rstrip("/") + "/v1/completions", dbody, timeout_s, rid, request)
    except HealthError as e:
        raise HealthError(pair.decode, f"canary decode: {e.detail}") from e
    latency = clock() - t0
    text, prompt_tokens, completion_tokens = _answer(data, pair.decode)
    cached = cached_tokens(data)
    if cached is None:
        raise HealthError(
            pair.decode,
            "its answer has no usage.prompt_tokens_details.cached_tokens: start it with "
            "--enable-prompt-tokens-details (disaggctl compiles it; an older deployment needs an apply)",
        )
    result = CanaryResult(text, prompt_tokens, completion_tokens, latency, float(cached),
                          float(max(0, prompt_tokens - cached)), rid, evidence="request", through=pair)  # fmt: skip
    if require_kv_transfer:
        try:
            _require_transfer(result)
        except HealthError as e:
            raise HealthError(pair.decode, f"canary {rid} via {pair.prefill}: {e.detail}") from e
    return result


def failed_pulls_note(res: CanaryResult) -> str:
    """"; after N failed KV pulls (...)" when the pair canary had to pull again, else ""."""
    if not res.failed_pulls:
        return ""
    return (
        f"; after {len(res.failed_pulls)} failed KV pull(s), the first: {res.failed_pulls[0][:160]} "
        "(vLLM handshakes with a prefill on the first pull after a restart)"
    )


def _answer(data: dict[str, object], who: str) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of a completion answer; HealthError without tokens."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise HealthError(who, f"answered without choices: {json.dumps(data)[:300]}")
    text = str(choices[0].get("text") or "")
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or 0)
    if completion_tokens <= 0 and not text:
        raise HealthError(who, f"answered with no tokens: {json.dumps(data)[:300]}")
    return text, prompt_tokens, completion_tokens
