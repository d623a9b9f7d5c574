"""Rendering through skeletons (render/shapes.py) gives the same files as jinja2 rendering every unit,
with the cache folder empty, filled by an earlier run, or damaged; the cache file holds no values."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from disaggctl.compile import compile_spec
from disaggctl.deployment import Rendered
from disaggctl.loader import load_text
from disaggctl.render import shapes, templates
from disaggctl.render.systemd import render_systemd

REPO = Path(__file__).resolve().parents[1]

SPEC = """
name: alpha
model: {path: /models/tiny, served_name: tiny}
hosts:
  - {name: s1, address: 10.201.0.11, gpus: 4}
  - {name: s2, address: 10.201.0.12, gpus: 2}
  - {name: s3, address: 10.201.0.13, gpus: 2}
prefill: {replicas: 2, extra_args: ["--foo", "a b $HOME %n"], env: {PREFILL_MARK: "p-value-7"}}
decode: {replicas: 3, env: {DECODE_MARK: "d-value-9"}}
kv_transfer: {kind: shared-storage, path: /var/tmp/kv}
router: {host: s1, port: 8000}
target:
  kind: systemd
  vllm_bin: /opt/standin/vllm
  secrets: [HF_TOKEN]
"""
SECRET = "hf_do_not_cache_me"


def _rack_spec(racks: int) -> str:
    spec = importlib.util.spec_from_file_location("plan_scale_run", REPO / "bench" / "plan_scale" / "run.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("plan_scale_run", mod)  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    text: str = mod.rack_spec(racks)
    return text


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _fresh_process()
    yield tmp_path / "cache" / "disaggctl" / "render" / "systemd.json"
    _fresh_process()


def _fresh_process() -> None:
    templates.environment.cache_clear()
    templates._skeletons.cache_clear()
    templates._sources.cache_clear()


def _render(text: str) -> Rendered:
    loaded = load_text(text, "spec.yaml")
    return render_systemd(compile_spec(loaded), loaded.spec, {"HF_TOKEN": SECRET})


def _by_jinja2(text: str, monkeypatch: pytest.MonkeyPatch) -> Rendered:
    def unsupported(context: object) -> None:
        raise shapes.Unsupported("every unit by jinja2")

    with monkeypatch.context() as m:
        m.setattr(shapes, "flatten", unsupported)
        return _render(text)


@pytest.mark.parametrize("which", ["small", "2 racks"])
def test_skeletons_render_what_jinja2_renders(cache_home: Path, monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    text = SPEC if which == "small" else _rack_spec(2)
    want = _by_jinja2(text, monkeypatch)
    assert not cache_home.exists()
    _fresh_process()
    assert _render(text) == want  # cache empty: one jinja2 render per shape
    templates._skeletons("systemd").flush()
    stored = cache_home.read_text()
    assert cache_home.stat().st_mode & 0o777 == 0o600
    _fresh_process()
    with monkeypatch.context() as m:  # cache filled: no jinja2 at all
        m.setattr(templates, "environment", lambda *a, **kw: pytest.fail("jinja2 used with a filled cache"))
        assert _render(text) == want
    cache_home.write_text(stored[: len(stored) // 2])  # damaged
    _fresh_process()
    assert _render(text) == want
    if which == "small":
        units = [f.content for f in want.files if f.path.endswith(".service")]
        assert any("d-value-9" in u for u in units) and any("a b $$HOME %%n" in u for u in units)
        assert any(SECRET in f.content for f in want.files if f.secret)
    for value in ("10.201.0.1", "10.2", "alpha", "nvl72", "s1", "d-value-9", "p-value-7", "HOME", "/models",
                  "/opt/standin", "tiny", "prefill", "decode", "8000", SECRET):  # fmt: skip
        assert value not in stored, value
