"""Run the real `disaggctl` entry point (cli.main: the error boundary) in-process, capturing its output."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from disaggctl import cli


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def first(self) -> str:
        return (self.err.splitlines() or [""])[0]


def run_main(*args: str, cwd: Path | None = None) -> Result:
    """`disaggctl ARGS` through cli.main, as a user runs it (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["disaggctl", *args]
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(one_shot=False)  # the test process lives on: keep its collector
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return Result(code, out.getvalue(), err.getvalue())


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its content (what "nothing was written" compares)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
