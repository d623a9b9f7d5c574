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


def test_a_failed_nixl_handshake_fails_its_request_and_the_next_request_handshakes_again() -> None:
    # health.PAIR_CANARY_PULLS relies on this: run vLLM's own _ensure_handshake /
    # _background_nixl_handshake with a handshake that times out once (zmq.Again, as on a slow prefill)
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    import zmq
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker  # type: ignore[import-untyped]

    w = object.__new__(base_worker.NixlBaseConnectorWorker)
    calls: list[str] = []

    def handshake(host: str, port: int, *args: object) -> tuple[dict[tuple[int, int], str], float]:
        calls.append(host)
        if len(calls) == 1:
            raise zmq.Again()
        return {(0, 0): "agent"}, 0.0

    failures: list[str] = []
    w.__dict__.update(
        _evict_stale_engines=lambda: None, _handshake_lock=threading.RLock(),  # as its __init__ makes it
        _remote_agents={},
        _handshake_futures={}, _handshake_initiation_executor=ThreadPoolExecutor(1), _nixl_handshake=handshake,
        _engine_clock_offset={}, _engine_last_active={}, _track_remote_engine_replacement=lambda *a: None,
        _log_failure=lambda **kw: failures.append(kw["failure_type"]), _ready_requests=queue.Queue(),
        _failed_recv_reqs=queue.Queue(), xfer_stats=SimpleNamespace(record_failed_handshake=lambda: None),
    )  # fmt: skip
    meta = SimpleNamespace(remote=SimpleNamespace(host="prefill", port=5600), tp_size=1, dcp_size=1, pp_size=1)
    w._background_nixl_handshake("req-1", "engine-p", meta)
    assert w._failed_recv_reqs.get(timeout=10) == "req-1"  # the first request fails (HTTP 500 upstream)
    assert "handshake_failed" in failures and "engine-p" not in w._remote_agents
    w._background_nixl_handshake("req-2", "engine-p", meta)
    assert w._ready_requests.get(timeout=10)[0] == "req-2"  # the next one handshakes again and pulls
    assert len(calls) == 2 and "engine-p" in w._remote_agents
    w._handshake_initiation_executor.shutdown()


def test_the_nixl_handshake_waits_5_s_for_prefill_and_the_lock_is_reentrant() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

    worker = base_worker.NixlBaseConnectorWorker
    assert "sock.setsockopt(zmq.RCVTIMEO, 5000)" in inspect.getsource(worker._nixl_handshake)
    assert "self._handshake_lock = threading.RLock()" in inspect.getsource(worker.__init__)
