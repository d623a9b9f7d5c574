#!/usr/bin/env python3
"""Unit-state probes for a no-op apply: `systemctl show` (what observe runs today) vs cheaper ones.

On N REAL systemd hosts (systemd-nspawn containers, own prefix and subnet), each running
--units Type=exec services, with one SSH connection per host already open (connection set-up is
not what differs), time one round over all hosts in parallel of:

  show8     systemctl show with observe's 8 properties (the baseline)
  show3     systemctl show --property=ActiveState,SubState,MainPID
  is-active systemctl is-active
  cgroup    disaggctl.unitstate's script: cgroup.procs + /proc/PID/stat, no systemctl, no sudo
  floor     `true`: the SSH round trip alone
  *-sudo    the same as the non-root sudo user (`sudo -n` in front; cgroup needs none)

    .venv/bin/python bench/unit_state/run.py [--hosts 1,32] [--units 3] [--repeats 7]

Prints the median wall time of a round per variant and its ratio to show8 (same run), and checks
that cgroup answers running/MainPID exactly like systemctl show.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.syshosts import BenchHosts  # noqa: E402
from disaggctl.ssh import Connection  # noqa: E402
from disaggctl.unitstate import parse_unit_states, unit_state_argv  # noqa: E402

HOSTS = BenchHosts("unitstate", "tbus", "10.208.0")
PROPS8 = "Id,LoadState,ActiveState,SubState,MainPID,NRestarts,UnitFileState,NeedDaemonReload"


def unit_file(i: int) -> bytes:
    return (f"[Unit]\nDescription=bench {i}\n[Service]\nType=exec\nExecStart=/bin/sh -c 'sleep 100000 & "
            "exec sleep 200000'\n[Install]\nWantedBy=multi-user.target\n").encode()


def install(conns: list[Connection], units: list[str]) -> None:
    def one(c: Connection) -> None:
        for i, u in enumerate(units):
            c.put(f"/etc/systemd/system/{u}", unit_file(i))
        c.check(["systemctl", "daemon-reload"])
        c.check(["systemctl", "enable", "--now", *units], timeout=60)

    with ThreadPoolExecutor(32) as ex:
        list(ex.map(one, conns))


def round_s(conns: list[Connection], argv: list[str], sudo: bool) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(len(conns)) as ex:
        for r in ex.map(lambda c: c.run(argv, sudo=sudo, timeout=60), conns):
            assert r.rc in (0, 3), r.err  # is-active exits 3 for an inactive unit
    return time.perf_counter() - start


def check_same(conn: Connection, units: list[str]) -> None:
    show = conn.check(["systemctl", "show", "--property=Id,ActiveState,SubState,MainPID", "--", *units]).out
    facts = {kv["Id"]: kv for kv in (dict(x.split("=", 1) for x in b.splitlines()) for b in show.strip().split("\n\n"))}
    got = parse_unit_states(conn.check(unit_state_argv(units)).out, units)
    for u in units:
        f = facts[u]
        assert got[u].main_pid == int(f["MainPID"]) and got[u].running == (f["SubState"] == "running"), (u, f, got[u])


def bench(n: int, n_units: int, repeats: int) -> None:
    units = [f"dctl-bench-{i}.service" for i in range(n_units)]
    hosts = HOSTS.up(n)
    root = HOSTS.open_all(hosts, "root")
    deploy = HOSTS.open_all(hosts, "deploy")
    try:
        install(root, units)
        check_same(root[0], units)
        variants: dict[str, tuple[list[Connection], list[str], bool]] = {
            "floor (true)": (root, ["true"], False),  # the SSH round trip itself
            "show8": (root, ["systemctl", "show", f"--property={PROPS8}", "--", *units], False),
            "show3": (root, ["systemctl", "show", "--property=ActiveState,SubState,MainPID", "--", *units], False),
            "is-active": (root, ["systemctl", "is-active", "--", *units], False),
            "cgroup": (root, unit_state_argv(units), False),
            "show8-sudo": (deploy, ["systemctl", "show", f"--property={PROPS8}", "--", *units], True),
            "cgroup-deploy": (deploy, unit_state_argv(units), False),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits every variant alike
            for k, (conns, argv, sudo) in variants.items():
                times[k].append(round_s(conns, argv, sudo))
        base = statistics.median(times["show8"])
        print(f"\n{n} hosts x {n_units} units, median of {repeats} rounds (one command per host, in parallel):")
        for k, ts in times.items():
            m = statistics.median(ts)
            print(f"  {k:14s} {m * 1000:8.1f} ms   ratio to show8 {m / base:5.2f}")
    finally:
        for c in root + deploy:
            c.close()
        HOSTS.down()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", default="1,32")
    ap.add_argument("--units", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    for n in (int(x) for x in a.hosts.split(",")):
        bench(n, a.units, a.repeats)


if __name__ == "__main__":
    main()
