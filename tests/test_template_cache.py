"""The caches of render/templates.py: compiled templates and skeletons (render/shapes.py). Same
output with and without them, a damaged, foreign or unusable cache is skipped, a changed template
is compiled and rendered again."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from disaggctl.render import shapes, templates


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _fresh_process()
    yield tmp_path / "cache"
    _fresh_process()


def _render(name: str = "target.j2") -> str:
    templates.environment.cache_clear()  # a new process: a new environment
    t = {"deployment": "d", "host": "h", "description": "x", "services": ["a.service", "b.service"]}
    return templates.environment("systemd").get_template(name).render(t=t)


def test_cached_templates_render_the_same_and_survive_damage(cache_home: Path) -> None:
    first = _render()
    entries = list(cache_home.glob("disaggctl/jinja2/*/__jinja2_*.cache"))
    assert len(entries) == 1 and "Wants=a.service b.service" in first
    assert _render() == first  # from the cache
    entries[0].write_bytes(b"\0garbage")
    assert _render() == first  # damaged: compiled from source (and written again)
    assert entries[0].read_bytes() != b"\0garbage"


def test_options_get_their_own_folder_and_an_unusable_cache_is_skipped(cache_home: Path) -> None:
    _render()
    templates.environment("systemd", "{##", "##}")
    templates.environment.cache_clear()
    assert len(list(cache_home.glob("disaggctl/jinja2/*"))) == 2
    shutil.rmtree(cache_home)
    cache_home.write_text("not a folder")  # nowhere to cache: render anyway
    assert "Wants=a.service b.service" in _render()


def test_a_changed_template_is_compiled_again(cache_home: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    root = tmp_path / "data"
    shutil.copytree(templates.data_dir("templates") / "systemd", root / "systemd")
    monkeypatch.setattr(templates, "data_dir", lambda name: root)
    before = _render()
    text = (root / "systemd" / "target.j2").read_text()
    (root / "systemd" / "target.j2").write_text(text.replace("[Unit]", "[Unit]\n# changed"))
    assert _render() == before.replace("[Unit]", "[Unit]\n# changed")


def _fresh_process() -> None:
    """What a new process starts with: no environment, no skeletons loaded, nothing to write."""
    templates.environment.cache_clear()
    templates._skeletons.cache_clear()
    templates._sources.cache_clear()


def _flush() -> None:
    templates._skeletons("systemd").flush()


T = {"deployment": "d", "host": "h", "description": "x", "services": ["a.service"]}


def _no_jinja(*a: object, **kw: object) -> None:
    raise AssertionError("rendered again")


def test_skeletons_are_remembered_across_runs_without_jinja2(cache_home: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from disaggctl.render.systemd import TargetContext

    _fresh_process()
    ctx = TargetContext(**T)  # type: ignore[arg-type]
    text = templates.render("systemd", "target.j2", t=ctx)
    assert text == templates.environment("systemd").get_template("target.j2").render(t=ctx)
    _flush()
    stored = cache_home / "disaggctl" / "render" / "systemd.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    _fresh_process()
    other = TargetContext(**{**T, "host": "h2", "services": ["b.service"]})  # type: ignore[arg-type]
    other_text = templates.environment("systemd").get_template("target.j2").render(t=other)
    assert "host h2." in other_text and "Wants=b.service\n" in other_text
    _fresh_process()
    with monkeypatch.context() as m:
        m.setattr(templates, "environment", _no_jinja)
        assert templates.render("systemd", "target.j2", t=ctx) == text  # a later run: from the file
        # the same shape, other values: filled, no jinja2
        assert templates.render("systemd", "target.j2", t=other) == other_text
        with pytest.raises(AssertionError, match="rendered again"):  # another shape (two services): rendered
            templates.render("systemd", "target.j2", t=TargetContext(**{**T, "services": ["a", "b"]}))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "content",
    [
        "{damaged",
        '{"0123": "a text of the cache before skeletons"}',  # format 1: whole texts by sha256
        '{"format": 2, "skeletons": []}',
        None,  # format 2, every entry of the right key but not a skeleton of this shape
    ],
)
def test_a_damaged_or_foreign_cache_file_falls_back_to_jinja2(cache_home: Path, content: str | None) -> None:
    from disaggctl.render.systemd import TargetContext

    _fresh_process()
    ctx = TargetContext(**T)  # type: ignore[arg-type]
    want = templates.environment("systemd").get_template("target.j2").render(t=ctx)
    stored = cache_home / "disaggctl" / "render" / "systemd.json"
    stored.parent.mkdir(parents=True)
    if content is None:
        shape, leaves = shapes.flatten({"t": ctx})
        key = templates._skeletons("systemd").key("target.j2", shape)
        bad = [["x", len(leaves), ""], ["x", 0], ["x", "0", ""], "x", [1, 0, "x"]]
        for parts in bad:
            stored.write_text(json.dumps({"format": 2, "skeletons": {key: parts}}))
            _fresh_process()
            assert templates.render("systemd", "target.j2", t=ctx) == want
        return
    stored.write_text(content)
    _fresh_process()
    assert templates.render("systemd", "target.j2", t=ctx) == want
    _flush()
    assert json.loads(stored.read_text())["format"] == shapes.FORMAT  # written anew


def test_a_changed_template_is_rendered_again(cache_home: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from disaggctl.render.systemd import TargetContext

    root = tmp_path / "data2"
    shutil.copytree(templates.data_dir("templates") / "systemd", root / "systemd")
    monkeypatch.setattr(templates, "data_dir", lambda name: root)
    _fresh_process()
    ctx = TargetContext(**T)  # type: ignore[arg-type]
    before = templates.render("systemd", "target.j2", t=ctx)
    _flush()
    (root / "systemd" / "target.j2").write_text((root / "systemd" / "target.j2").read_text() + "# more\n")
    _fresh_process()
    assert templates.render("systemd", "target.j2", t=ctx) == before + "# more\n"
    _fresh_process()


def test_a_template_doing_more_than_printing_values_is_rendered_whole(
    cache_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from disaggctl.render.systemd import TargetContext

    root = tmp_path / "data3"
    (root / "systemd").mkdir(parents=True)
    (root / "systemd" / "t.j2").write_text(
        "{{ t.host | upper }} {% if t.deployment == 'd' %}first{% endif %} {{ t.services | length }}\n"
    )
    monkeypatch.setattr(templates, "data_dir", lambda name: root)
    _fresh_process()
    for host, dep in (("h", "d"), ("k", "d"), ("k", "e"), ("z", "d")):
        ctx = TargetContext(**{**T, "host": host, "deployment": dep})  # type: ignore[arg-type]
        want = templates.environment("systemd").get_template("t.j2").render(t=ctx)
        assert templates.render("systemd", "t.j2", t=ctx) == want
    _flush()
    assert not (cache_home / "disaggctl" / "render" / "systemd.json").exists()  # no skeleton to keep


def test_flatten_and_fill() -> None:
    from disaggctl.render.systemd import TargetContext

    ctx = TargetContext(deployment="d", host="", description="x", services=["a", "b"])
    shape, leaves = shapes.flatten({"t": ctx, "n": 0, "m": 7, "b": True, "z": None})
    assert leaves == ["7", "d", "x", "a", "b"]  # sorted names, then fields in order; no falsy values
    assert shape == ("b", "True", "m", False, "n", "0", "t", "TargetContext", True, "''", True, 2, True, True, "z",
                     "None")  # fmt: skip
    assert shapes.fill(["<", 1, "|", 0, ">"], leaves) == "<d|7>"
    with pytest.raises(shapes.Unsupported):
        shapes.flatten({"x": {"a": 1}})
    with pytest.raises(shapes.Unsupported):
        shapes.flatten({"x": 1.5})
