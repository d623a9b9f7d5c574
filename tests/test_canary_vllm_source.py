"""What the pair canary relies on, checked against the installed vLLM 0.32 (not from memory)."""

from __future__ import annotations

import inspect

from vllm.entrypoints.launchers.cli_args import FrontendArgs  # type: ignore[import-untyped]
from vllm.v1.engine import output_processor  # type: ignore[import-untyped]
from vllm.v1.metrics.stats import PrefillStats  # type: ignore[import-untyped]


def test_cached_tokens_are_local_hits_plus_what_the_connector_loaded() -> None:
    s = PrefillStats()
    s.set(num_prompt_tokens=88, num_local_cached_tokens=0, num_external_cached_tokens=87)
    assert s.num_cached_tokens == 87 and s.num_computed_tokens == 1
    s.set(num_prompt_tokens=88, num_local_cached_tokens=0, num_external_cached_tokens=0)  # recomputed
    assert s.num_cached_tokens == 0


def test_the_frontend_flag_exists() -> None:
    assert "enable_prompt_tokens_details" in {f for f in FrontendArgs.__dataclass_fields__}


def test_nixl_decode_reports_prefills_hits_unless_the_canary_strips_them() -> None:
    src = inspect.getsource(output_processor)
    assert 'kv_transfer_params.get("remote_prefill_cached_tokens")' in src
    assert "req_state.num_cached_tokens = req_state.remote_prefill_cached_tokens" in src
