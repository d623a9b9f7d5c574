#!/usr/bin/env python3
"""Host-side CPU of one no-op look: disaggctl's observe command vs the floor's `sha256sum`.

On one bench host (run.py's nspawn containers; booted here if needed), after a first apply of
each tool, runs each tool's no-op command N times in a loop on the host, the way sshd runs it
(the login shell with `-c`), and prints the CPU each run costs the host (children's utime +
stime of the loop's shell, from /proc) and the ratio. The client's side is in run.py.

    .venv/bin/python bench/apply_fanout/host_cpu.py [--runs 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

from run import SYS_BASE, WORK, hosts_up, reset, write_hosts_file  # noqa: E402

from disaggctl.ssh import Connection, SshTarget, connect  # noqa: E402
from disaggctl.targets.systemd.backend import OBSERVE_SCRIPT  # noqa: E402

FLOOR_FILES = ["/etc/bench/server.py", "/etc/bench/app.json", "/etc/systemd/system/bench-floor.service"]
STATE = "/var/lib/bench-dctl/fan"


def commands(conn: Connection) -> dict[str, str]:
    """Each tool's no-op command line, as its client sends it (dctl_once's deployment on this host)."""
    paths = conn.run(["cat", f"{STATE}/owned"]).out.split()
    manifest = conn.run(["cat", f"{STATE}/manifest.json"]).stdout
    want = hashlib.sha256(manifest).hexdigest()  # a converged host: the manifest the client expects
    return {
        "floor": "sha256sum " + " ".join(FLOOR_FILES) + " 2>/dev/null",
        "disaggctl": shlex.join(["sh", "-c", OBSERVE_SCRIPT, "observe", "fast", STATE, want, *paths]),
    }


def ms_per_run(conn: Connection, line: str, runs: int) -> float:
    loop = f"for i in $(seq {runs}); do bash -c {shlex.quote(line)} >/dev/null; done; cat /proc/$$/stat"
    fields = conn.run(["bash", "-c", loop], timeout=600).out.rsplit(")", 1)[1].split()
    ticks = int(fields[13]) + int(fields[14])  # cutime + cstime (after the state field)
    return ticks * 10.0 / runs  # USER_HZ 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    hosts = hosts_up(1)
    reset(hosts)
    hf, base = str(write_hosts_file(hosts)), str(SYS_BASE)
    subprocess.run([sys.executable, str(HERE / "dctl_once.py"), hf, base], check=True, capture_output=True)
    # the floor's files (its service cannot bind the port disaggctl's holds; its no-op only hashes)
    subprocess.run([sys.executable, str(HERE / "floor_once.py"), hf, base], check=True, capture_output=True)
    name, ip = hosts[0]
    with connect(SshTarget(name, ip, key=f"{base}/client_key", known_hosts=f"{base}/known_hosts")) as conn:
        conn.run(["systemctl", "disable", "--now", "bench-floor.service"])
        lines = commands(conn)
        got: dict[str, list[float]] = {k: [] for k in lines}
        for _ in range(a.rounds):
            for tool, line in lines.items():
                got[tool].append(ms_per_run(conn, line, a.runs))
    reset(hosts)
    med = {k: statistics.median(v) for k, v in got.items()}
    print(json.dumps({k: [round(x, 2) for x in v] for k, v in got.items()}))
    print(f"host CPU per no-op look ({a.runs} runs x {a.rounds} rounds, medians):")
    for tool, m in med.items():
        print(f"  {tool:<10} {m:5.2f} ms   {m / med['floor']:.2f}x the floor")


if __name__ == "__main__":
    main()
