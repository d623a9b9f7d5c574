"""Small units (issue 10): no function over 60 lines and no class over 300 in disaggctl/, unless it
is listed here with the reason it stays long. A new long function fails this test."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "disaggctl"
MAX_FUNCTION, MAX_CLASS = 60, 300

# "path:name": why it is long (each is one straight sequence, not branches to split)
LONG = {
    "commands/probe.py:register": "the probe and topology commands: typer option declarations are most of the lines",
    "commands/size.py:size": "one typer option declaration per `size` flag; the body is a few calls",
    "compile.py:serve_args": "the vllm serve argv in vLLM's own flag order, one flag per line",
    "demo_model.py:build": "writes the tiny model's config, tokenizer and weights in order",
    "probe/smi_topo.py:parse_topo": "one pass over `nvidia-smi topo -m`'s matrix with its header hazards",
    "targets/systemd/changes.py:parse_observe": "one pass over the observe script's output sections",
}


def _long_units() -> dict[str, int]:
    out: dict[str, int] = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
                if lines > limit:
                    out[f"{rel}:{node.name}"] = lines
    return out


def test_no_unexplained_long_functions_or_classes() -> None:
    unexplained = {k: v for k, v in _long_units().items() if k not in LONG}
    assert not unexplained, f"split these or give the reason in LONG: {unexplained}"


def test_the_list_of_long_units_is_current() -> None:
    gone = sorted(set(LONG) - set(_long_units()))
    assert not gone, f"no longer long, remove from LONG: {gone}"
