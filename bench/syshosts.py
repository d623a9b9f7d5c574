"""N real systemd hosts for a bench (tests/infra/systemd_hosts.sh: systemd-nspawn containers with
sshd), each bench on its own prefix and /24 so it never meets the test suite's hosts."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from disaggctl.ssh import Connection, SshTarget, connect

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests/infra/systemd_hosts.sh"


class BenchHosts:
    def __init__(self, folder: str, prefix: str, net: str) -> None:
        self.base = Path(os.environ.get("BENCH_WORK", "/tmp/dctl-bench")) / folder
        self.env = dict(os.environ, SYSHOSTS_BASE=str(self.base), SYSHOSTS_PREFIX=prefix, SYSHOSTS_NET=net,
                        SYSHOSTS_ROOTFS=os.environ.get("INFRA_ROOTFS", "/tmp/dctl-infra/rootfs"))  # fmt: skip

    def up(self, n: int) -> list[tuple[str, str]]:
        """Start n hosts; (name, address) of each."""
        subprocess.run([str(SCRIPT), "up", str(n)], env=self.env, check=True, capture_output=True)
        lines = (self.base / "inventory").read_text().splitlines()
        return [(a, b) for a, b in (line.split()[:2] for line in lines if line)]

    def down(self) -> None:
        subprocess.run([str(SCRIPT), "down"], env=self.env, capture_output=True)

    def open_all(self, hosts: list[tuple[str, str]], user: str) -> list[Connection]:
        """One SSH connection per host as `user`, opened in parallel."""

        def one(h: tuple[str, str]) -> Connection:
            return connect(SshTarget(name=h[0], address=h[1], user=user, key=str(self.base / "client_key"),
                                     known_hosts=str(self.base / "known_hosts"), connect_timeout=10))  # fmt: skip

        with ThreadPoolExecutor(32) as ex:
            return list(ex.map(one, hosts))
