"""Every invalid spec gets `file:line:col field: message` plus a hint, exit code 2, no traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from disaggctl.cli import app
from disaggctl.compile import compile_spec
from disaggctl.errors import SpecError
from disaggctl.loader import load_text

BASE = """\
name: demo
model:
  path: meta-llama/Llama-3.1-8B-Instruct
hosts:
  - name: node1
    address: 10.0.0.1
    gpus: 8
prefill:
  tensor_parallel: 2
decode:
  tensor_parallel: 2
kv_transfer:
  kind: nixl
target:
  kind: systemd
"""


def errors_of(text: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        compile_spec(load_text(text, "spec.yaml"))  # spec rules, then placement
    return [i.format() for i in e.value.issues]


def one_error(text: str) -> str:
    errs = errors_of(text)
    assert len(errs) == 1, errs
    return errs[0]


def test_base_is_valid() -> None:
    assert load_text(BASE, "spec.yaml").spec.name == "demo"


def test_yaml_syntax_error_has_position() -> None:
    err = one_error(BASE.replace("  tensor_parallel: 2\ndecode:", "  tensor_parallel: [2\ndecode:"))
    assert re.match(r"spec\.yaml:\d+:\d+ \(spec\): YAML syntax error", err), err
    assert "hint:" in err


def test_duplicate_key() -> None:
    err = one_error(BASE + "name: again\n")
    assert err.startswith("spec.yaml:16:1 name: duplicate key 'name' (first at line 1)")


def test_unknown_key_did_you_mean() -> None:
    err = one_error(BASE.replace("  tensor_parallel: 2\ndecode:", "  tensor_paralel: 2\ndecode:"))
    assert err.startswith("spec.yaml:9:3 prefill.tensor_paralel: unknown key 'tensor_paralel'")
    assert "did you mean 'tensor_parallel'?" in err


def test_unknown_key_inside_discriminated_union() -> None:
    err = one_error(BASE.replace("  kind: nixl\n", "  kind: nixl\n  side_chanel_port: 5600\n"))
    assert err.startswith("spec.yaml:14:3 kv_transfer.side_chanel_port: unknown key")
    assert "did you mean 'side_channel_port'?" in err


def test_wrong_type() -> None:
    err = one_error(BASE.replace("    gpus: 8", "    gpus: eight"))
    assert err.startswith("spec.yaml:7:5 hosts[0].gpus:")
    assert "'eight'" in err and "hint:" in err


def test_out_of_range() -> None:
    err = one_error(BASE.replace("decode:\n  tensor_parallel: 2", "decode:\n  tensor_parallel: 0"))
    assert err.startswith("spec.yaml:11:3 decode.tensor_parallel: Input should be greater than or equal to 1 (got 0)")


def test_unknown_kind() -> None:
    err = one_error(BASE.replace("kind: nixl", "kind: p2p-nccl"))
    assert err.startswith("spec.yaml:13:3 kv_transfer.kind:"), err
    assert "nixl" in err and "p2p-nccl" in err


def test_missing_required() -> None:
    err = one_error(BASE.replace("target:\n  kind: systemd\n", ""))
    assert err.startswith("spec.yaml:1:1 target: required field 'target' is missing")


def test_gpu_given_to_two_pools() -> None:
    text = BASE.replace("prefill:\n", "prefill:\n  hosts: {gpus: [0, 1]}\n").replace(
        "decode:\n", "decode:\n  hosts: {gpus: [1, 2]}\n"
    )
    err = one_error(text)
    assert err.startswith("spec.yaml:12:11 decode.hosts.gpus: GPU 1 of host node1 is given to both prefill and decode")


def test_two_processes_on_one_port() -> None:
    text = BASE + "router:\n  port: 9000\n  metrics_port: 9000\n"
    err = one_error(text)
    assert err.startswith("spec.yaml:18:3 router.metrics_port: metrics_port 9000 is the router's own port")


def test_lmcache_proxy_port_collides_with_router_port() -> None:
    text = BASE.replace("kind: nixl", "kind: lmcache\n  proxy_port: 8000")
    err = one_error(text)
    assert re.match(r"spec\.yaml:14:3 kv_transfer\.proxy_port: port 8000 on host node1 is already used by router", err)


def test_tp_must_divide_heads() -> None:
    text = BASE.replace("tensor_parallel: 2", "tensor_parallel: 3")
    errs = errors_of(text)
    assert errs[0].startswith("spec.yaml:9:3 prefill.tensor_parallel: tensor_parallel 3 does not divide the model's 32")
    assert errs[1].startswith("spec.yaml:11:3 decode.tensor_parallel: tensor_parallel 3 does not divide")
    assert len(errs) == 2


def test_tp_and_kv_heads() -> None:
    text = (
        BASE.replace(
            "  path: meta-llama/Llama-3.1-8B-Instruct\n",
            """  path: /models/custom
  architecture: {layers: 4, hidden_size: 1536, attention_heads: 12, kv_heads: 3, head_dim: 128, params_b: 1}
