#!/usr/bin/env python3
"""Router overhead benchmark: builtin router vs direct engine calls vs vllm-router.

Starts two stand-in engines (NIXL producer + consumer, zero added latency), the builtin
router (`python -m disaggctl.router`, always disaggregated) and vllm-router
(`--vllm-pd-disaggregation`), all on loopback. For each concurrency it sends the same bounded
number of non-streaming /v1/completions requests through each of three paths:

  direct       the client makes the two calls itself (prefill with max_tokens 1 and
               do_remote_decode, then decode with the returned kv_transfer_params)
  builtin      one call to the builtin router
  vllm-router  one call to vllm-router

and prints p50/p99 latency, throughput, the added latency over `direct`, and the ratios.
Run: .venv/bin/python bench/router/run.py [--requests 2000] [--concurrency 1,64]
The machine's cores are shared by the load generator, the engines and the router: numbers are
relative, comparable only within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from disaggctl.router.server import NIXL_PREFILL_PARAMS  # what the router sends, for the direct baseline

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "support" / "standin_engine.py"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 8  # ~90 tokens: long enough to disaggregate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not healthy after {timeout} s")


class Procs:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        log.close()
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


async def one_direct(s: aiohttp.ClientSession, prefill: str, decode: str, body: dict[str, object], i: int) -> None:
    pbody = dict(body, max_tokens=1, stream=False, kv_transfer_params=NIXL_PREFILL_PARAMS)
    hdr = {"X-Request-Id": f"bench-{i}"}
    async with s.post(prefill + "/v1/completions", json=pbody, headers=hdr) as r:
        ktp = (await r.json(content_type=None))["kv_transfer_params"]
        assert r.status == 200
    async with s.post(decode + "/v1/completions", json=dict(body, kv_transfer_params=ktp), headers=hdr) as r:
        await r.read()
        assert r.status == 200, r.status


async def one_routed(s: aiohttp.ClientSession, url: str, body: dict[str, object], i: int) -> None:
    async with s.post(url + "/v1/completions", json=body) as r:
        await r.read()
        assert r.status == 200, r.status


def cpu_seconds(pid: int | None) -> float:
    """user+system CPU of a process (all threads) from /proc: robust to other load on the machine."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    mode: str, urls: dict[str, str], concurrency: int, n: int, max_tokens: int, pid: int | None = None
) -> dict[str, float]:
    body: dict[str, object] = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    lat: list[float] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:

        async def call(i: int) -> None:
            if mode == "direct":
                await one_direct(s, urls["prefill"], urls["decode"], body, i)
            else:
                await one_routed(s, urls[mode], body, i)

        for i in range(min(50, n)):  # warm the connection pools
            await call(i)
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                t = time.perf_counter()
                await call(i)
                lat.append(time.perf_counter() - t)

        cpu0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0
    lat.sort()
    return {
        "p50": statistics.median(lat) * 1000,
        "p99": lat[int(len(lat) * 0.99) - 1] * 1000,
        "rps": n / wall,
        "n": float(n),
        "cpu_us": cpu / n * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests per mode and concurrency")
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--python", default=sys.executable, help="Python for the stand-in engines")
    ap.add_argument(
        "--vllm-router", default=shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--logdir", default="/tmp/disaggctl-bench-router")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    procs = Procs(logdir)
    pp, dp, bp, vp = free_port(), free_port(), free_port(), free_port()
    urls = {
        "prefill": f"http://127.0.0.1:{pp}",
        "decode": f"http://127.0.0.1:{dp}",
        "builtin": f"http://127.0.0.1:{bp}",
        "vllm-router": f"http://127.0.0.1:{vp}",
    }
    try:
        for name, port, role in (("prefill", pp, "kv_producer"), ("decode", dp, "kv_consumer")):
            ktc = json.dumps({"kv_connector": "NixlConnector", "kv_role": role})
            p = procs.start(
                name,
                [
                    args.python,
                    str(STANDIN),
                    "serve",
                    "tiny",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--kv-transfer-config",
                    ktc,
                ],
            )
            wait_http(urls[name] + "/health", p)
        cfg = {
            "bind": "127.0.0.1",
            "port": bp,
            "model": "tiny",
            "kv_kind": "nixl",
            "local_prefill_threshold": 0,
            "prefill": [{"name": "prefill-0", "url": urls["prefill"]}],
            "decode": [{"name": "decode-0", "url": urls["decode"]}],
        }
        (logdir / "router.json").write_text(json.dumps(cfg))
        pids: dict[str, int | None] = {"direct": None}
        p = procs.start(
            "builtin",
            [
                sys.executable,
                "-m",
                "disaggctl.router",
                "--config",
                str(logdir / "router.json"),
                "--log-level",
                "WARNING",
            ],
        )
        wait_http(urls["builtin"] + "/health", p)
        pids["builtin"] = p.pid
        modes = ["direct", "builtin"]
        if Path(args.vllm_router).exists():
            p = procs.start(
                "vllm-router",
                [
                    args.vllm_router,
                    "--vllm-pd-disaggregation",
                    "--prefill",
                    urls["prefill"],
                    "--decode",
                    urls["decode"],
                    "--kv-connector",
                    "nixl",
                    "--prefill-policy",
                    "round_robin",
                    "--decode-policy",
                    "round_robin",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(vp),
                    "--log-level",
                    "warning",
                    "--max-concurrent-requests",
                    "1024",
                    "--queue-size",
                    "1024",
                ],
            )
            wait_http(urls["vllm-router"] + "/health", p)
            pids["vllm-router"] = p.pid
            modes.append("vllm-router")
        else:
            print(f"vllm-router not found at {args.vllm_router}: skipping it", file=sys.stderr)
        results: dict[str, dict[str, dict[str, float]]] = {}
        for c in (int(x) for x in args.concurrency.split(",")):
            results[str(c)] = {}
            for mode in modes:
                results[str(c)][mode] = asyncio.run(load(mode, urls, c, args.requests, args.max_tokens, pids[mode]))
        report(results, args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        procs.stop()


def report(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    print(
        f"\nrouter overhead: {args.requests} non-streaming requests per row, max_tokens {args.max_tokens}, "
        f"{os.cpu_count()} CPUs shared by client, engines and routers (loopback)\n"
    )
    print(
        f"{'conc':>4} {'mode':<12} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'added p50':>10} {'added p99':>10} "
        f"{'router CPU/req':>15}"
    )
    for c, rows in results.items():
        base = rows["direct"]
        for mode, r in rows.items():
            add50 = f"{r['p50'] - base['p50']:+.3f}" if mode != "direct" else "-"
            add99 = f"{r['p99'] - base['p99']:+.3f}" if mode != "direct" else "-"
            cpu = f"{r['cpu_us']:.0f} us" if mode != "direct" else "-"
            print(
                f"{c:>4} {mode:<12} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['rps']:>8.0f} {add50:>10} {add99:>10} "
                f"{cpu:>15}"
            )
    print()
    for c, rows in results.items():
        b = rows["builtin"]
        line = f"concurrency {c}: builtin added p50 {b['p50'] - rows['direct']['p50']:+.3f} ms"
        if "vllm-router" in rows:
            v = rows["vllm-router"]
            line += (
                f"; vllm-router added p50 {v['p50'] - rows['direct']['p50']:+.3f} ms; "
                f"throughput builtin/vllm-router = {b['rps'] / v['rps']:.2f}x; "
                f"router CPU per request builtin/vllm-router = {b['cpu_us'] / v['cpu_us']:.2f}x"
            )
        print(line)
    print("targets: builtin added p50 <= 1 ms at concurrency 1; builtin throughput >= 0.5x vllm-router at 64")


if __name__ == "__main__":
    main()
