"""Benchmark: `plan` and `render` for GB200 NVL72 specs of 1, 16 and 128 racks (72, 1152, 9216 GPUs).

Prints, per size, wall-time medians and [min-max] in-process (load + validate + place + compile,
then render), the ratios against the smaller sizes measured in the same run (linear: 16 racks /
1 rack = 16x, 128 racks / 16 racks = 8x), and the same work as a user runs it: new
`disaggctl plan --offline --output json` and `disaggctl render --out DIR` processes, against a
bare `python -c "import typer"` start and the 1-rack run.
Targets (issue 16): 128 racks < 1 s as a CLI process, linear in racks in-process.
Usage: python bench/plan_scale/run.py [--repeat N] [--racks 1,16,128]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from disaggctl.compile import compile_spec
from disaggctl.loader import load_spec
from disaggctl.render import render
from disaggctl.render.output import write_rendered

TARGET_S = 1.0  # 128 racks, plan or render, as a CLI process


def rack_spec(racks: int) -> str:
    hosts = []
    for r in range(1, racks + 1):
        for t in range(1, 19):
            hosts.append(f"  - {{name: r{r:02d}-t{t:02d}, address: 10.{20 + r}.{t}.10, nvlink_domain: rack{r}}}")
    return f"""\
name: nvl72-x{racks}
profiles: [gb200-nvl72]
model:
  path: nvidia/Llama-3.1-405B-Instruct-FP4
  catalog: llama-3.1-405b
  quantization: modelopt_fp4
  kv_cache_dtype: fp8
hosts:
{chr(10).join(hosts)}
prefill: {{replicas: {4 * racks}, tensor_parallel: 8}}
decode: {{replicas: {20 * racks}, tensor_parallel: 2}}
kv_transfer: {{kind: nixl}}
router: {{host: r01-t01}}
target: {{kind: systemd}}
"""


@dataclass
class Times:
    """Wall times of one measurement, repeated."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def show(self) -> str:
        return f"{self.median:.3f} [{min(self.samples):.3f}-{max(self.samples):.3f}]"


@dataclass
class InProcess:
    plan: Times
    render: Times
    total: Times
    cpu: Times  # CPU time of the total: what linearity is judged on when others share the machine
    processes: int
    files: int


def measure(path: Path, repeat: int) -> InProcess:
    plan_t, render_t, total_t, cpu_t = [], [], [], []
    procs = files = 0
    for _ in range(repeat):
        c0 = time.process_time()
        t0 = time.perf_counter()
        loaded = load_spec(path)
        desired = compile_spec(loaded)
        t1 = time.perf_counter()
        rendered = render(desired, loaded.spec, {})
        t2 = time.perf_counter()
        cpu_t.append(time.process_time() - c0)
        plan_t.append(t1 - t0)
        render_t.append(t2 - t1)
        total_t.append(t2 - t0)
        procs, files = len(desired.processes), len(rendered.files)
    return InProcess(Times(plan_t), Times(render_t), Times(total_t), Times(cpu_t), procs, files)


