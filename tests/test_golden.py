"""Golden files: the rendered output of every example, file by file.

A change in rendering shows up here as a readable diff. To accept an intended change:
    DISAGGCTL_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
Machine-specific paths (this checkout, the venv, $HOME) are replaced by placeholders.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from disaggctl.compile import compile_spec
from disaggctl.loader import load_spec
from disaggctl.render import render
from tests.plugins.paths import EXAMPLES, REPO

GOLDEN = REPO / "tests" / "golden"
UPDATE = os.environ.get("DISAGGCTL_UPDATE_GOLDEN") == "1"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def normalize(text: str) -> str:
    home = os.path.expanduser("~")
    for value, placeholder in ((sys.prefix, "<venv>"), (str(REPO), "<repo>"), (home, "<home>")):
        if value and value != "/":
            text = text.replace(value, placeholder)
    return text


def rendered_tree(example: Path) -> dict[str, str]:
    loaded = load_spec(example)
    desired = compile_spec(loaded)
    rendered = render(desired, loaded.spec)  # as `render -o` writes it: secrets are placeholders
    return {normalize(f"{f.host}{f.path}"): normalize(f.content) for f in rendered.files}


@pytest.mark.parametrize("example", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_rendered_output_matches_golden(example: Path) -> None:
    tree = rendered_tree(example)
    assert tree, f"{example.name} rendered nothing"
    base = GOLDEN / example.stem
    if UPDATE:
        if base.exists():
            for old in sorted(base.rglob("*"), reverse=True):
                old.unlink() if old.is_file() else old.rmdir()
        for rel, content in tree.items():
            dest = base / rel.replace("<", "_").replace(">", "_")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(content)
    expected = {
        str(p.relative_to(base)): p.read_text() for p in sorted(base.rglob("*")) if p.is_file()
    } if base.exists() else {}
    got = {rel.replace("<", "_").replace(">", "_"): content for rel, content in tree.items()}
    assert sorted(got) == sorted(expected), "files differ: set DISAGGCTL_UPDATE_GOLDEN=1 to accept"
    for rel, content in got.items():
        assert content == expected[rel], f"{example.stem}/{rel} differs from its golden file"


def test_render_is_deterministic() -> None:
    example = EXAMPLES / "b200-xpyd-lmcache.yaml"
    assert rendered_tree(example) == rendered_tree(example)
