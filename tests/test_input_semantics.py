"""The semantic input checks against the real code they protect: LMCache's P/D buffer capacity
(lmcache's own size arithmetic) and vLLM's IPC socket paths on the local target (vLLM's own path
function, bound with real ZMQ)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from disaggctl.compile import compile_spec
from disaggctl.errors import SpecError
from disaggctl.input_checks import desired_checks, lmcache_buffer_need
from disaggctl.loader import load_text
from disaggctl.render.local import UNIX_SOCKET_MAX, proc_spec

LMCACHE = """\
name: lm
model: {{path: {model}, max_model_len: {tokens}, kv_cache_dtype: {kv}}}
hosts: [{{name: a, address: 10.0.0.1, gpus: 16}}]
prefill: {{tensor_parallel: {tp}}}
decode: {{tensor_parallel: {tp}}}
kv_transfer: {{kind: lmcache, buffer_size_mb: {mb}, chunk_size: 256}}
target: {{kind: systemd}}
"""


def _lmcache_capacity_tokens(model: str, tp: int, kv: str, mb: int) -> int:
    """What LMCache 0.5.6 computes in PDBackend.initialize_allocator for this spec's kv_shape."""
    import torch
    from lmcache.utils import get_size_bytes

    from disaggctl.catalog import lookup

    entry = lookup(model)
    assert entry is not None
    a = entry.architecture
    mla = a.kv_latent_dim is not None
    shape = (a.layers, 1 if mla else 2, 256, 1 if mla else max(1, a.kv_heads // tp), a.kv_latent_dim or a.head_dim)
    dtype = torch.float8_e4m3fn if kv.startswith("fp8") else torch.bfloat16
    chunk_bytes = get_size_bytes([torch.Size(shape)], [dtype])
    return (mb * 1024 * 1024 // chunk_bytes) * 256


@pytest.mark.parametrize(
    ("model", "tp", "kv"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", 1, "auto"),
        ("meta-llama/Llama-3.1-70B-Instruct", 4, "fp8"),
        ("meta-llama/Llama-3.1-70B-Instruct", 16, "auto"),
        ("deepseek-ai/DeepSeek-V3", 8, "auto"),
    ],
)
@pytest.mark.parametrize("tokens", [1000, 8192, 32768])
def test_lmcache_buffer_refused_exactly_when_lmcache_would_refuse(model: str, tp: int, kv: str, tokens: int) -> None:
    spec = load_text(LMCACHE.format(model=model, tokens=tokens, kv=kv, tp=tp, mb=4096), "s.yaml").spec
    need = lmcache_buffer_need(spec, tokens)
    assert need is not None
    need_mb = -(-need // (1024 * 1024))
    for mb in sorted({16, max(16, need_mb - 1), need_mb, need_mb + 1}):
        fits = _lmcache_capacity_tokens(model, tp, kv, mb) >= tokens
        text = LMCACHE.format(model=model, tokens=tokens, kv=kv, tp=tp, mb=mb)
        if fits:
            load_text(text, "s.yaml")
        else:
            with pytest.raises(SpecError) as e:
                load_text(text, "s.yaml")
            assert str(e.value).startswith("s.yaml:6:") and "kv_transfer.buffer_size_mb" in str(e.value)
            assert f"set buffer_size_mb >= {need_mb}" in str(e.value)


LOCAL = """\
name: ipc
model: {{path: /models/tiny}}
hosts: [{{name: localhost, address: 127.0.0.1, gpus: 2}}]
kv_transfer: {{kind: shared-storage, path: /tmp/kv}}
{extra}target: {{kind: local, state_dir: {state}}}
"""


def _bind(path: str) -> None:
    import zmq

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PAIR)
    try:
        sock.bind(path)
    finally:
        sock.close(linger=0)


def test_long_state_folder_moves_vllm_ipc_sockets_to_a_short_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.utils.network_utils import get_open_zmq_ipc_path

    state = tmp_path / ("s" * 60)
    loaded = load_text(LOCAL.format(extra="", state=state), "s.yaml")
    desired = compile_spec(loaded)
    desired_checks(loaded, desired)  # accepted
    engine = next(p for p in desired.processes if p.role.value == "decode")
    env = proc_spec(engine, desired.config_dir).env
    # without the move, vLLM's socket under TMPDIR would not fit
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", env["TMPDIR"])
    assert len(get_open_zmq_ipc_path().removeprefix("ipc://").encode()) > UNIX_SOCKET_MAX
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", env["VLLM_RPC_BASE_PATH"])
    path = get_open_zmq_ipc_path()
    assert len(path.removeprefix("ipc://").encode()) <= UNIX_SOCKET_MAX
    os.makedirs(env["VLLM_RPC_BASE_PATH"], exist_ok=True)
    _bind(path)  # a real ZMQ IPC socket at that path


def test_short_state_folder_keeps_sockets_under_tmpdir(tmp_path: Path) -> None:
    loaded = load_text(LOCAL.format(extra="", state="/tmp/dctl-ipc"), "s.yaml")
    desired = compile_spec(loaded)
    engine = next(p for p in desired.processes if p.role.value == "decode")
    assert "VLLM_RPC_BASE_PATH" not in proc_spec(engine, desired.config_dir).env


def test_a_socket_folder_the_spec_sets_too_long_is_refused_at_that_field() -> None:
    extra = f"decode: {{env: {{VLLM_RPC_BASE_PATH: /tmp/{'x' * 80}}}}}\n"
    loaded = load_text(LOCAL.format(extra=extra, state="/tmp/dctl-ipc"), "s.yaml")
    desired = compile_spec(loaded)
    with pytest.raises(SpecError) as e:
        desired_checks(loaded, desired)
    msg = str(e.value)
    assert msg.startswith("s.yaml:5:") and "decode.env.VLLM_RPC_BASE_PATH" in msg and "107-byte" in msg
