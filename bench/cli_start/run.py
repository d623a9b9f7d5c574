"""Benchmark: how fast the `disaggctl` command line starts, against a bare `import typer`.

Each row is a new process, as a user runs it; the rows alternate within each round so they see
the same machine load. Prints medians of wall time and of CPU time (user + sys of the child,
steadier than wall on a shared machine) and both ratios to the baseline `python -c "import
typer"`. Target (issue 16, item 2): `--help` and `validate` of a small spec within 1.6x.
Informative rows: `import typer, yaml` and pydantic's BaseModel (what any command that reads a
YAML spec into pydantic models imports, before building a single model) and `--version`.

    .venv/bin/python bench/cli_start/run.py [--repeat 15] [--importtime]

--importtime also prints, per command, the modules that cost most to import (`python -X
importtime`, cumulative microseconds of top-level imports).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
CLI = [str(Path(PY).with_name("disaggctl"))]  # the console script a user runs
TARGET = 1.6

ROWS: list[tuple[str, list[str]]] = [
    ("import typer (baseline)", [PY, "-c", "import typer"]),
    ("import typer, pydantic.main, yaml", [PY, "-c", "import typer, yaml; from pydantic import BaseModel"]),
    ("disaggctl --version", [*CLI, "--version"]),
    ("disaggctl --help", [*CLI, "--help"]),
    ("disaggctl validate --help", [*CLI, "validate", "--help"]),
    ("validate local-cpu.yaml", [*CLI, "validate", str(REPO / "examples/local-cpu.yaml")]),
    ("validate b200-1p1d-nixl.yaml", [*CLI, "validate", str(REPO / "examples/b200-1p1d-nixl.yaml")]),
]
TARGET_ROWS = {"disaggctl --help", "validate local-cpu.yaml", "validate b200-1p1d-nixl.yaml"}


def once(argv: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one run of argv."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, cwd=REPO, env=dict(os.environ, COLUMNS="100"))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise SystemExit(f"{argv} exited {r.returncode}:\n{r.stderr.decode()}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def importtime(argv: list[str], top: int = 8) -> list[str]:
    """The costliest top-level imports of one run (cumulative us)."""
    cmd = [PY, "-X", "importtime", *argv[1:]] if argv[0] == PY else [PY, "-X", "importtime", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    rows = []
    for line in r.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].startswith(" ") and not parts[2].startswith("  "):
            try:
                rows.append((int(parts[1]), parts[2].strip()))
            except ValueError:
                continue
    rows.sort(reverse=True)
    return [f"    {us / 1000:7.1f} ms  {name}" for us, name in rows[:top]]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--importtime", action="store_true")
    args = ap.parse_args()
    for _, argv in ROWS:  # warm the file cache and the .pyc files
        once(argv)
    walls: dict[str, list[float]] = {name: [] for name, _ in ROWS}
    cpus: dict[str, list[float]] = {name: [] for name, _ in ROWS}
    for _ in range(args.repeat):
        for name, argv in ROWS:
            w, c = once(argv)
            walls[name].append(w)
            cpus[name].append(c)
    base_w, base_c = statistics.median(walls[ROWS[0][0]]), statistics.median(cpus[ROWS[0][0]])
    print(f"CLI start, medians of {args.repeat} (a new process each; {os.cpu_count()} cores)")
    print(f"{'command':<32} {'wall ms':>8} {'range':>13} {'ratio':>6} {'CPU ms':>7} {'ratio':>6}")
    for name, _ in ROWS:
        w, c = statistics.median(walls[name]), statistics.median(cpus[name])
        rng = f"{min(walls[name]) * 1000:.0f}-{max(walls[name]) * 1000:.0f}"
        mark = ""
        if name in TARGET_ROWS:
            mark = "  within 1.6x" if w / base_w <= TARGET else "  OVER 1.6x"
        print(f"{name:<32} {w * 1000:8.0f} {rng:>13} {w / base_w:5.2f}x {c * 1000:7.0f} {c / base_c:5.2f}x{mark}")
    if args.importtime:
        for name, argv in ROWS[2:]:
            print(f"\n{name}: costliest imports")
            print("\n".join(importtime(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
