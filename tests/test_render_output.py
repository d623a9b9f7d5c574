"""`disaggctl render --out DIR`: every file at DIR/<host>/<path>, with its content and mode, again and again."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from disaggctl.deployment import Rendered, RenderedFile
from disaggctl.render import output
from disaggctl.render.output import write_rendered


def _rendered(content: str) -> Rendered:
    return Rendered(
        target="systemd",
        files=[
            RenderedFile(host="a", path="/etc/systemd/system/x.service", content=content),
            RenderedFile(host="a", path="/etc/dctl/run.sh", content="#!/bin/sh\n", mode=0o755),
            RenderedFile(host="b", path="/etc/dctl/secrets.env", content="K=\"é\"\n", mode=0o600, secret=True),
        ],
    )


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_writes_every_file_with_its_mode_under_a_strict_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        written = [Path(p) for p in write_rendered(_rendered("[Unit]\n"), tmp_path)]
    finally:
        os.umask(old)
    assert written == [
        tmp_path / "a/etc/systemd/system/x.service",
        tmp_path / "a/etc/dctl/run.sh",
        tmp_path / "b/etc/dctl/secrets.env",
    ]
    assert written[0].read_text() == "[Unit]\n" and _mode(written[0]) == 0o644
    assert _mode(written[1]) == 0o755
    assert written[2].read_text(encoding="utf-8") == 'K="é"\n' and _mode(written[2]) == 0o600


def test_writing_again_replaces_changed_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    write_rendered(_rendered("old\n"), tmp_path)
    unit = tmp_path / "a/etc/systemd/system/x.service"
    os.chmod(unit, 0o600)
    write_rendered(_rendered("new\n"), tmp_path)
    assert unit.read_text() == "new\n" and _mode(unit) == 0o644
    assert not list(tmp_path.rglob("*.tmp"))


def test_writing_the_same_again_leaves_files_alone_and_a_link_is_replaced(tmp_path: Path) -> None:
    write_rendered(_rendered("same\n"), tmp_path)
    unit = tmp_path / "a/etc/systemd/system/x.service"
    script = tmp_path / "a/etc/dctl/run.sh"
    before = unit.stat().st_ino
    os.chmod(script, 0o644)  # same bytes, another mode: replaced
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text('K="é"\n')
    secrets = tmp_path / "b/etc/dctl/secrets.env"
    secrets.unlink()
    secrets.symlink_to(elsewhere)  # a link to the same bytes: replaced by the file itself
    write_rendered(_rendered("same\n"), tmp_path)
    assert unit.stat().st_ino == before and unit.read_text() == "same\n"
    assert _mode(script) == 0o755 and script.read_text() == "#!/bin/sh\n"
    assert not secrets.is_symlink() and _mode(secrets) == 0o600 and elsewhere.read_text() == 'K="é"\n'


def _tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        p.relative_to(root).as_posix(): (_mode(p), p.read_bytes() if p.is_file() else b"")
        for p in sorted(root.rglob("*"))
    }


def test_threads_write_the_same_tree_and_an_error_in_one_is_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [
        RenderedFile(host=f"h{i % 7}", path=f"/etc/d{i % 3}/f{i}.conf", content=f"{i}\n" * i, mode=0o600 + (i % 2) * 4)
        for i in range(60)
    ]
    rendered = Rendered(target="systemd", files=files)
    one = write_rendered(rendered, tmp_path / "one")
    monkeypatch.setattr(output, "PARALLEL_FROM", 2)
    monkeypatch.setattr(output, "WORKERS", 3)
    monkeypatch.setattr(output.os, "cpu_count", lambda: 3)
    three = write_rendered(rendered, tmp_path / "three")
    assert [p.replace("/three/", "/one/") for p in three] == one
    assert _tree(tmp_path / "three") == _tree(tmp_path / "one") and len(_tree(tmp_path / "one")) == 60 + 7 * 5
    (tmp_path / "bad" / "h5").mkdir(parents=True)
    (tmp_path / "bad" / "h5" / "etc").write_text("not a folder")
    with pytest.raises(FileExistsError):  # a file where a folder goes
        write_rendered(rendered, tmp_path / "bad")
    assert (tmp_path / "bad" / "h1" / "etc" / "d1" / "f1.conf").read_text() == "1\n"  # the other threads finished