def process_times(argv: list[str], repeat: int) -> Times:
    """Wall times of a new process running ARGV, as a user runs it. An `{out}` in ARGV becomes a new
    folder each run (removing the last run's 9000 folders right before a run would time the disk's
    clean-up, not disaggctl)."""
    times = []
    for i in range(repeat):
        run_argv = [a.replace("{out}", f"-{i}") for a in argv]
        t0 = time.perf_counter()
        subprocess.run(run_argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return Times(times)


def write_times(path: Path, repeat: int, tmp: Path) -> tuple[Times, Times, int, int]:
    """`render --out`'s disk part alone: write_rendered into a new folder each time, and the disk
    floor: a plain Python loop making the same folders (one mkdir each, parents first) and writing
    the same bytes to the same paths (os.open/os.write/os.close, mode at open), interleaved."""
    loaded = load_spec(path)
    rendered = render(compile_spec(loaded), loaded.spec, {})
    files = [(f"{f.host}/{f.path.lstrip('/')}", f.content.encode(), f.mode) for f in rendered.files]
    folders = sorted({os.path.dirname(p) for p, _, _ in files})
    folders = sorted({parent for d in folders for parent in _parents(d)}, key=lambda d: d.count("/"))
    times, floor = [], []
    written: list[str] = []
    for i in range(repeat):
        t0 = time.perf_counter()
        written = write_rendered(rendered, tmp / f"w{i}")
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _plain_loop(str(tmp / f"f{i}"), folders, files)
        floor.append(time.perf_counter() - t0)
    return Times(times), Times(floor), len(written), len(folders)


def _parents(folder: str) -> list[str]:
    parts = folder.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _plain_loop(root: str, folders: list[str], files: list[tuple[str, bytes, int]]) -> None:
    os.mkdir(root)
    for d in folders:
        os.mkdir(f"{root}/{d}")
    for rel, data, mode in files:
        fd = os.open(f"{root}/{rel}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.write(fd, data)
        os.close(fd)


def in_process_report(results: dict[int, InProcess]) -> None:
    print("in-process (median [min-max] s)")
    print(f"{'racks':>5} {'GPUs':>5} {'procs':>6} {'files':>6} {'plan s':>22} {'render s':>22} {'total s':>22}")
    for racks, r in results.items():
        print(
            f"{racks:>5} {racks * 72:>5} {r.processes:>6} {r.files:>6} {r.plan.show():>22} "
            f"{r.render.show():>22} {r.total.show():>22}"
        )
    sizes = sorted(results)
    for small, big in itertools.pairwise(sizes):
        a, b = results[small], results[big]
        print(
            f"ratio {big} racks / {small} racks: plan {b.plan.median / a.plan.median:.1f}x, render "
            f"{b.render.median / a.render.median:.1f}x, total {b.total.median / a.total.median:.1f}x; "
            f"CPU time {b.cpu.median / a.cpu.median:.1f}x (linear = {big / small:.0f}x)"
        )


def cli_report(specs: dict[int, Path], repeat: int, tmp: Path) -> None:
    exe = str(Path(sys.executable).with_name("disaggctl"))
    floor = process_times([sys.executable, "-c", "import typer"], repeat)
    help_t = process_times([exe, "--help"], repeat)
    print("\nCLI, a new process each run (median [min-max] s)")
    print(f"python -c 'import typer' (the floor): {floor.show()}; disaggctl --help: {help_t.show()}")
    base: dict[str, Times] = {}
    for racks, path in specs.items():
        for what, argv in (
            ("plan --offline --output json", [exe, "plan", "--offline", "--output", "json", str(path)]),
            ("render --out DIR", [exe, "render", str(path), "--out", str(tmp / f"r{racks}") + "{out}"]),
        ):
            t = process_times(argv, repeat)
            base.setdefault(what, t)
            verdict = ""
            if racks >= 128:
                verdict = f" ({'within' if t.median < TARGET_S else 'OVER'} the {TARGET_S:.0f} s target)"
            print(
                f"{racks:>4} racks `{what}`: {t.show()}; x{t.median / base[what].median:.1f} the "
                f"{min(specs)}-rack run, +{t.median - floor.median:.2f} s over the floor{verdict}"
            )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--racks", default="1,16,128", help="comma-separated rack counts (ascending)")
    ap.add_argument("--no-cli", action="store_true", help="in-process only")
    args = ap.parse_args()
    sizes = sorted(int(r) for r in args.racks.split(","))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        specs = {}
        for racks in sizes:
            specs[racks] = tmp / f"nvl72-x{racks}.yaml"
            specs[racks].write_text(rack_spec(racks))
        measure(specs[sizes[0]], 1)  # warm-up: imports, template compilation
        in_process_report({racks: measure(path, args.repeat) for racks, path in specs.items()})
        w, floor, files, folders = write_times(specs[sizes[-1]], args.repeat, tmp)
        print(
            f"{sizes[-1]} racks: writing {files} files in {folders} folders (render --out, the disk): {w.show()}; "
            f"the disk floor (a plain loop, same folders and bytes): {floor.show()}; "
            f"x{w.median / floor.median:.2f} the floor"
        )
        if not args.no_cli:
            cli_report(specs, args.repeat, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
