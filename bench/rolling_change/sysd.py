"""The rolling bench on the systemd target: stand-in engines behind the real builtin router, as
systemd units on systemd-nspawn hosts (tests/infra/systemd_hosts.sh through bench/syshosts.py,
own prefix `tbrl` and subnet 10.210.0 so it never meets the test suite's hosts). `apply` runs
from this machine over SSH; the rollout drains through the router's admin API on the router
host's loopback, reached through that host's SSH connection (targets/rollout.py).

The stand-in engine and the router's venv come into the containers through the read-only bind
mounts systemd_hosts.sh makes (the repository and the venv's Python), so the router runs this
worktree's code."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.rolling_change.run import PY, STANDIN, Deployment  # noqa: E402
from bench.syshosts import BenchHosts  # noqa: E402

PREFIX, NET, ROUTER_PORT = "tbrl", "10.210.0", 8000
VLLM_BIN = "/opt/standin/vllm"
WRAPPER = f'#!/bin/sh\nexec /usr/bin/python3 {STANDIN} "$@"\n'


@dataclass
class SystemdDeployment(Deployment):
    """P prefill and D decode stand-ins and the router on `n_hosts` nspawn hosts."""

    n_hosts: int = 2
    hosts: list[tuple[str, str]] = field(default_factory=list)
    bench_hosts: BenchHosts = field(default_factory=lambda: BenchHosts("rolling", PREFIX, NET))

    @property
    def router_url(self) -> str:
        return f"http://{self.hosts[0][1]}:{ROUTER_PORT}" if self.hosts else ""

    def describe(self) -> str:
        names = ", ".join(f"{n} ({a})" for n, a in self.hosts) or f"{self.n_hosts} hosts"
        return f"the systemd target: systemd-nspawn hosts {names}, units started over SSH"

    def setup(self) -> None:
        self.hosts = self.bench_hosts.up(self.n_hosts)
        conns = self.bench_hosts.open_all(self.hosts, "root")
        try:
            for c in conns:
                c.check(["mkdir", "-p", str(Path(VLLM_BIN).parent)])
                c.put(VLLM_BIN, WRAPPER.encode(), 0o755)
                # a previous run's units (the containers' /etc is an overlay, but they may still run)
                c.run(["sh", "-c", "systemctl stop 'disaggctl-rolling-bench*' 2>/dev/null; true"])
        finally:
            for c in conns:
                c.close()

    def teardown(self) -> None:
        try:
            self.cli("destroy", "-y")
        finally:
            self.bench_hosts.down()

    def write(self, generation: int) -> None:
        base = self.bench_hosts.base
        ssh = f'ssh: {{key: "{base / "client_key"}", known_hosts: "{base / "known_hosts"}", strict_host_keys: true}}'
        gpus = math.ceil((self.prefill + self.decode) / self.n_hosts)
        hosts = "\n".join(f"  - {{name: {n}, address: {a}, gpus: {gpus}, {ssh}}}" for n, a in self.hosts)
        env = self.standin_env(generation)
        self.spec.write_text(f"""\
name: rolling-bench
model: {{path: /models/tiny, served_name: tiny}}
hosts:
{hosts}
prefill: {{replicas: {self.prefill}, env: {env}}}
decode: {{replicas: {self.decode}, env: {env}}}
kv_transfer: {{kind: nixl, buffer_device: cpu}}
router: {{host: {self.hosts[0][0]}, port: {ROUTER_PORT}, local_prefill_threshold: 8}}
target: {{kind: systemd, vllm_bin: {VLLM_BIN}, python_bin: {PY}, start_timeout_s: 120}}
health: {{startup_timeout_s: 120, interval_s: 0.2, request_timeout_s: 60}}
""")
