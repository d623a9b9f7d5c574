"""The compiled-template cache of render/templates.py: same output with and without it, a damaged
or unusable cache is skipped, a changed template is compiled again (jinja2 checks its source)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from disaggctl.render import templates


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
    """What a new process starts with: no environment, no texts loaded, nothing to write."""
    templates.environment.cache_clear()
    templates._rendered.cache_clear()
    templates._sources.cache_clear()
    templates._dirty.clear()


T = {"deployment": "d", "host": "h", "description": "x", "services": ["a.service"]}


def test_rendered_texts_are_remembered_across_runs_without_jinja2(cache_home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from disaggctl.render.systemd import TargetContext

    _fresh_process()
    ctx = TargetContext(**T)  # type: ignore[arg-type]
    text = templates.render("systemd", "target.j2", t=ctx)
    assert text == templates.environment("systemd").get_template("target.j2").render(t=ctx)
    templates._flush()
    stored = cache_home / "disaggctl" / "render" / "systemd.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    _fresh_process()

    def no_jinja(*a: object, **kw: object) -> None:
        raise AssertionError("rendered again")

    with monkeypatch.context() as m:
        m.setattr(templates, "environment", no_jinja)
        assert templates.render("systemd", "target.j2", t=ctx) == text  # a later run: from the file
        with pytest.raises(AssertionError, match="rendered again"):  # another context: rendered
            templates.render("systemd", "target.j2", t=TargetContext(**{**T, "host": "h2"}))  # type: ignore[arg-type]
    stored.write_text("{damaged")
    _fresh_process()
    assert templates.render("systemd", "target.j2", t=ctx) == text


def test_a_changed_template_is_rendered_again(cache_home: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from disaggctl.render.systemd import TargetContext

    root = tmp_path / "data2"
    shutil.copytree(templates.data_dir("templates") / "systemd", root / "systemd")
    monkeypatch.setattr(templates, "data_dir", lambda name: root)
    _fresh_process()
    ctx = TargetContext(**T)  # type: ignore[arg-type]
    before = templates.render("systemd", "target.j2", t=ctx)
    templates._flush()
    (root / "systemd" / "target.j2").write_text((root / "systemd" / "target.j2").read_text() + "# more\n")
    _fresh_process()
    assert templates.render("systemd", "target.j2", t=ctx) == before + "# more\n"
    _fresh_process()
