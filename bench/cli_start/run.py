"""Benchmark: how fast the `disaggctl` command line starts, against a bare `import typer`.

Each row is a new process, as a user runs it; the rows alternate within each round so they see
the same machine load. Prints medians of wall time and of CPU time (user + sys of the child,
steadier than wall on a shared machine) and both ratios to the baseline `python -c "import
typer"`. Target (issue 16, item 2): `--help` and `validate` of a small spec within 1.6x.
Informative rows: `import typer, yaml` and pydantic's BaseModel (what any command that reads a
YAML spec into pydantic models imports, before building a single model), the same plus one
one-field model (the floor of any typer command that validates through pydantic) and `--version`.

    .venv/bin/python bench/cli_start/run.py [--repeat 15] [--importtime] [--instructions] [--base VENV]

--importtime also prints, per command, the modules that cost most to import (`python -X
importtime`, cumulative microseconds of top-level imports). --instructions also counts each row's
instructions once under valgrind (cachegrind, no cache simulation; PYTHONHASHSEED=0): steadier
than time on a shared machine. --base VENV adds every disaggctl row run with VENV's `disaggctl`
(e.g. /work/main/.venv: the code before a change), alternating with the others in each round.
Each side gets its own cache folder (XDG_CACHE_HOME, filled by the warm-up round): the UCX version
cache (compat/transfer.py) is keyed by the library's path, which differs between venvs.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
CLI = [str(Path(PY).with_name("disaggctl"))]  # the console script a user runs
TARGET = 1.6
CACHE = Path(tempfile.mkdtemp(prefix="cli_start."))

FLOOR = "typer, yaml, pydantic + 1 model"
FLOOR_CODE = "import typer, yaml, pydantic\nclass M(pydantic.BaseModel):\n    x: int\nM(x=1)"
LIBRARY_ROWS: list[tuple[str, list[str]]] = [
    ("import typer (baseline)", [PY, "-c", "import typer"]),
    ("import typer, pydantic.main, yaml", [PY, "-c", "import typer, yaml; from pydantic import BaseModel"]),
    (FLOOR, [PY, "-c", FLOOR_CODE]),
]


def cli_rows(cli: list[str], suffix: str = "") -> list[tuple[str, list[str]]]:
    """The disaggctl rows, run with the console script cli."""
    return [
        (f"disaggctl --version{suffix}", [*cli, "--version"]),
        (f"disaggctl --help{suffix}", [*cli, "--help"]),
        (f"disaggctl validate --help{suffix}", [*cli, "validate", "--help"]),
        (f"validate local-cpu.yaml{suffix}", [*cli, "validate", str(REPO / "examples/local-cpu.yaml")]),
        (f"validate b200-1p1d-nixl.yaml{suffix}", [*cli, "validate", str(REPO / "examples/b200-1p1d-nixl.yaml")]),
    ]


ROWS = LIBRARY_ROWS + cli_rows(CLI)
TARGETS = ("disaggctl --help", "validate local-cpu.yaml", "validate b200-1p1d-nixl.yaml")
VS_FLOOR = ("validate local-cpu.yaml", "validate b200-1p1d-nixl.yaml")


def _base_rows(venv: str) -> list[tuple[str, list[str]]]:
    script = Path(venv) / "bin" / "disaggctl"
    if not script.exists():
        raise SystemExit(f"--base {venv}: no {script}")
    return cli_rows([str(script)], " [base]")


def _env(name: str) -> dict[str, str]:
    side = "base" if name.endswith(" [base]") else "head"
    return dict(os.environ, COLUMNS="100", XDG_CACHE_HOME=str(CACHE / side))


def once(name: str, argv: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one run of argv."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, cwd=REPO, env=_env(name))
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


def instructions(name: str, argv: list[str]) -> int:
    """Instructions one run of argv executes (valgrind cachegrind without cache simulation)."""
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", *argv]
    env = dict(_env(name), PYTHONHASHSEED="0")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    found = re.search(r"I\s+refs:\s+([\d,]+)", r.stderr)
    if r.returncode or not found:
        raise SystemExit(f"{cmd} exited {r.returncode}:\n{r.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def _mark(name: str, ratio: float, floor: float | None) -> str:
    mark = ""
    if name.removesuffix(" [base]") in TARGETS:
        mark = "  within 1.6x" if ratio <= TARGET else "  OVER 1.6x"
    if floor and name.removesuffix(" [base]") in VS_FLOOR:
        mark += f", {floor:.2f}x floor"
    return mark


def print_times(rows: list[tuple[str, list[str]]], walls: dict[str, list[float]], cpus: dict[str, list[float]]) -> None:
    base_w, base_c = statistics.median(walls[ROWS[0][0]]), statistics.median(cpus[ROWS[0][0]])
    floor_w = statistics.median(walls[FLOOR])
    print(f"{'command':<36} {'wall ms':>8} {'range':>13} {'ratio':>6} {'CPU ms':>7} {'ratio':>6}")
    for name, _ in rows:
        w, c = statistics.median(walls[name]), statistics.median(cpus[name])
        rng = f"{min(walls[name]) * 1000:.0f}-{max(walls[name]) * 1000:.0f}"
        mark = _mark(name, w / base_w, w / floor_w)
        print(f"{name:<36} {w * 1000:8.0f} {rng:>13} {w / base_w:5.2f}x {c * 1000:7.0f} {c / base_c:5.2f}x{mark}")


def print_instructions(rows: list[tuple[str, list[str]]]) -> None:
    if shutil.which("valgrind") is None:
        print("\n--instructions: valgrind is not installed; skipped")
        return
    counts = {name: instructions(name, argv) for name, argv in rows}
    base, floor = counts[ROWS[0][0]], counts[FLOOR]
    print(f"\nInstructions (valgrind, one run each)\n{'command':<36} {'Minstr':>8} {'ratio':>6}")
    for name, _ in rows:
        n = counts[name]
        print(f"{name:<36} {n / 1e6:8.0f} {n / base:5.2f}x{_mark(name, n / base, n / floor)}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--importtime", action="store_true")
    ap.add_argument("--instructions", action="store_true")
    ap.add_argument("--base", metavar="VENV", help="also run the disaggctl rows with VENV/bin/disaggctl")
    args = ap.parse_args()
    rows = list(ROWS)
    if args.base:
        base_rows = _base_rows(args.base)
        rows = LIBRARY_ROWS + [r for pair in zip(base_rows, ROWS[len(LIBRARY_ROWS):], strict=True) for r in pair]
    for name, argv in rows:  # warm the file cache, the .pyc files and the UCX version cache
        once(name, argv)
    walls: dict[str, list[float]] = {name: [] for name, _ in rows}
    cpus: dict[str, list[float]] = {name: [] for name, _ in rows}
    for _ in range(args.repeat):
        for name, argv in rows:
            w, c = once(name, argv)
            walls[name].append(w)
            cpus[name].append(c)
    print(f"CLI start, medians of {args.repeat} (a new process each; {os.cpu_count()} cores)")
    print_times(rows, walls, cpus)
    if args.instructions:
        print_instructions(rows)
    if args.importtime:
        for name, argv in ROWS[len(LIBRARY_ROWS):]:
            print(f"\n{name}: costliest imports")
            print("\n".join(importtime(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
