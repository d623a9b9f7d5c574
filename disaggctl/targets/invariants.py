"""`status --check`: is P/D really happening? Invariants over the engines' and router's metrics.

Pure: the metrics texts (one per vLLM instance, one of the router) and the running instances'
compatibility fingerprints go in; one `InvariantCheck` per invariant comes out. Counters are
cumulative since each process started, so a failure stays visible until the process restarts.

    prefill_handles_requests  the router sent disaggregated requests and the prefill instances
                              finished requests (vllm:request_success_total)
    decode_receives_kv        ... and decode loaded prompt KV from prefill instead of computing
                              it all (vllm:prompt_tokens_by_source_total{source="external_kv_transfer"})
    kv_transfer_failures      no failed or expired NIXL transfers (vllm:nixl_num_failed_transfers,
                              vllm:nixl_num_kv_expired_reqs; vLLM 0.32 nixl/stats.py NixlPromMetrics)
    error_in_200              the router counted no 200 answers with an error inside
                              (disaggctl_router_error_in_200_total; unknown when not exported)
    fingerprints_match        every running prefill has the compatibility fingerprint of every
                              running decode (docs/compat.md)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from disaggctl.health import kv_received, parse_metrics

ROUTER_REQUESTS = "disaggctl_router_requests_total"
ROUTER_ERROR_IN_200 = "disaggctl_router_error_in_200_total"
REQUEST_SUCCESS = "vllm:request_success"
NIXL_FAILED = "vllm:nixl_num_failed_transfers"
NIXL_EXPIRED = "vllm:nixl_num_kv_expired_reqs"


class InvariantCheck(BaseModel):
    """One invariant of `status --check`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="`prefill_handles_requests`, `decode_receives_kv`, `kv_transfer_failures`, "
                      "`error_in_200` or `fingerprints_match`.")  # fmt: skip
    ok: bool | None = Field(description="Holds; false: violated (status --check exits 1); null: could not be checked.")
    detail: str = Field(description="The numbers behind the verdict.")
    instances: list[str] = Field(default_factory=list, description="The instances it is about, where it names some.")


@dataclass(frozen=True)
class Scrape:
    """One instance's /metrics (text None: unreachable, `error` says why)."""

    name: str
    role: str
    text: str | None
    error: str = ""


def counter(text: str, name: str, **labels: str) -> float | None:
    """Sum of a counter's samples (`name` or `name_total`), None when the text has none."""
    found = False
    total = 0.0
    for n, lab, v in parse_metrics(text):
        if n in (name, name + "_total") and all(lab.get(k) == want for k, want in labels.items()):
            found = True
            total += v
    return total if found else None


def check_invariants(
    engines: list[Scrape], router: str | None, fingerprints: Mapping[str, tuple[str, str]]
) -> list[InvariantCheck]:
    """Every invariant; `fingerprints`: running instance -> (role, fingerprint)."""
    disagg = counter(router, ROUTER_REQUESTS, path="disaggregated") if router is not None else None
    return [
        _prefill_handles(engines, disagg),
        _decode_receives(engines, disagg),
        _transfer_failures(engines),
        _error_in_200(router),
        _fingerprints(fingerprints),
    ]


def _unreadable(engines: list[Scrape], role: str) -> list[str]:
    return [e.name for e in engines if e.role == role and e.text is None]


def _prefill_handles(engines: list[Scrape], disagg: float | None) -> InvariantCheck:
    name = "prefill_handles_requests"
    if disagg is None:
        return InvariantCheck(name=name, ok=None, detail="the router's metrics are unreadable")
    if disagg <= 0:
        return InvariantCheck(name=name, ok=True, detail="the router sent no disaggregated request yet")
    per = {e.name: counter(e.text, REQUEST_SUCCESS) or 0.0 for e in engines if e.role == "prefill" and e.text}
    idle = sorted(n for n, v in per.items() if v <= 0)
    total = sum(per.values())
    detail = f"router sent {disagg:g} disaggregated requests; prefill instances finished {total:g}"
    if idle:
        detail += f" (none on {', '.join(idle)})"
    if not per:
        return InvariantCheck(name=name, ok=None, detail=detail + "; no prefill metrics readable",
                              instances=_unreadable(engines, "prefill"))  # fmt: skip
    return InvariantCheck(name=name, ok=total > 0, detail=detail, instances=idle)