""",
        )
        .replace("prefill:\n  tensor_parallel: 2", "prefill:\n  tensor_parallel: 2")
        .replace("decode:\n  tensor_parallel: 2", "decode:\n  tensor_parallel: 8")
    )
    errs = errors_of(text)
    assert any("prefill.tensor_parallel: tensor_parallel 2 and the model's 3 KV heads" in e for e in errs), errs
    assert any(
        "decode.tensor_parallel: tensor_parallel 8 does not divide the model's 12 attention heads" in e for e in errs
    ), errs


def test_lmcache_needs_equal_tp() -> None:
    text = BASE.replace("kind: nixl", "kind: lmcache").replace(
        "decode:\n  tensor_parallel: 2", "decode:\n  tensor_parallel: 4"
    )
    err = one_error(text)
    assert err.startswith("spec.yaml:9:3 prefill.tensor_parallel: LMCache P/D needs equal tensor_parallel")
    assert "hint:" in err


def test_nixl_accepts_prefill_tp_above_decode() -> None:
    text = BASE.replace("prefill:\n  tensor_parallel: 2", "prefill:\n  tensor_parallel: 4")
    desired = compile_spec(load_text(text, "spec.yaml"))  # vLLM 0.32: tp_ratio -2, heads not replicated
    assert desired.compat is not None and desired.compat.transfer is not None
    assert desired.compat.transfer.tp_ratio == -2


def test_nixl_refuses_replicated_kv_from_a_larger_prefill_tp() -> None:
    text = BASE.replace("prefill:\n  tensor_parallel: 2", "prefill:\n  tensor_parallel: 16").replace(
        "    gpus: 8\n", "    gpus: 32\n"
    )
    err = one_error(text)
    assert err.startswith("spec.yaml:9:3 prefill.tensor_parallel: prefill tensor_parallel 16 replicates the model's 8")
    assert "_validate_remote_agent_handshake" in err


def test_nvfp4_on_hopper() -> None:
    text = BASE.replace(
        "  path: meta-llama/Llama-3.1-8B-Instruct\n",
        "  path: meta-llama/Llama-3.1-8B-Instruct\n  quantization: modelopt_fp4\n",
    )
    text = text.replace("    gpus: 8\n", "    gpus: 8\n    gpu: h100\n")
    err = one_error(text)
    assert err.startswith("spec.yaml:4:3 model.quantization: NVFP4 (modelopt_fp4) needs Blackwell GPUs")


def test_nvfp4_on_hopper_from_profile() -> None:
    text = "profiles: [h100]\n" + BASE.replace(
        "  path: meta-llama/Llama-3.1-8B-Instruct\n",
        "  path: meta-llama/Llama-3.1-8B-Instruct\n  quantization: modelopt_fp4\n",
    )
    assert "NVFP4" in one_error(text)


def test_model_does_not_fit() -> None:
    text = "profiles: [h100]\n" + BASE.replace("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-405B-Instruct")
    errs = errors_of(text)
    assert len(errs) == 2
    assert errs[0].startswith("spec.yaml:10:3 prefill.tensor_parallel: the model does not fit:"), errs
    assert "raise tensor_parallel" in errs[0]


def test_router_host_not_declared() -> None:
    err = one_error(BASE + "router:\n  host: node9\n")
    assert err.startswith("spec.yaml:17:3 router.host: router host 'node9' is not a declared host")


def test_more_instances_than_gpus() -> None:
    err = one_error(BASE.replace("decode:\n", "decode:\n  replicas: 4\n"))
    assert err.startswith("spec.yaml:11:3 decode.replicas: cannot place decode instance 3")
    assert "8 free GPUs for 8 needed" not in err


def test_unknown_profile() -> None:
    err = one_error("profiles: [b20]\n" + BASE)
    assert err.startswith("spec.yaml:1:12 profiles[0]: unknown profile 'b20'")
    assert "did you mean 'b200'?" in err


def test_hostile_newline_rejected() -> None:
    text = BASE.replace("prefill:\n", 'prefill:\n  extra_args: ["--x", "a\\nb"]\n')
    err = one_error(text)
    assert "extra_args" in err and "newline" in err


def test_cli_exit_code_2_and_no_traceback(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(BASE.replace("kind: nixl", "kind: nixl\n  bogus: 1"))
    r = subprocess.run([sys.executable, "-m", "disaggctl.cli", "validate", str(spec)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"{spec}:14:3 kv_transfer.bogus: unknown key 'bogus'" in r.stderr
    assert "nothing was changed" in r.stderr


def test_cli_validate_ok(tmp_path: Path) -> None:
    spec = tmp_path / "ok.yaml"
    spec.write_text(BASE)
    r = CliRunner().invoke(app, ["validate", str(spec)])
    assert r.exit_code == 0, r.output
    assert "OK (2 instances, 3 processes)" in r.output
