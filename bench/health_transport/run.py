#!/usr/bin/env python3
"""What HTTP through SSH costs the systemd target's health checks, against checks from here.

On N REAL systemd hosts (systemd-nspawn containers, own prefix and subnet 10.209.0), each running
a tiny HTTP service (`/health` answers 200), with one SSH connection per host already open (as
apply has them), time:

  direct     urllib GET from this machine (what the gate did before: needs the host's port)
  ssh        Connection.http GET: a direct-tcpip channel of the open SSH connection, the TCP
             connection opened by the host's sshd (works behind a bastion)
  ssh-sudo   the same over the sudo user's connection (forwarding needs no sudo)

  one        one request at a time to host 1 (a /health probe, a canary POST's transport)
  round      one request to every host in parallel (one polling round of a start phase)

    .venv/bin/python bench/health_transport/run.py [--hosts 1,8] [--repeats 30]

Prints medians and the ratio of each variant to `direct` (same run).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.syshosts import BenchHosts  # noqa: E402
from disaggctl.ssh import Connection  # noqa: E402

HOSTS = BenchHosts("healthtransport", "tbht", "10.209.0")
PORT = 18090
SERVER = (
    "from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer\n"
    "class H(BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.send_header('Content-Length', '2'); self.end_headers()\n"
    "        self.wfile.write(b'ok')\n"
    "    def log_message(self, *a): pass\n"
    f"ThreadingHTTPServer(('0.0.0.0', {PORT}), H).serve_forever()\n"
)


def serve(conns: list[Connection], hosts: list[tuple[str, str]]) -> None:
    for c in conns:
        c.put("/tmp/dctl-health-server.py", SERVER.encode())
        c.run(["systemctl", "stop", "dctl-bench-http"])
        c.check(["systemd-run", "--unit=dctl-bench-http", "--", "python3", "/tmp/dctl-health-server.py"])
    for _, ip in hosts:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://{ip}:{PORT}/health", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, f"no HTTP service on {ip}"
                time.sleep(0.1)


def direct(ip: str) -> Callable[[], None]:
    def go() -> None:
        with urllib.request.urlopen(f"http://{ip}:{PORT}/health", timeout=5) as r:
            assert r.status == 200

    return go


def via(conn: Connection, ip: str) -> Callable[[], None]:
    def go() -> None:
        assert conn.http("GET", ip, PORT, "/health", timeout=5).status == 200

    return go


def timed(fns: list[Callable[[], None]], pool: ThreadPoolExecutor) -> float:
    start = time.perf_counter()
    list(pool.map(lambda f: f(), fns))
    return time.perf_counter() - start


def bench(n: int, repeats: int) -> None:
    hosts = HOSTS.up(n)
    root = HOSTS.open_all(hosts, "root")
    deploy = HOSTS.open_all(hosts, "deploy")
    try:
        serve(root, hosts)
        variants = {
            "direct": [direct(ip) for _, ip in hosts],
            "ssh": [via(c, ip) for c, (_, ip) in zip(root, hosts, strict=True)],
            "ssh-sudo": [via(c, ip) for c, (_, ip) in zip(deploy, hosts, strict=True)],
        }
        one: dict[str, list[float]] = {k: [] for k in variants}
        rnd: dict[str, list[float]] = {k: [] for k in variants}
        with ThreadPoolExecutor(max(1, n)) as pool:
            for _ in range(repeats):  # interleaved: drift on the shared machine hits every variant alike
                for k, fns in variants.items():
                    one[k].append(timed(fns[:1], pool))
                    rnd[k].append(timed(fns, pool))
        print(f"\n{n} host(s), median of {repeats} (connections already open):")
        for label, table in (("one request", one), (f"round ({n} in parallel)", rnd)):
            base = statistics.median(table["direct"])
            for k, ts in table.items():
                m = statistics.median(ts)
                print(f"  {label:24s} {k:9s} {m * 1000:7.2f} ms   ratio to direct {m / base:5.2f}")
    finally:
        for c in root:
            c.run(["systemctl", "stop", "dctl-bench-http"])
        for c in root + deploy:
            c.close()
        HOSTS.down()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default="1,8")
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args()
    for n in (int(x) for x in a.hosts.split(",")):
        bench(n, a.repeats)


if __name__ == "__main__":
    main()