def _decode_receives(engines: list[Scrape], disagg: float | None) -> InvariantCheck:
    name = "decode_receives_kv"
    if disagg is None or disagg <= 0:
        why = "the router's metrics are unreadable" if disagg is None else "no disaggregated request yet"
        return InvariantCheck(name=name, ok=None if disagg is None else True, detail=why)
    per = {e.name: kv_received(e.text) for e in engines if e.role == "decode" and e.text}
    if not per:
        return InvariantCheck(name=name, ok=None, detail="no decode metrics readable",
                              instances=_unreadable(engines, "decode"))  # fmt: skip
    none = sorted(n for n, v in per.items() if v <= 0)
    total = sum(per.values())
    detail = f"decode instances loaded the KV of {total:g} prompt tokens from prefill"
    if total <= 0:
        detail += f" although the router sent {disagg:g} disaggregated requests: decode recomputes every prompt"
    elif none:
        detail += f" (none on {', '.join(none)})"
    return InvariantCheck(name=name, ok=total > 0, detail=detail, instances=none)


def _transfer_failures(engines: list[Scrape]) -> InvariantCheck:
    bad: dict[str, tuple[float, float]] = {}
    for e in engines:
        if e.text is None:
            continue
        failed, expired = counter(e.text, NIXL_FAILED) or 0.0, counter(e.text, NIXL_EXPIRED) or 0.0
        if failed or expired:
            bad[e.name] = (failed, expired)
    if not bad:
        return InvariantCheck(name="kv_transfer_failures", ok=True, detail="no failed or expired KV transfer")
    detail = "; ".join(f"{n}: {f:g} failed, {x:g} expired" for n, (f, x) in sorted(bad.items()))
    return InvariantCheck(name="kv_transfer_failures", ok=False, detail=detail, instances=sorted(bad))


def _error_in_200(router: str | None) -> InvariantCheck:
    name = "error_in_200"
    n = counter(router, ROUTER_ERROR_IN_200) if router is not None else None
    if n is None:
        why = (
            "the router's metrics are unreadable"
            if router is None
            else f"the router does not export {ROUTER_ERROR_IN_200}"
        )
        return InvariantCheck(name=name, ok=None, detail=why)
    return InvariantCheck(name=name, ok=n <= 0, detail=f"{n:g} answers were 200 with an error inside")


def _fingerprints(fps: Mapping[str, tuple[str, str]]) -> InvariantCheck:
    name = "fingerprints_match"
    prefill = {n: f for n, (r, f) in fps.items() if r == "prefill"}
    decode = {n: f for n, (r, f) in fps.items() if r == "decode"}
    if not prefill or not decode:
        return InvariantCheck(name=name, ok=None, detail="no running prefill/decode pair to compare")
    kinds = sorted(set(prefill.values()) | set(decode.values()))
    if len(kinds) == 1:
        return InvariantCheck(name=name, ok=True, detail=f"all {len(fps)} instances have fingerprint {kinds[0][:12]}")
    # the instances that differ from the most common fingerprint are the odd ones out
    common = max(kinds, key=lambda k: sum(1 for f in fps.values() if f[1] == k))
    odd = sorted(n for n, (_, f) in fps.items() if f != common)
    detail = ", ".join(f"{n}: {fps[n][1][:12]}" for n in odd) + f" differ from their partners' {common[:12]}"
    return InvariantCheck(name=name, ok=False, detail=detail, instances=odd)


def scrape_and_check(
    urls: Mapping[str, tuple[str, str]],
    router_metrics_url: str | None,
    fingerprints: Mapping[str, tuple[str, str]],
    fetch: Callable[[str, float], bytes],
) -> list[InvariantCheck]:
    """Read every instance's /metrics (`urls`: instance -> (role, base URL)) and the router's, then check."""
    engines = []
    for name, (role, base) in urls.items():
        try:
            engines.append(Scrape(name, role, fetch(base.rstrip("/") + "/metrics", 5.0).decode(errors="replace")))
        except (OSError, ValueError) as e:
            engines.append(Scrape(name, role, None, str(e)))
    router = None
    if router_metrics_url:
        try:
            router = fetch(router_metrics_url, 5.0).decode(errors="replace")
        except (OSError, ValueError):
            router = None
    return check_invariants(engines, router, fingerprints)
