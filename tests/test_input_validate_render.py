"""`validate` exit 0 means `render` succeeds (for the spec's own target), and everything `render`
refuses, `validate` refuses first with a located error: over every example and generated variants
(other targets, the render-time refusals of issue 11, random edits), through cli.main in-process."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.input_cli import run_main, snapshot
from tests.plugins.paths import EXAMPLES

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))
TARGETS: dict[str, dict[str, Any]] = {
    "systemd": {"kind": "systemd"},
    "slurm": {"kind": "slurm", "partition": "gpu"},
    "local": {"kind": "local", "state_dir": "/tmp/dctl-vr"},
}

Edit = tuple[tuple[str | int, ...], Any]
# what render used to refuse without a location (issue 11), and other edge values
EDITS: list[Edit] = [
    (("target",), TARGETS["slurm"] | {"workdir": "/tmp/a b"}),
    (("target",), TARGETS["slurm"] | {"workdir": "/tmp/x\n"}),
    (("target",), TARGETS["slurm"] | {"container_image": "img", "container_mounts": ["/a:/a,/b:/b"]}),
    (("target",), TARGETS["slurm"] | {"container_image": "img", "container_mounts": ["/a:/a"]}),
    (("target",), TARGETS["slurm"] | {"exclude": "n[1-3]", "constraint": "h100&ib"}),
    (("target",), TARGETS["slurm"]),
    (("target",), TARGETS["systemd"]),
    (("target",), TARGETS["systemd"] | {"secrets": ["HF_TOKEN"], "run_as": "svc"}),
    (("target",), TARGETS["local"]),
    (("hosts", 0, "address"), "fe80::1"),
    (("hosts", 0, "address"), "[2001:db8::1]"),
    (("hosts", 0, "address"), "10.0.0.1\n"),
    (("hosts", 0, "address"), "node-a.example.org"),
    (("hosts", 0, "address"), "10.10.0.300"),
    (("router", "bind"), "0.0.0.0\n"),
    (("router", "bind"), "::"),
    (("engine", "host_bind"), "::1"),
    (("router", "kind"), "vllm-router"),
    (("kv_transfer",), {"kind": "lmcache"}),
    (("kv_transfer",), {"kind": "shared-storage", "path": "/tmp/kv"}),
    (("kv_transfer",), {"kind": "nixl"}),
    (("decode", "replicas"), 0),
    (("decode", "replicas"), 3),
    (("prefill", "replicas"), 2),
    (("prefill", "tensor_parallel"), 1),
    (("decode", "tensor_parallel"), 8),
    (("prefill", "extra_args"), ["--x", "a b $HOME %n 'q' \"d\""]),
    (("prefill", "env"), {"A": "x y $z `w` %n"}),
    (("model", "max_model_len"), 131072),
    (("name",), "x" * 48),
]


def _apply(spec: dict[str, Any], edit: Edit) -> None:
    path, value = edit
    node: Any = spec
    for p in path[:-1]:
        if isinstance(p, int):
            if not isinstance(node, list) or p >= len(node):
                return
            node = node[p]
        else:
            node = node.setdefault(p, {})
    node[path[-1]] = copy.deepcopy(value)


def _validate_then_render(tmp: Path, text: str) -> None:
    spec = tmp / "s.yaml"
    spec.write_text(text)
    out = tmp / "out"
    v = run_main("validate", str(spec))
    assert "Traceback" not in v.err and "internal error" not in v.err, v.err[-2000:]
    before = snapshot(tmp)
    r = run_main("render", str(spec), "-o", str(out))
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err[-2000:]
    if v.code == 0:
        assert r.code == 0, f"validate said OK but render refused:\n{r.err}"
    else:
        assert v.code == 2 and re.match(rf"error: {re.escape(str(spec))}:\d+:\d+ ", v.first), v.err[:2000]
        assert r.code == 2 and r.first == v.first, (v.first, r.first)
        assert snapshot(tmp) == before


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_every_example_validates_and_renders(example: Path, tmp_path: Path) -> None:
    _validate_then_render(tmp_path, example.read_text())
    assert run_main("validate", str(tmp_path / "s.yaml")).code == 0


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_example_on_every_target(example: Path, target: str, tmp_path: Path) -> None:
    spec = yaml.safe_load(example.read_text())
    spec["target"] = TARGETS[target]
    _validate_then_render(tmp_path, yaml.safe_dump(spec))


@pytest.mark.parametrize("edit", EDITS, ids=[f"{'.'.join(map(str, p))}={v!r:.30}" for p, v in EDITS])
def test_render_time_refusals_are_validation_errors(edit: Edit, tmp_path: Path) -> None:
    spec = yaml.safe_load((EXAMPLES / "h100-slurm.yaml").read_text())
    _apply(spec, edit)
    _validate_then_render(tmp_path, yaml.safe_dump(spec))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    example=st.sampled_from(EXAMPLE_FILES),
    edits=st.lists(st.sampled_from(EDITS), min_size=1, max_size=3),
)
def test_random_variants(example: Path, edits: list[Edit], tmp_path_factory: pytest.TempPathFactory) -> None:
    spec = yaml.safe_load(example.read_text())
    for e in edits:
        _apply(spec, e)
    _validate_then_render(tmp_path_factory.mktemp("v"), yaml.safe_dump(spec))
