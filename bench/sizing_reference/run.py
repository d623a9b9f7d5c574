"""Benchmark: `disaggctl size` against references - AIConfigurator and published measurements.

For every case of cases.json it runs `disaggctl size ... --output json` in-process and compares
its verdict (aggregated or disaggregated) and its best throughput per GPU with the reference:

* AIConfigurator 0.12 (`aiconfigurator cli default`, vLLM perf database): run live with
  `--aic BIN` (or $AIC_BIN), else the results recorded in aic_recorded.json (`--record`
  rewrites that file from a live run);
* published measurements (published.json, each with its source): throughput only, unless the
  source states a verdict.

Prints per case both verdicts, the reference's margin, the throughput ratio (ours / theirs),
the wall time of our run, and the summary line `agree X/Y, within 30%: Z/W`, where Y counts
the cases whose reference margin is at least 10% and W every case with a reference throughput.
Usage: python bench/sizing_reference/run.py [--aic BIN] [--record] [--case ID ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from disaggctl.cli import app
from disaggctl.sizing.search import DISAGG_MARGIN

HERE = Path(__file__).resolve().parent
MARGIN = 1.10  # the reference's margin from which verdicts must agree
WITHIN = 0.30  # throughput per GPU within 30%
_BEST = re.compile(r"Best Experiment Chosen: (\w+) at ([\d,.]+) tokens/s/gpu \((\w+) ([\d.]+)x better than (\w+)\)")
_LAT = re.compile(r"- (TTFT|TPOT): ([\d,.]+)ms")


def ours(case: dict[str, Any]) -> dict[str, Any]:
    """Run `disaggctl size` in-process; verdict, best tokens/s per GPU, arms and wall time."""
    args = ["size", "--model", case["model"], "--isl", str(case["isl"]), "--osl", str(case["osl"]),
            "--ttft", str(case["ttft"]), "--tpot", str(case["tpot"]), "--output", "json"]
    args += ["--gpu", case["gpu"], "--gpus", str(case["gpus"])]
    for opt, key in (("--quantization", "quantization"), ("--kv-cache-dtype", "kv"), ("--percentile", "percentile")):
        if case.get(key):
            args += [opt, str(case[key])]
    with tempfile.TemporaryDirectory() as tmp:
        env = {"DISAGGCTL_CALIBRATION": str(Path(tmp) / "none.json")}
        t0 = time.perf_counter()
        res = CliRunner().invoke(app, args, env=env)
        wall = time.perf_counter() - t0
    if res.exit_code != 0:
        return {"verdict": f"exit {res.exit_code}", "tps_per_gpu": None, "wall_s": wall,
                "error": (res.stderr or res.output).strip().splitlines()[-1:]}
    doc = json.loads(res.stdout)
    best = doc["recommendation"]
    arms = doc["arms"] or {}
    ratio = arms.get("disaggregation_ratio")
    rec = "disagg" if best["mode"] == "disaggregated" else "agg"
    # the verdict compared with the reference is which arm is faster (the reference picks the faster
    # one with no margin); the recommendation adds disaggctl's DISAGG_MARGIN and is printed beside it
    verdict = rec if ratio is None else ("disagg" if ratio > 1 else "agg")
    tps = max((a["tps_per_gpu"] for k, a in arms.items() if isinstance(a, dict)), default=best["tps_per_gpu"])
    return {"verdict": verdict, "recommended": rec, "tps_per_gpu": tps, "ratio": ratio, "layout": best["layout"],
            "wall_s": wall}


def aic_live(case: dict[str, Any], binary: str) -> dict[str, Any] | None:
    a = case["aic"]
    cmd = [binary, "cli", "default", "--model-path", a["model"], "--system", a["system"], "--backend", "vllm",
           "--total-gpus", str(case["gpus"]), "--isl", str(case["isl"]), "--osl", str(case["osl"]),
           "--ttft", str(case["ttft"]), "--tpot", str(case["tpot"]), "--top-n", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = subprocess.run([*cmd, "--save-dir", tmp], capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - t0
    return parse_aic(out.stdout + out.stderr, wall)


def parse_aic(text: str, wall: float | None = None) -> dict[str, Any] | None:
    m = _BEST.search(text)
    if not m:
        return None
    mode, best, _, margin, _ = m.groups()
    lat = {k.lower() + "_ms": float(v.replace(",", "")) for k, v in _LAT.findall(text)}
    return {"verdict": "disagg" if mode == "disagg" else "agg", "tps_per_gpu": float(best.replace(",", "")),
            "margin": float(margin), "wall_s": wall, **lat}


def references(cases: list[dict[str, Any]], binary: str | None, record: bool) -> dict[str, dict[str, Any]]:
    recorded_path = HERE / "aic_recorded.json"
    recorded = json.loads(recorded_path.read_text())["results"] if recorded_path.exists() else {}
    out: dict[str, dict[str, Any]] = {}
    for c in cases:
        if "aic" not in c:
            continue
        r = aic_live(c, binary) if binary else recorded.get(c["id"])
        if r is not None:
            out[c["id"]] = {**r, "source": "AIConfigurator 0.12 " + ("(live)" if binary else "(recorded)")}
    if record and binary:
        doc = {"about": "AIConfigurator 0.12.0 `cli default --backend vllm` (perf database vLLM 0.24.0), "
                        "best experiment per case, recorded by bench/sizing_reference/run.py --record",
               "results": {k: {x: v.get(x) for x in ("verdict", "tps_per_gpu", "margin", "wall_s", "ttft_ms",
                                                     "tpot_ms")} for k, v in out.items()}}
        recorded_path.write_text(json.dumps(doc, indent=1) + "\n")
    return out


def published(cases: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    doc = json.loads((HERE / "published.json").read_text())
    extra = [p["case"] for p in doc["results"]]
    refs = {p["case"]["id"]: {"verdict": p.get("verdict"), "tps_per_gpu": p["tps_per_gpu"],
                              "margin": p.get("margin"), "tokens": p.get("tokens", "output"), "source": p["source"]}
            for p in doc["results"]}
    return extra, refs


def compare(case: dict[str, Any], mine: dict[str, Any], ref: dict[str, Any]) -> tuple[bool | None, float | None]:
    """(verdicts agree, or None when not counted; throughput ratio ours / reference)."""
    counted = ref.get("verdict") and (ref.get("margin") or 0) >= MARGIN - 1e-9
    agree = (mine["verdict"] == ref["verdict"]) if counted else None
    ours_tps = mine.get("tps_per_gpu")
    if ours_tps and ref.get("tokens") == "total":  # the reference counts input and output tokens
        ours_tps *= (case["isl"] + case["osl"]) / case["osl"]
    ratio = ours_tps / ref["tps_per_gpu"] if ours_tps and ref.get("tps_per_gpu") else None
    return agree, ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aic", default=os.environ.get("AIC_BIN"), help="aiconfigurator executable (live run)")
    ap.add_argument("--record", action="store_true", help="write the live AIConfigurator results to aic_recorded.json")
    ap.add_argument("--case", action="append", help="only these case ids")
    a = ap.parse_args()
    cases = json.loads((HERE / "cases.json").read_text())["cases"]
    extra, pub = published(cases)
    cases = [c for c in cases + extra if not a.case or c["id"] in a.case]
    refs = {**pub, **references(cases, a.aic, a.record)}
    agree = counted = within = compared = rec_agree = 0
    valid = [0, 0, 0, 0]  # agree, counted, within, compared over references that meet their own SLA
    walls: list[float] = []
    print(f"{'case':30s} {'ours':7s} {'(x)':>5s} {'rec':6s} {'ref':7s} {'margin':>6s} {'ours tok/s/GPU':>14s} "
          f"{'ref':>8s} {'ratio':>6s} {'wall s':>6s}  reference")
    for c in cases:
        ref = refs.get(c["id"])
        if ref is None:
            continue
        mine = ours(c)
        walls.append(mine["wall_s"])
        ok, ratio = compare(c, mine, ref)
        counted += ok is not None
        agree += bool(ok)
        rec_agree += ok is not None and mine.get("recommended") == ref["verdict"]
        compared += ratio is not None or mine.get("tps_per_gpu") is None
        within += ratio is not None and abs(ratio - 1) <= WITHIN
        misses = (ref.get("ttft_ms") or 0) > c["ttft"] * 1.001 or (ref.get("tpot_ms") or 0) > c["tpot"] * 1.001
        if not misses:
            valid[0] += bool(ok)
            valid[1] += ok is not None
            valid[2] += ratio is not None and abs(ratio - 1) <= WITHIN
            valid[3] += ratio is not None or mine.get("tps_per_gpu") is None
        margin = f"{ref['margin']:.2f}" if ref.get("margin") else "-"
        mark = ("" if ok is None else (" ok" if ok else " DIFF")) + (
            f" [reference misses its own SLA: TTFT {ref['ttft_ms']:.0f} ms, TPOT {ref['tpot_ms']:.1f} ms]"
            if misses else "")
        dis = f"{mine['ratio']:.2f}" if mine.get("ratio") else "-"
        print(f"{c['id']:30s} {mine['verdict']:7s} {dis:>5s} {mine.get('recommended', '-'):6s} "
              f"{ref.get('verdict') or '-'!s:7s} {margin:>6s} "
              f"{(mine.get('tps_per_gpu') or 0):14.0f} {ref['tps_per_gpu']:8.0f} "
              f"{(f'{ratio:.2f}' if ratio else '-'):>6s} {mine['wall_s']:6.2f}  {ref['source']}{mark}"
              + (f"  [{mine['error']}]" if mine.get("error") else ""))
    print(f"agree {agree}/{counted}, within 30%: {within}/{compared}")
    print(f"(the recommendation, with disaggctl's {DISAGG_MARGIN:.2f}x margin, agrees {rec_agree}/{counted}; "
          f"over the references that meet their own SLA: agree {valid[0]}/{valid[1]}, "
          f"within 30%: {valid[2]}/{valid[3]})")
    if walls:
        print(f"disaggctl size wall time per case (in-process): max {max(walls):.2f} s, "
              f"mean {sum(walls) / len(walls):.2f} s")
    t0 = time.perf_counter()
    exe = str(Path(sys.executable).parent / "disaggctl")
    subprocess.run([exe, "size", "--model", "llama-3.1-70b", "--gpu", "gb200", "--gpus", "72", "--isl", "8192",
                    "--osl", "1024", "--output", "json"], capture_output=True)
    print(f"one full CLI process (GB200 x 72, 70B, interpreter start included): {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
