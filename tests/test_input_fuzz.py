"""Fuzz the spec loader through the real CLI boundary (cli.main, in-process): random bytes and random
YAML trees (alone, or grafted into a valid spec) give exit 0 or exit 2 with a located `error:` line,
never a traceback or an internal error, and never take more than a few seconds."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.input_cli import run_main

BASE: dict[str, Any] = yaml.safe_load(
    """
name: demo
model: {path: meta-llama/Llama-3.1-8B-Instruct}
hosts: [{name: node1, address: 10.0.0.1, gpus: 8}]
prefill: {tensor_parallel: 2}
decode: {tensor_parallel: 2}
kv_transfer: {kind: nixl}
target: {kind: systemd}
"""
)
SECONDS = 5.0  # CPU seconds for one validate of a small input (a YAML bomb takes minutes)

TEXT = st.text(
    alphabet=st.sampled_from([*list("abcXYZ019 _-./:'\"$%|;&`\\#*[]{}\n\r\t\x00"), "\u2028", "\x85", "é"]), max_size=20
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
    | st.sampled_from(["nixl", "lmcache", "shared-storage", "systemd", "slurm", "local", "node1", "10.0.0.1"])
)
TREES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(TEXT | st.sampled_from(["kind", "name"]), inner, max_size=4)
    ),
    max_leaves=20,
)
PATHS = st.sampled_from(
    [
        (),
        ("name",),
        ("model",),
        ("model", "path"),
        ("hosts",),
        ("hosts", 0),
        ("hosts", 0, "address"),
        ("hosts", 0, "gpus"),
        ("prefill",),
        ("prefill", "env"),
        ("prefill", "extra_args"),
        ("decode", "hosts"),
        ("kv_transfer",),
        ("kv_transfer", "kind"),
        ("target",),
        ("target", "kind"),
        ("router",),
        ("health",),
        ("engine", "env"),
        ("profiles",),
        ("workload",),
    ]
)


def _check(tmp: Path, content: bytes) -> None:
    spec = tmp / "s.yaml"
    spec.write_bytes(content)
    t0 = time.process_time()  # CPU seconds: a busy machine must not fail this, a blow-up still does
    r = run_main("validate", str(spec))
    took = time.process_time() - t0
    assert took < SECONDS, f"{took:.1f} CPU s"
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err[-3000:]
    assert r.code in (0, 2), (r.code, r.err[-2000:])
    if r.code == 2:
        assert r.first.startswith(f"error: {spec}:"), r.err[:2000]


def _graft(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    if not path:
        return value if isinstance(value, dict) else {"value": value}
    node: Any = spec
    for p in path[:-1]:
        node = node.setdefault(p, {}) if isinstance(p, str) else node[p]
    node[path[-1]] = value
    return spec


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(content=st.binary(max_size=600))
def test_random_bytes(tmp_path: Path, content: bytes) -> None:
    _check(tmp_path, content)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(tree=TREES)
def test_random_yaml_trees(tmp_path: Path, tree: Any) -> None:
    _check(tmp_path, yaml.safe_dump(tree, allow_unicode=True).encode())


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(path=PATHS, tree=TREES)
def test_random_trees_grafted_into_a_valid_spec(tmp_path: Path, path: tuple[str | int, ...], tree: Any) -> None:
    _check(tmp_path, yaml.safe_dump(_graft(path, tree), allow_unicode=True).encode())


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    prefix=st.sampled_from(["", "name: demo\n", "a: &a [1, 2]\nb: *a\n", "x: !!binary aGk=\n", "? [a]\n: b\n"]),
    junk=st.text(alphabet=st.sampled_from(list("&*!|>-?:[]{},#%@`'\" \n\tab12")), max_size=80),
)
def test_yaml_syntax_soup(tmp_path: Path, prefix: str, junk: str) -> None:
    _check(tmp_path, (prefix + junk).encode())
