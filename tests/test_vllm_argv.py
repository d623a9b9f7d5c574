"""Every generated `vllm serve` argv is accepted by vLLM 0.32's own parser and engine-config builder.

The tiny offline model stands in for the model argument at the engine-config step (a hub id
cannot be resolved offline); everything else is exactly what disaggctl would run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from disaggctl.compile import compile_spec
from disaggctl.deployment import Process
from disaggctl.loader import load_text
from disaggctl.spec import Role
from tests.plugins.paths import EXAMPLES

pytestmark = pytest.mark.vllm

VARIANTS = {
    "lmcache-offload": """\
name: v1
profiles: [b200, multi-round-qa]
model: {path: meta-llama/Llama-3.1-8B-Instruct, dtype: bfloat16, kv_cache_dtype: fp8, max_model_len: 8192}
hosts: [{name: a, address: 10.0.0.1, gpus: 8}]
prefill: {tensor_parallel: 2, block_size: 32, enable_prefix_caching: true, extra_args: ["--seed", "7"]}
decode: {tensor_parallel: 2, gpu_memory_utilization: 0.85, max_num_seqs: 256}
kv_transfer: {kind: lmcache}
target: {kind: systemd}
""",
    "nixl-dp-ep": """\
name: v2
model: {path: /models/moe, architecture: {layers: 4, hidden_size: 1024, attention_heads: 16, kv_heads: 4,
        head_dim: 64, params_b: 2, active_params_b: 0.5, experts: 8}}
hosts: [{name: a, address: 10.0.0.1, gpus: 8}]
prefill: {tensor_parallel: 2}
decode: {tensor_parallel: 2, data_parallel: 2, expert_parallel: true, max_num_batched_tokens: 512}
kv_transfer: {kind: nixl, num_threads: 4, ucx_net_devices: [mlx5_0:1]}
target: {kind: systemd}
""",
    "nixl-multinode-dp": """\
name: v3
model: {path: meta-llama/Llama-3.1-8B-Instruct}
hosts: [{name: a, address: 10.0.0.1, gpus: 4}, {name: b, address: 10.0.0.2, gpus: 4}]
prefill: {replicas: 0}
decode: {tensor_parallel: 2, data_parallel: 4}
kv_transfer: {kind: nixl}
target: {kind: systemd}
""",
}


@pytest.fixture(scope="module")
def vllm_parser() -> Any:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


@pytest.fixture(scope="module", autouse=True)
def offline_env() -> Iterator[None]:
    saved = dict(os.environ)
    # the tiny model's 2048-token window stands in for real models with longer contexts
    os.environ.update(HF_HUB_OFFLINE="1", VLLM_ALLOW_LONG_MAX_MODEL_LEN="1", VLLM_NO_USAGE_STATS="1")
    yield
    os.environ.clear()
    os.environ.update(saved)


def serve_processes() -> list[tuple[str, Process]]:
    out = []
    sources = {p.stem: p.read_text() for p in sorted(EXAMPLES.glob("*.yaml"))} | VARIANTS
    for name, text in sources.items():
        desired = compile_spec(load_text(text, f"{name}.yaml"))
        out += [(f"{name}:{p.name}", p) for p in desired.processes if p.role is not Role.ROUTER]
    return out


PROCESSES = serve_processes()


def parse(parser: Any, argv: list[str]) -> Any:
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"vLLM's parser rejected {argv}:\n{err.getvalue()[-800:]}")
    if getattr(args, "model_tag", None):
        args.model = args.model_tag
    validate_parsed_serve_args(args)
    return args


@pytest.fixture(scope="module")
def wide_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's files with 64 attention / 8 KV heads in its config: stands in where TP > 4."""
    out = tmp_path_factory.mktemp("wide") / "tiny-wide"
    out.mkdir()
    for f in tiny_model.iterdir():
        if f.name != "config.json":
            (out / f.name).symlink_to(f)
    config = json.loads((tiny_model / "config.json").read_text())
    config.update(num_attention_heads=64, num_key_value_heads=8)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("proc", [p for _, p in PROCESSES], ids=[i for i, _ in PROCESSES])
def test_argv_accepted_by_vllm(proc: Process, vllm_parser: Any, tiny_model: Path, wide_model: Path) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    assert proc.argv[1] == "serve"
    args = parse(vllm_parser, proc.argv[2:])  # the exact argv, model id included
    assert args.model == proc.argv[2]
    # engine-config step: the tiny local model stands in for the hub id; quantization flags
    # need a quantized checkpoint, so they are checked by the parser above only
    tp = int(proc.argv[proc.argv.index("--tensor-parallel-size") + 1])
    argv = [str(tiny_model if tp <= 4 else wide_model), *proc.argv[3:]]
    for flag in ("--quantization",):
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    engine_args = AsyncEngineArgs.from_cli_args(parse(vllm_parser, argv))
    kv = engine_args.kv_transfer_config
    assert kv is not None and kv.kv_role == ("kv_producer" if proc.role is Role.PREFILL else "kv_consumer")
    if "--nnodes" in argv or "--data-parallel-size" in argv:
        return  # multi-node/DP config needs the other nodes' rendezvous; parse + from_cli_args above
    config = engine_args.create_engine_config()
    assert config.kv_transfer_config is not None
    assert config.parallel_config.tensor_parallel_size == tp


def test_vllm_rejects_a_bad_connector(vllm_parser: Any, tiny_model: Path) -> None:
    """The check above can fail: vLLM refuses an unknown connector at engine-config time."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = parse(
        vllm_parser,
        [str(tiny_model), "--kv-transfer-config", '{"kv_connector":"P2pNcclConnector","kv_role":"kv_producer"}'],
    )
    with pytest.raises(Exception, match=r"P2pNcclConnector|Unsupported|not"):
        AsyncEngineArgs.from_cli_args(args).create_engine_config()
