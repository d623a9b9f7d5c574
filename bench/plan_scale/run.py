"""Benchmark: `plan` and `render` for GB200 NVL72 specs of 1 and 16 racks (72 and 1152 GPUs).

Prints wall-time medians (in-process: load + validate + place + compile, then render) and
the 16-rack / 1-rack ratio, which should be about 16 (linear). Target: 16 racks < 2 s.
Usage: python bench/plan_scale/run.py [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from disaggctl.compile import compile_spec
from disaggctl.loader import load_spec
from disaggctl.render import render


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


def measure(path: Path, repeat: int) -> tuple[float, float, int, int]:
    plan_times, render_times = [], []
    procs = files = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        loaded = load_spec(path)
        desired = compile_spec(loaded)
        t1 = time.perf_counter()
        rendered = render(desired, loaded.spec, {})
        t2 = time.perf_counter()
        plan_times.append(t1 - t0)
        render_times.append(t2 - t1)
        procs, files = len(desired.processes), len(rendered.files)
    return statistics.median(plan_times), statistics.median(render_times), procs, files


def cli_median(args: list[str], repeat: int) -> float:
    """Median wall time of `disaggctl ARGS` as a user runs it (a new process each time)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("disaggctl")), *args], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for racks in (1, 16):
            path = Path(tmp) / f"nvl72-x{racks}.yaml"
            path.write_text(rack_spec(racks))
            results[racks] = measure(path, args.repeat)
        cli16 = cli_median(["plan", "--offline", "--output", "json", str(Path(tmp) / "nvl72-x16.yaml")], args.repeat)
        cli1 = cli_median(["plan", "--offline", "--output", "json", str(Path(tmp) / "nvl72-x1.yaml")], args.repeat)
        help_s = cli_median(["--help"], args.repeat)
    print(f"{'racks':>5} {'GPUs':>5} {'processes':>9} {'files':>6} {'plan s':>8} {'render s':>9} {'total s':>8}")
    for racks, (p, r, procs, files) in results.items():
        print(f"{racks:>5} {racks * 72:>5} {procs:>9} {files:>6} {p:>8.3f} {r:>9.3f} {p + r:>8.3f}")
    one, sixteen = results[1], results[16]
    ratio = (sixteen[0] + sixteen[1]) / (one[0] + one[1])
    print(f"ratio 16 racks / 1 rack: plan {sixteen[0] / one[0]:.1f}x, render {sixteen[1] / one[1]:.1f}x, "
          f"total {ratio:.1f}x (linear = 16x)")
    total16 = sixteen[0] + sixteen[1]
    print(f"16 racks total {total16:.2f} s: {'within' if total16 < 2 else 'OVER'} the 2 s target")
    print(f"CLI `plan --offline --output json` (new process): 1 rack {cli1:.2f} s, 16 racks {cli16:.2f} s "
          f"({'within' if cli16 < 2 else 'OVER'} 2 s), ratio {cli16 / cli1:.1f}x")
    print(f"CLI `disaggctl --help`: {help_s * 1000:.0f} ms ({'within' if help_s < 0.3 else 'OVER'} the 0.3 s target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
