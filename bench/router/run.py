#!/usr/bin/env python3
"""Router overhead benchmark: builtin router vs direct engine calls vs vllm-router.

Starts two stand-in engines (NIXL producer + consumer, zero added latency), the builtin
router (`python -m disaggctl.router`, always disaggregated), optionally the builtin router of
another git revision (`--baseline REV`, the "before" of a change) and vllm-router
(`--vllm-pd-disaggregation`), all on loopback. For each row it sends the same bounded number
of /v1/completions requests through each mode:

  direct         the client makes the two calls itself (prefill with max_tokens 1 and
                 do_remote_decode, then decode with the returned kv_transfer_params)
  builtin        one call to the builtin router
  builtin@REV    one call to the builtin router of revision REV (--baseline)
  vllm-router    one call to vllm-router

Rows: c1 (concurrency 1), c64 (concurrency 64), sse64 (concurrency 64, "stream": true),
long1 (concurrency 1, 100 KB prompts). It prints p50/p99 latency, throughput, the added
latency over `direct`, each router's own CPU time per request (/proc/PID/stat), and the
ratios against the targets.
Run: .venv/bin/python bench/router/run.py [--requests 2000] [--rows c1,c64,sse64,long1]
The machine's cores are shared by the load generator, the engines and the routers: numbers
are relative, comparable only within one run.
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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from disaggctl.router.bodies import NIXL_PREFILL_PARAMS  # what the router sends, for the direct baseline

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "support" / "standin_engine.py"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 8  # ~90 tokens: long enough to disaggregate
LONG_PROMPT = ("The quick brown fox jumps over the lazy dog. " * 2300)[: 100 * 1024]  # 100 KB


@dataclass(frozen=True)
class Row:
    concurrency: int
    stream: bool
    prompt: str
    share: float  # fraction of --requests sent in this row


ROWS = {
    "c1": Row(1, False, PROMPT, 1.0),
    "c64": Row(64, False, PROMPT, 1.0),
    "sse64": Row(64, True, PROMPT, 1.0),
    "long1": Row(1, False, LONG_PROMPT, 0.1),
}


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

    def start(self, name: str, argv: list[str], cwd: Path = REPO) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
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


# ---------------------------------------------------------------------- load


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
        data = await r.read()
        assert r.status == 200, r.status
        assert not body.get("stream") or data.endswith(b"data: [DONE]\n\n"), data[-200:]


def cpu_seconds(pid: int | None) -> float:
    """user+system CPU of a process (all threads) from /proc: robust to other load on the machine."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(mode: str, urls: dict[str, str], row: Row, n: int, max_tokens: int, pid: int | None) -> dict[str, float]:
    body: dict[str, object] = {"model": "tiny", "prompt": row.prompt, "max_tokens": max_tokens, "temperature": 0}
    if row.stream:
        body["stream"] = True
    lat: list[float] = []
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:

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
        await asyncio.gather(*(worker() for _ in range(row.concurrency)))
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0
    lat.sort()
    return {
        "p50": statistics.median(lat) * 1000,
        "p99": lat[max(0, int(len(lat) * 0.99) - 1)] * 1000,
        "rps": n / wall,
        "n": float(n),
        "cpu_us": cpu / n * 1e6,
    }


# ---------------------------------------------------------------------- processes


def start_engines(procs: Procs, python: str, urls: dict[str, str]) -> None:
    for name in ("prefill", "decode"):
        role = "kv_producer" if name == "prefill" else "kv_consumer"
        ktc = json.dumps({"kv_connector": "NixlConnector", "kv_role": role})
        port = urls[name].rsplit(":", 1)[1]
        argv = [python, str(STANDIN), "serve", "tiny", "--host", "127.0.0.1", "--port", port]
        p = procs.start(name, [*argv, "--kv-transfer-config", ktc])
        wait_http(urls[name] + "/health", p)


def start_builtin(procs: Procs, name: str, tree: Path, urls: dict[str, str], logdir: Path) -> int:
    cfg = {
        "bind": "127.0.0.1",
        "port": int(urls[name].rsplit(":", 1)[1]),
        "model": "tiny",
        "kv_kind": "nixl",
        "local_prefill_threshold": 0,
        "prefill": [{"name": "prefill-0", "url": urls["prefill"]}],
        "decode": [{"name": "decode-0", "url": urls["decode"]}],
    }
    path = logdir / f"{name.replace('@', '-')}.json"
    path.write_text(json.dumps(cfg))
    argv = [sys.executable, "-m", "disaggctl.router", "--config", str(path), "--log-level", "WARNING"]
    p = procs.start(name.replace("@", "-"), argv, cwd=tree)  # `-m` imports disaggctl from the cwd first
    wait_http(urls[name] + "/health", p)
    return p.pid


