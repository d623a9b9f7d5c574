"""Benchmark: `plan` and `render` for GB200 NVL72 specs of 1, 16 and 128 racks (72, 1152, 9216 GPUs).

Prints, per size, wall-time medians and [min-max] in-process (load + validate + place + compile,
then render), the ratios against the smaller sizes measured in the same run (linear: 16 racks /
1 rack = 16x, 128 racks / 16 racks = 8x), and the same work as a user runs it: new
`disaggctl plan --offline --output json` and `disaggctl render --out DIR` processes, against a
bare `python -c "import typer"` start and the 1-rack run.
Targets (issue 16): 128 racks < 1 s as a CLI process, linear in racks in-process.
Usage: python bench/plan_scale/run.py [--repeat N] [--racks 1,16,128] [--against OTHER/.venv/bin/disaggctl]
Results: bench/plan_scale/README.md
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
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
    """Wall times of a new process running ARGV, as a user runs it."""
    return rounds({"": argv}, repeat)[""][0]


def rounds(argvs: dict[str, list[str]], repeat: int, envs: dict[str, dict[str, str]] | None = None,
           ) -> dict[str, tuple[Times, Times]]:  # fmt: skip
    """Wall and CPU (user + sys) times of new processes running each ARGV, alternating within each
    round so that they share the machine's load. An `{out}` in an ARGV becomes a new folder each run
    (removing the last run's 9000 folders right before a run would time the disk's clean-up, not
    disaggctl)."""
    wall: dict[str, list[float]] = {k: [] for k in argvs}
    cpu: dict[str, list[float]] = {k: [] for k in argvs}
    for i in range(repeat):
        for label, argv in argvs.items():
            run_argv = [a.replace("{out}", f"-{label}{i}") for a in argv]
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(run_argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=(envs or {}).get(label))  # fmt: skip
            wall[label].append(time.perf_counter() - t0)
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[label].append(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime)
    return {k: (Times(wall[k]), Times(cpu[k])) for k in argvs}


def write_times(path: Path, repeat: int, tmp: Path) -> tuple[Times, Times, int, int]:
    """`render --out`'s disk part alone: write_rendered into a new folder each time, and the disk
    floor: a plain Python loop making the same folders (one mkdir each, parents first) and writing
    the same bytes to the same paths (os.open/os.write/os.close, mode at open, one thread),
    interleaved, each first in every other repeat."""
    loaded = load_spec(path)
    rendered = render(compile_spec(loaded), loaded.spec, {})
    files = [(f"{f.host}/{f.path.lstrip('/')}", f.content.encode(), f.mode) for f in rendered.files]
    folders = sorted({os.path.dirname(p) for p, _, _ in files})
    folders = sorted({parent for d in folders for parent in _parents(d)}, key=lambda d: d.count("/"))
    times, floor = [], []
    written: list[str] = []
    for i in range(repeat):
        for which in ("write", "floor") if i % 2 == 0 else ("floor", "write"):  # neither always first
            t0 = time.perf_counter()
            if which == "write":
                written = write_rendered(rendered, tmp / f"w{i}")
                times.append(time.perf_counter() - t0)
            else:
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


def cli_report(specs: dict[int, Path], repeat: int, tmp: Path, against: str | None) -> None:
    """`against`: another disaggctl (e.g. main's venv) run in the same rounds, each with its own cache folder."""
    exes = {"this": str(Path(sys.executable).with_name("disaggctl"))}
    if against:
        exes["against"] = against
    envs = {label: {**os.environ, "XDG_CACHE_HOME": str(tmp / f"cache-{label}")} for label in exes}
    floor = process_times([sys.executable, "-c", "import typer"], repeat)
    help_t = process_times([exes["this"], "--help"], repeat)
    print("\nCLI, a new process each run (median [min-max] s; CPU: user + sys)")
    print(f"python -c 'import typer' (the floor): {floor.show()}; disaggctl --help: {help_t.show()}")
    if against:
        print(f"this: {exes['this']}; against: {against} (alternating in each round)")
    base: dict[str, Times] = {}
    for racks, path in specs.items():
        for what, args in (
            ("plan --offline --output json", ["plan", "--offline", "--output", "json", str(path)]),
            ("render --out DIR", ["render", str(path), "--out", str(tmp / f"r{racks}") + "{out}"]),
        ):
            argvs = {label: [exe, *args] for label, exe in exes.items()}
            for label, argv in argvs.items():  # warm-up: the caches a user's second run finds
                subprocess.run([a.replace("{out}", f"-{label}-warm") for a in argv], check=True,
                               stdout=subprocess.DEVNULL, env=envs[label])  # fmt: skip
            measured = rounds(argvs, repeat, envs)
            for label, (t, cpu) in measured.items():
                key = f"{label} {what}"
                base.setdefault(key, t)
                verdict = ""
                if racks >= 128:
                    verdict = f" ({'within' if t.median < TARGET_S else 'OVER'} the {TARGET_S:.0f} s target)"
                vs = ""
                if label == "this" and against:
                    o_wall, o_cpu = measured["against"]
                    vs = f"; x{t.median / o_wall.median:.2f} against's wall, x{cpu.median / o_cpu.median:.2f} CPU"
                print(
                    f"{racks:>4} racks {label:>7} `{what}`: {t.show()}, CPU {cpu.median:.3f}; "
                    f"x{t.median / base[key].median:.1f} the {min(specs)}-rack run, "
                    f"+{t.median - floor.median:.2f} s over the floor{verdict}{vs}"
                )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--racks", default="1,16,128", help="comma-separated rack counts (ascending)")
    ap.add_argument("--no-cli", action="store_true", help="in-process only")
    ap.add_argument("--against", help="another disaggctl executable to run in the same rounds (e.g. main's)")
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
            cli_report(specs, args.repeat, tmp, args.against)
    return 0


if __name__ == "__main__":
    sys.exit(main())
