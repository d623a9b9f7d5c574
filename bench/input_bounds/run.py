"""Benchmark: how fast hostile specs are refused, against loading the largest real spec.

The baseline is the 128-rack GB200 NVL72 spec of bench/plan_scale (load + validate, no placement),
measured in the same run; each hostile file (billion laughs, a 4 MB spec of bad hosts, a spec just
under the event bound with thousands of errors, 500-deep nesting, /dev/zero) is timed until it is
refused, and printed as a ratio to the baseline. Target: every hostile file < 5x the baseline.
Usage: python bench/input_bounds/run.py [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plan_scale"))

from run import rack_spec  # type: ignore[import-not-found]

from disaggctl.errors import SpecError
from disaggctl.loader import load_spec


def hostile(d: Path) -> dict[str, Path]:
    laughs = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    laughs += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    head = "name: demo\nmodel: {path: m}\nkv_transfer: {kind: nixl}\ntarget: {kind: systemd}\nhosts:\n"
    bad = '  - {{name: "a b{}", gpus: -1, address: 1.2.3.999}}\n'
    files = {
        "billion-laughs": "\n".join(laughs) + "\n",
        "4MB-bad-hosts": head + "".join(bad.format(i) for i in range(78000)),
        "6k-bad-hosts": head + "".join(bad.format(i) for i in range(6000)),
        "deep-500": "a: " + "[" * 500 + "]" * 500 + "\n",
    }
    out = {}
    for name, text in files.items():
        p = d / f"{name}.yaml"
        p.write_text(text)
        out[name] = p
    out["/dev/zero"] = Path("/dev/zero")
    return out


def timed(path: Path, repeat: int, refused: bool) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        try:
            load_spec(path)
            assert not refused, f"{path} was accepted"
        except SpecError:
            assert refused, f"{path} was refused"
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        base = d / "nvl72-x128.yaml"
        base.write_text(rack_spec(128))
        t_base = timed(base, args.repeat, refused=False)
        print(f"baseline: 128-rack GB200 spec loads in {t_base * 1000:.0f} ms")
        worst = 0.0
        for name, path in hostile(d).items():
            t = timed(path, args.repeat, refused=True)
            worst = max(worst, t / t_base)
            print(f"{name:>16}: refused in {t * 1000:6.0f} ms = {t / t_base:5.2f}x baseline")
        print(f"worst ratio {worst:.2f}x (target < 5x)")


if __name__ == "__main__":
    main()