def start_vllm_router(procs: Procs, binary: str, urls: dict[str, str]) -> int:
    port = urls["vllm-router"].rsplit(":", 1)[1]
    argv = [binary, "--vllm-pd-disaggregation", "--prefill", urls["prefill"], "--decode", urls["decode"]]
    argv += ["--kv-connector", "nixl", "--prefill-policy", "round_robin", "--decode-policy", "round_robin"]
    argv += ["--host", "127.0.0.1", "--port", port, "--log-level", "warning"]
    argv += ["--max-concurrent-requests", "1024", "--queue-size", "1024"]
    p = procs.start("vllm-router", argv)
    wait_http(urls["vllm-router"] + "/health", p)
    return p.pid


def checkout(rev: str, into: Path) -> Path:
    """The files of git revision `rev` (the router code the current one is compared with)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# ---------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests per mode and row (long1: a tenth)")
    ap.add_argument("--rows", default="c1,c64,sse64,long1", help=f"of {', '.join(ROWS)}")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--baseline", help="also run the builtin router of this git revision (e.g. main)")
    ap.add_argument("--python", default=sys.executable, help="Python for the stand-in engines")
    ap.add_argument(
        "--vllm-router", default=shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--logdir", default="/tmp/disaggctl-bench-router")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    logdir = Path(args.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    modes = ["direct", "builtin", *([f"builtin@{args.baseline}"] if args.baseline else [])]
    if Path(args.vllm_router).exists():
        modes.append("vllm-router")
    else:
        print(f"vllm-router not found at {args.vllm_router}: skipping it", file=sys.stderr)
    urls = {m: f"http://127.0.0.1:{free_port()}" for m in ("prefill", "decode", *modes[1:])}
    procs = Procs(logdir)
    pids: dict[str, int | None] = {"direct": None}
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        try:
            start_engines(procs, args.python, urls)
            pids["builtin"] = start_builtin(procs, "builtin", REPO, urls, logdir)
            if args.baseline:
                tree = checkout(args.baseline, Path(tmp))
                pids[modes[2]] = start_builtin(procs, modes[2], tree, urls, logdir)
            if "vllm-router" in modes:
                pids["vllm-router"] = start_vllm_router(procs, args.vllm_router, urls)
            results = run_rows(args, modes, urls, pids)
        finally:
            procs.stop()
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def run_rows(
    args: argparse.Namespace, modes: list[str], urls: dict[str, str], pids: dict[str, int | None]
) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.rows.split(","):
        row = ROWS[name]
        n = max(50, int(args.requests * row.share))
        results[name] = {m: asyncio.run(load(m, urls, row, n, args.max_tokens, pids[m])) for m in modes}
    return results


def report(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    print(
        f"\nrouter overhead: {args.requests} requests per row and mode (long1: a tenth), max_tokens "
        f"{args.max_tokens}, {os.cpu_count()} CPUs shared by client, engines and routers (loopback)\n"
    )
    print(
        f"{'row':<6} {'mode':<16} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'added p50':>10} {'added p99':>10} "
        f"{'router CPU/req':>15}"
    )
    for name, rows in results.items():
        base = rows["direct"]
        for mode, r in rows.items():
            add50 = f"{r['p50'] - base['p50']:+.3f}" if mode != "direct" else "-"
            add99 = f"{r['p99'] - base['p99']:+.3f}" if mode != "direct" else "-"
            cpu = f"{r['cpu_us']:.0f} us" if mode != "direct" else "-"
            print(
                f"{name:<6} {mode:<16} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['rps']:>8.0f} {add50:>10} {add99:>10} "
                f"{cpu:>15}"
            )
    print()
    for name, rows in results.items():
        print(ratio_line(name, rows))
    print(
        "targets: c64 and sse64 throughput builtin/vllm-router >= 1.0x and router CPU per request <= 1.0x; "
        "c1 added p50 no worse than the baseline revision's; long1: the added latency is reported"
    )


def ratio_line(name: str, rows: dict[str, dict[str, float]]) -> str:
    b, direct = rows["builtin"], rows["direct"]
    line = f"{name}: builtin added p50 {b['p50'] - direct['p50']:+.3f} ms"
    for mode, r in rows.items():
        if mode in ("direct", "builtin"):
            continue
        line += (
            f"; vs {mode}: added p50 {r['p50'] - direct['p50']:+.3f} ms, "
            f"throughput {b['rps'] / r['rps']:.2f}x, CPU/request {b['cpu_us'] / r['cpu_us']:.2f}x"
        )
    return line


if __name__ == "__main__":
    main()
