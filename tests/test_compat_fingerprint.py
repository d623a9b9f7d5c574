"""The fingerprint's vLLM part against vLLM's own NIXL compatibility hash and backend choice.

For pairs of compiled `vllm serve` argvs (prefill and decode of a spec where one role's
extra_args changes one flag), vLLM's `compute_nixl_compatibility_hash` is run on the real
VllmConfig each argv gives (`AsyncEngineArgs.create_engine_config`, the tiny offline model
standing in for the model id): the two hashes are equal exactly when disaggctl's hash factors
are equal. The attention backend vLLM would pick per GPU architecture comes from vLLM's
`_get_backend_priorities`.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from disaggctl.compat import fingerprint as fp
from disaggctl.compile import compile_placement
from disaggctl.loader import load_text
from disaggctl.placement import place
from disaggctl.spec import Role

pytestmark = pytest.mark.vllm

SPEC = """\
name: fp
model: {{path: {model}, served_name: tiny, dtype: bfloat16, max_model_len: 512}}
hosts: [{{name: localhost, address: 127.0.0.1, gpus: 2}}]
prefill: {{enforce_eager: true, block_size: 32}}
decode: {{enforce_eager: true, block_size: 32, extra_args: {extra}}}
kv_transfer: {{kind: nixl, buffer_device: cpu}}
target: {{kind: local, cpu: true}}
"""

# decode-only flags: (extra_args, whether vLLM's hash changes is what the test finds out)
VARIANTS: dict[str, list[str]] = {
    "same": [],
    "kv-cache-dtype": ["--kv-cache-dtype", "fp8"],
    "dtype": ["--dtype", "float16"],
    "no-hma": ["--disable-hybrid-kv-cache-manager"],
    "ngram-speculation": [
        "--speculative-config",
        json.dumps({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}),
    ],
    "max-num-seqs": ["--max-num-seqs", "8"],
    "tensor-parallel": ["--tensor-parallel-size", "2"],
    "block-size": ["--block-size", "64"],
}


@pytest.fixture(scope="module", autouse=True)
def offline_env() -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    yield
    os.environ.clear()
    os.environ.update(saved)


def vllm_hash(argv: list[str]) -> str:
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import compute_nixl_compatibility_hash
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(argv[2:])
    args.model = args.model_tag
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    return str(compute_nixl_compatibility_hash(config, fp.attention_backend(argv, "cpu", False)))


def pair(model: Path, extra: list[str]) -> tuple[list[str], list[str]]:
    """(prefill argv, decode argv); compiled without the pair check, which would refuse a differing pair."""
    loaded = load_text(SPEC.format(model=model, extra=json.dumps(extra)), "fp.yaml")
    desired = compile_placement(loaded.spec, place(loaded))
    by_role = {p.role: p.argv for p in desired.processes}
    return by_role[Role.PREFILL], by_role[Role.DECODE]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_factors_equal_iff_vllm_hashes_equal(name: str, tiny_model: Path) -> None:
    prefill, decode = pair(tiny_model, VARIANTS[name])
    ours_equal = fp.vllm_factors(prefill, "cpu", False) == fp.vllm_factors(decode, "cpu", False)
    vllm_equal = vllm_hash(prefill) == vllm_hash(decode)
    assert ours_equal == vllm_equal, (
        name,
        fp.differences(fp.vllm_factors(prefill, "cpu", False), fp.vllm_factors(decode, "cpu", False)),
    )


def test_variants_cover_both_outcomes(tiny_model: Path) -> None:
    outcomes = set()
    for extra in VARIANTS.values():
        prefill, decode = pair(tiny_model, extra)
        outcomes.add(vllm_hash(prefill) == vllm_hash(decode))
    assert outcomes == {True, False}


def test_model_path_string_is_hashed(tiny_model: Path, tmp_path: Path) -> None:
    alias = tmp_path / "same-weights-other-path"
    alias.symlink_to(tiny_model)
    prefill, _ = pair(tiny_model, [])
    other, _ = pair(alias, [])
    assert vllm_hash(prefill) != vllm_hash(other)
    assert fp.vllm_factors(prefill, "cpu", False)["model"] != fp.vllm_factors(other, "cpu", False)["model"]


def test_connector_version_is_the_installed_one() -> None:
    from vllm import __version__
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import metadata

    assert fp.NIXL_CONNECTOR_VERSION == metadata.NIXL_CONNECTOR_VERSION
    assert fp.vllm_factors(["vllm", "serve", "m"], None, False)["vllm_version"] == __version__.split("+")[0]


def backend_priorities() -> Any:
    """vLLM's `_get_backend_priorities`, compiled from the installed vllm/platforms/cuda.py.

    The CPU build cannot import that module (it loads CUDA kernels), so the one function is taken
    from its source and run with the names it uses.
    """
    import vllm.platforms
    from vllm.config.cache import CacheDType
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    source = (Path(vllm.platforms.__file__).parent / "cuda.py").read_text()
    func = next(
        n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "_get_backend_priorities"
    )
    func.decorator_list = []  # @cache: memoization only
    namespace: dict[str, Any] = {
        "AttentionBackendEnum": AttentionBackendEnum,
        "DeviceCapability": DeviceCapability,
        "CacheDType": CacheDType,
    }
    exec(compile(ast.Module(body=[func], type_ignores=[]), "vllm/platforms/cuda.py", "exec"), namespace)
    return namespace["_get_backend_priorities"]


@pytest.mark.parametrize("arch,capability", [("hopper", (9, 0)), ("blackwell", (10, 0)), ("blackwell", (10, 3))])
@pytest.mark.parametrize("mla", [False, True])
def test_auto_backend_is_vllms_first_choice(arch: str, capability: tuple[int, int], mla: bool) -> None:
    from vllm.platforms.interface import DeviceCapability

    first = backend_priorities()(mla, DeviceCapability(*capability))[0]
    assert fp.AUTO_BACKEND[(arch, mla)] == first.name


@pytest.mark.parametrize("mla", [False, True])
def test_common_backend_runs_on_hopper_and_blackwell(mla: bool) -> None:
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend: Any = AttentionBackendEnum[fp.COMMON_BACKEND[mla]].get_class()
    for cap in ((9, 0), (10, 0), (10, 3)):
        assert backend.supports_compute_capability(DeviceCapability(*cap)), (fp.COMMON_BACKEND[mla], cap)


def test_what_vllm_hashes_in_this_grid(tiny_model: Path) -> None:
    """The flags vLLM 0.32's hash covers among the variants (the docs list these)."""
    differ = {name for name, extra in VARIANTS.items() if len(set(map(vllm_hash, pair(tiny_model, extra)))) > 1}
    assert differ == {"kv-cache-dtype", "dtype", "no-hma"}


def test_vllm_cpu_ignores_a_pinned_backend() -> None:
    from types import SimpleNamespace

    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    config = SimpleNamespace(use_sparse=False, use_mla=False)
    path = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.FLASH_ATTN, config)
    assert path == AttentionBackendEnum.CPU_ATTN.get_path()
    argv = ["vllm", "serve", "m", "--attention-backend", "FLASH_ATTN"]
    assert fp.attention_backend(argv, "cpu", False) == "CPU_ATTN"
    assert fp.attention_backend(argv, "hopper", False) == "FLASH_ATTN"
