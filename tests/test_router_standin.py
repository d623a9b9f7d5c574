"""The stand-in engine itself: stdlib only, vLLM-like argv, knobs, deterministic output."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.plugins.standin import STANDIN, Standin, http, post_json
from tests.support import standin_engine as se

SYSTEM_PYTHON = "/usr/bin/python3"


def test_runs_on_plain_system_python_with_vllm_flags(standin: Standin) -> None:
    # -I: isolated (no site-packages, no PYTHONPATH): proves the stand-in needs only the stdlib
    e = standin.engine(
        "decode-0",
        python=SYSTEM_PYTHON,
        isolated=True,
        args=(
            "--served-model-name",
            "tiny",
            "other",
            "--tensor-parallel-size",
            "2",
            "--enforce-eager",
            "--max-model-len",
            "512",
            "--block-size",
            "32",
            "--gpu-memory-utilization",
            "0.9",
        ),
    )
    assert http("GET", e.url + "/health")[0] == 200
    status, _, data = http("GET", e.url + "/v1/models")
    assert status == 200 and b'"other"' in data
    status, out = post_json(e.url + "/v1/completions", {"model": "other", "prompt": "abc", "max_tokens": 2})
    assert status == 200 and len(out["choices"][0]["text"].split()) == 2


def test_isolated_python_import_check() -> None:
    r = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", f"import runpy; runpy.run_path({str(STANDIN)!r}, run_name='standin_check')"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr


def test_vllm_wrapper_starts_the_standin(tmp_path: Path, standin: Standin) -> None:
    wrapper = se.install_wrapper(str(tmp_path / "bin"), SYSTEM_PYTHON)
    assert Path(wrapper).name == "vllm"
    e = standin.engine("decode-0", vllm_bin=wrapper)  # `vllm serve tiny --port ...`
    assert http("GET", e.url + "/health")[0] == 200


def test_generation_is_deterministic_and_split_invariant() -> None:
    ids = se.tokenize_text("hello there, general kenobi")
    full = se.generate(ids, 6)
    first = se.generate(ids, 1)
    assert first == full[:1]
    assert se.generate([*ids, *first], 5) == full[1:]  # LMCache: prompt + first token continues the same


def test_fail_health_and_health_delay_knobs(standin: Standin) -> None:
    sick = standin.engine("d0", args=("--standin-fail-health",))
    assert http("GET", sick.url + "/health")[0] == 503
    late = standin.engine("d1", env={"STANDIN_HEALTH_DELAY_S": "60"})
    assert http("GET", late.url + "/health")[0] == 503


def test_fail_status_and_metrics_names(standin: Standin) -> None:
    e = standin.engine("d0", env={"STANDIN_FAIL_STATUS": "500"})
    status, out = post_json(e.url + "/v1/completions", {"model": "tiny", "prompt": "abc", "max_tokens": 1})
    assert status == 500 and "error" in out
    m = e.metrics()
    for name in (
        'vllm:prompt_tokens_by_source_total{model_name="tiny",engine="0",source="external_kv_transfer"}',
        'vllm:prompt_tokens_by_source_total{model_name="tiny",engine="0",source="local_compute"}',
        'vllm:external_prefix_cache_hits_total{model_name="tiny",engine="0"}',
        'vllm:num_requests_running{model_name="tiny",engine="0"}',
        'vllm:num_requests_waiting{model_name="tiny",engine="0"}',
    ):
        assert name in m


def test_record_file(tmp_path: Path, standin: Standin) -> None:
    rec = tmp_path / "requests.jsonl"
    e = standin.engine("d0", args=("--standin-record", str(rec)))
    post_json(e.url + "/v1/completions", {"model": "tiny", "prompt": "abc", "max_tokens": 1})
    assert '"prompt": "abc"' in rec.read_text()


def test_lmcache_yaml_as_compile_writes_it() -> None:
    import yaml

    cfg = {
        "chunk_size": 256,
        "local_cpu": False,
        "enable_pd": True,
        "pd_role": "receiver",
        "pd_peer_host": "10.0.0.2",
        "pd_peer_init_port": [8300, 8301],
        "pd_peer_alloc_port": [8400, 8401],
        "nixl_backends": ["UCX"],
        "pd_buffer_size": 1073741824,
        "pd_proxy_host": "10.0.0.1",
    }
    for style in (False, None):  # block lists (what compile writes) and flow lists
        assert se.parse_flat_yaml(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=style)) == cfg
