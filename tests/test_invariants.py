"""status --check invariants (targets/invariants.py) over metrics texts in the formats the pinned
vLLM and the builtin router write (names checked against vLLM's own code in the last test)."""

from __future__ import annotations

import inspect

import pytest

from disaggctl.targets.invariants import NIXL_EXPIRED, NIXL_FAILED, InvariantCheck, Scrape, check_invariants

L = 'engine="0",model_name="tiny"'


def engine(success: float = 0, external: float = 0, local: float = 0, failed: float = 0, expired: float = 0) -> str:
    return f"""\
# TYPE vllm:request_success_total counter
vllm:request_success_total{{{L},finished_reason="length"}} {success}
vllm:prompt_tokens_by_source_total{{{L},source="external_kv_transfer"}} {external}
vllm:prompt_tokens_by_source_total{{{L},source="local_compute"}} {local}
vllm:nixl_num_failed_transfers_total{{{L}}} {failed}
vllm:nixl_num_kv_expired_reqs_total{{{L}}} {expired}
"""


def router(disagg: float, local: float = 0, error_in_200: float | None = 0) -> str:
    text = f"""\
disaggctl_router_requests_total{{endpoint="completions",path="disaggregated",reason="long_prompt"}} {disagg}
disaggctl_router_requests_total{{endpoint="completions",path="local_prefill",reason="short_prompt"}} {local}
"""
    if error_in_200 is not None:
        text += f"disaggctl_router_error_in_200_total {error_in_200}\n"
    return text


FP = {"prefill-0": ("prefill", "aaa"), "decode-0": ("decode", "aaa")}


def checks(
    engines: list[Scrape], router_text: str | None, fps: dict[str, tuple[str, str]] = FP
) -> dict[str, InvariantCheck]:
    return {c.name: c for c in check_invariants(engines, router_text, fps)}


def test_healthy_pd_passes_everything() -> None:
    c = checks([Scrape("prefill-0", "prefill", engine(success=10)), Scrape("decode-0", "decode", engine(10, 870, 10))],
               router(10))  # fmt: skip
    assert {n: v.ok for n, v in c.items()} == dict.fromkeys(c, True), c


def test_decode_only_pd_fails_two_invariants() -> None:
    # the classic silent failure: prefill handles nothing, decode recomputes every prompt
    c = checks([Scrape("prefill-0", "prefill", engine()), Scrape("decode-0", "decode", engine(10, 0, 880))], router(10))
    assert c["prefill_handles_requests"].ok is False and "finished 0" in c["prefill_handles_requests"].detail
    assert c["decode_receives_kv"].ok is False and "recomputes every prompt" in c["decode_receives_kv"].detail


def test_an_idle_prefill_is_named_but_not_fatal() -> None:
    c = checks([Scrape("prefill-0", "prefill", engine(5)), Scrape("prefill-1", "prefill", engine(0)),
                Scrape("decode-0", "decode", engine(5, 400))], router(5))  # fmt: skip
    assert c["prefill_handles_requests"].ok is True and c["prefill_handles_requests"].instances == ["prefill-1"]


def test_no_disaggregated_traffic_yet_is_not_a_failure() -> None:
    c = checks([Scrape("prefill-0", "prefill", engine()), Scrape("decode-0", "decode", engine(3, 0, 30))], router(0, 3))
    assert c["prefill_handles_requests"].ok is True and c["decode_receives_kv"].ok is True


@pytest.mark.parametrize(("failed", "expired"), [(1, 0), (0, 2)])
def test_failed_or_expired_transfers_fail(failed: float, expired: float) -> None:
    c = checks([Scrape("prefill-0", "prefill", engine(5, expired=expired)),
                Scrape("decode-0", "decode", engine(5, 400, failed=failed))], router(5))  # fmt: skip
    assert c["kv_transfer_failures"].ok is False
    assert c["kv_transfer_failures"].instances == (["decode-0"] if failed else ["prefill-0"])


def test_error_in_200_counts_and_unknown_without_the_metric() -> None:
    e = [Scrape("prefill-0", "prefill", engine(5)), Scrape("decode-0", "decode", engine(5, 400))]
    assert checks(e, router(5, error_in_200=2))["error_in_200"].ok is False
    assert checks(e, router(5, error_in_200=None))["error_in_200"].ok is None
    unreadable = checks(e, None)
    assert unreadable["error_in_200"].ok is None and unreadable["prefill_handles_requests"].ok is None


def test_a_fingerprint_that_differs_from_its_partners_fails_and_is_named() -> None:
    fps = {"prefill-0": ("prefill", "aaa"), "prefill-1": ("prefill", "aaa"), "decode-0": ("decode", "aaa"),
           "decode-1": ("decode", "bbb")}  # fmt: skip
    c = checks([], router(0), fps)["fingerprints_match"]
    assert c.ok is False and c.instances == ["decode-1"]


def test_unreadable_engine_metrics_are_unknown_not_ok() -> None:
    c = checks(
        [Scrape("prefill-0", "prefill", None, "refused"), Scrape("decode-0", "decode", None, "refused")], router(4)
    )
    assert c["prefill_handles_requests"].ok is None and c["decode_receives_kv"].ok is None


def test_metric_names_are_vllms() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import stats  # type: ignore[import-untyped]

    src = inspect.getsource(stats.NixlPromMetrics)
    assert f'name="{NIXL_FAILED}"' in src and f'name="{NIXL_EXPIRED}"' in src
