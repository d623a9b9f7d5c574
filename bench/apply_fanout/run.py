#!/usr/bin/env python3
"""Apply fan-out: disaggctl vs a bare paramiko loop (the floor) vs ansible-playbook vs pyinfra.

The same work for every tool, on 1, 8 and 32 REAL systemd hosts (systemd-nspawn containers from
tests/infra/systemd_hosts.sh, own prefix and subnet so it never touches the test fixtures):
upload a stand-in server script, a config file and a systemd unit; daemon-reload; start the unit;
wait until the server answers HTTP on every host. Then the same again with nothing changed
(no-op re-run). Every tool runs as its own process (interpreter start-up counts for all).

    .venv/bin/python bench/apply_fanout/run.py [--hosts 1,8,32] [--repeats 3] [--tools ...]

ansible-core and pyinfra are installed into their own venvs (--ansible-venv, --pyinfra-venv;
created with pip on first use). Prints wall-time medians and the ratios to the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/dctl-bench"))
SYS_BASE = WORK / "syshosts"
NET = "10.203.0"
PREFIX = "tbsys"
PORT = 8100

# The stand-in server: answers 200 to anything. `python3 -S` and only `socket`: ~15 ms to start,
# so the bench measures the tools rather than interpreter start-up on the hosts.
SERVER = textwrap.dedent(
    """\
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
    while True:
        c, _ = s.accept()
        try:
            c.recv(4096); c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
        finally:
            c.close()
    """
)
CONFIG = json.dumps({"model": "tiny", "settings": {f"k{i}": "v" * 16 for i in range(40)}}, indent=2) + "\n"


def unit_text(name: str, root: str) -> str:
    return textwrap.dedent(
        f"""\
        [Unit]
        Description=bench {name}
        [Service]
        Type=exec
        ExecStart=/usr/bin/python3 -S {root}/server.py {PORT}
        Restart=on-failure
        [Install]
        WantedBy=multi-user.target
        """
    )


# --------------------------------------------------------------------------- hosts


def hosts_up(n: int) -> list[tuple[str, str]]:
    env = dict(
        os.environ,
        SYSHOSTS_BASE=str(SYS_BASE),
        SYSHOSTS_PREFIX=PREFIX,
        SYSHOSTS_NET=NET,
        SYSHOSTS_BIND_RO="",
        SYSHOSTS_ROOTFS=os.environ.get("INFRA_ROOTFS", "/tmp/dctl-infra/rootfs"),
    )
    subprocess.run([str(REPO / "tests/infra/systemd_hosts.sh"), "up", str(n)], env=env, check=True, capture_output=True)
    inv = [line.split() for line in (SYS_BASE / "inventory").read_text().splitlines() if line.strip()]
    return [(a[0], a[1]) for a in inv][:n]


def hosts_down() -> None:
    env = dict(os.environ, SYSHOSTS_BASE=str(SYS_BASE), SYSHOSTS_PREFIX=PREFIX, SYSHOSTS_NET=NET)
    subprocess.run([str(REPO / "tests/infra/systemd_hosts.sh"), "down"], env=env, capture_output=True)


RESET = (
    "systemctl stop 'bench-*' 'bd-*' 2>/dev/null; rm -rf /etc/systemd/system/bench-* /etc/systemd/system/bd-* "
    "/etc/bench /etc/bench-dctl /var/lib/bench-dctl; systemctl daemon-reload"
)


def reset(hosts: list[tuple[str, str]]) -> None:
    sys.path.insert(0, str(REPO))
    from disaggctl.ssh import SshTarget, run_on_hosts

    targets = [
        SshTarget(n, ip, key=str(SYS_BASE / "client_key"), known_hosts=str(SYS_BASE / "known_hosts")) for n, ip in hosts
    ]
    res = run_on_hosts(targets, lambda c: c.check(["sh", "-c", RESET]), max_workers=len(targets))
    bad = [str(r.error) for r in res.values() if r.error]
    if bad:
        raise SystemExit(f"reset failed: {bad}")


def wait_http(hosts: list[tuple[str, str]], timeout: float = 60) -> None:
    def one(ip: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://{ip}:{PORT}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{ip}: server never answered")
            time.sleep(0.05)

    with ThreadPoolExecutor(max(1, len(hosts))) as ex:
        list(ex.map(one, [ip for _, ip in hosts]))


# --------------------------------------------------------------------------- tools


def write_hosts_file(hosts: list[tuple[str, str]]) -> Path:
    p = WORK / "hosts.json"
    p.write_text(json.dumps(hosts))
    return p


SPANS: dict[tuple[str, int], list[dict[str, object]]] = {}  # (phase, hosts) -> one record per run


def run_disaggctl(hosts: list[tuple[str, str]], phase: str) -> None:
    spans = WORK / "spans.json"
    spans.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "dctl_once.py"), str(write_hosts_file(hosts)), str(SYS_BASE), str(spans)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, BENCH_T0=repr(time.time())))
    if r.returncode:
        raise SystemExit(f"disaggctl failed:\n{r.stdout}\n{r.stderr}")
    SPANS.setdefault((phase, len(hosts)), []).append(json.loads(spans.read_text()))


def run_floor(hosts: list[tuple[str, str]]) -> None:
    cmd = [sys.executable, str(HERE / "floor_once.py"), str(write_hosts_file(hosts)), str(SYS_BASE)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"floor failed:\n{r.stdout}\n{r.stderr}")
    if "changed" in r.stdout:
        wait_http(hosts)


def _files_dir() -> Path:
    d = WORK / "files"
    d.mkdir(parents=True, exist_ok=True)
    (d / "server.py").write_text(SERVER)
    (d / "app.json").write_text(CONFIG)
    (d / "bench-app.service").write_text(unit_text("app", "/etc/bench"))
    return d


def ensure_venv(path: Path, package: str) -> Path:
    if not (path / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    exe = {"ansible-core": "ansible-playbook", "pyinfra": "pyinfra"}[package]
    if not (path / "bin" / exe).exists():
        subprocess.run([str(path / "bin" / "pip"), "install", "-q", package], check=True)
    return path / "bin" / exe


PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - file: {path: /etc/bench, state: directory, mode: "0755"}
    - copy: {src: FILES/server.py, dest: /etc/bench/server.py, mode: "0755"}
    - copy: {src: FILES/app.json, dest: /etc/bench/app.json, mode: "0644"}
    - copy: {src: FILES/bench-app.service, dest: /etc/systemd/system/bench-app.service, mode: "0644"}
      notify: restart
    - systemd: {name: bench-app.service, state: started, enabled: true, daemon_reload: true}
  handlers:
    - name: restart
      systemd: {name: bench-app.service, state: restarted, daemon_reload: true}
"""


def run_ansible(hosts: list[tuple[str, str]], venv: Path) -> None:
    exe = ensure_venv(venv, "ansible-core")
    files = _files_dir()
    d = WORK / "ansible"
    d.mkdir(exist_ok=True)
    (d / "play.yml").write_text(PLAYBOOK.replace("FILES", str(files)))
    key, kh = SYS_BASE / "client_key", SYS_BASE / "known_hosts"
    (d / "inventory.ini").write_text(
        "[all]\n" + "".join(f"{n} ansible_host={ip}\n" for n, ip in hosts) + "[all:vars]\nansible_user=root\n"
        f"ansible_ssh_private_key_file={key}\nansible_python_interpreter=/usr/bin/python3\n"
    )
    (d / "ansible.cfg").write_text(
        f"[defaults]\nforks = {len(hosts)}\nhost_key_checking = True\nstdout_callback = default\n"
        f"[ssh_connection]\npipelining = True\nssh_args = -o ControlMaster=auto -o ControlPersist=60s "
        f"-o UserKnownHostsFile={kh} -o IdentitiesOnly=yes\ncontrol_path_dir = {d}/cp\n"
    )
    env = dict(os.environ, ANSIBLE_CONFIG=str(d / "ansible.cfg"))
    r = subprocess.run(
        [str(exe), "-i", str(d / "inventory.ini"), str(d / "play.yml")], env=env, capture_output=True, text=True, cwd=d
    )
    if r.returncode:
        raise SystemExit(f"ansible failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
    wait_http(hosts)


DEPLOY = """\
from pyinfra import host
from pyinfra.operations import files, systemd

files.directory(path="/etc/bench", mode="755")
files.put(src="FILES/server.py", dest="/etc/bench/server.py", mode="755")
files.put(src="FILES/app.json", dest="/etc/bench/app.json", mode="644")
unit = files.put(src="FILES/bench-app.service", dest="/etc/systemd/system/bench-app.service", mode="644")
systemd.service(service="bench-app.service", running=True, enabled=True, restarted=unit.changed,
                daemon_reload=unit.changed)
"""


def run_pyinfra(hosts: list[tuple[str, str]], venv: Path) -> None:
    exe = ensure_venv(venv, "pyinfra")
    files = _files_dir()
    d = WORK / "pyinfra"
    d.mkdir(exist_ok=True)
    (d / "deploy.py").write_text(DEPLOY.replace("FILES", str(files)))
    key, kh = SYS_BASE / "client_key", SYS_BASE / "known_hosts"
    data = {
        "ssh_user": "root",
        "ssh_key": str(key),
        "ssh_known_hosts_file": str(kh),
        "ssh_strict_host_key_checking": "yes",
    }
    (d / "inventory.py").write_text(f"hosts = {[(ip, data) for _, ip in hosts]!r}\n")
    r = subprocess.run(
        [str(exe), "-y", "--parallel", str(len(hosts)), "inventory.py", "deploy.py"],
        capture_output=True,
        text=True,
        cwd=d,
    )
    if r.returncode:
        raise SystemExit(f"pyinfra failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
    wait_http(hosts)


# --------------------------------------------------------------------------- main


def byte_compile() -> None:
    """.pyc files for disaggctl and this folder, as a pip install (or `make install`) leaves them:
    with PYTHONDONTWRITEBYTECODE=1 (this machine) or a read-only checkout, every run would
    otherwise compile disaggctl's modules from source (~0.1 s of CPU the floor does not pay:
    paramiko's are compiled at install). run.py's own module serves both tools."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", str(REPO / "disaggctl"), str(HERE)],
        check=True,
        stdout=subprocess.DEVNULL,
    )



def _spread(results: dict[str, dict[str, dict[int, list[float]]]], tool: str, phase: str, n: int) -> str:
    """The range of tool/floor over the repeats, each repeat against the floor's run of the same round."""
    r = [t / f for t, f in zip(results[tool][phase][n], results["floor"][phase][n], strict=True)]
    return f"{min(r):.2f}-{max(r):.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tools", default="floor,disaggctl,pyinfra,ansible")
    ap.add_argument("--ansible-venv", type=Path, default=WORK / "ansible-venv")
    ap.add_argument("--pyinfra-venv", type=Path, default=WORK / "pyinfra-venv")
    ap.add_argument("--keep", action="store_true", help="leave the containers running")
    ap.add_argument("--json", type=Path, help="also write the raw timings here")
    a = ap.parse_args()
    sizes = [int(x) for x in a.hosts.split(",")]
    tools = a.tools.split(",")
    WORK.mkdir(parents=True, exist_ok=True)
    byte_compile()
    all_hosts = hosts_up(max(sizes))
    runners = {
        "floor": run_floor,
        "disaggctl": run_disaggctl,  # called with the phase (records its spans)
        "ansible": lambda h: run_ansible(h, a.ansible_venv),
        "pyinfra": lambda h: run_pyinfra(h, a.pyinfra_venv),
    }
    results: dict[str, dict[str, dict[int, list[float]]]] = {}
    try:
        for n in sizes:
            hosts = all_hosts[:n]
            # round-robin (each repeat runs every tool once): a load that drifts over the minutes
            # of a run (this machine is shared) weighs on every tool alike
            for _ in range(a.repeats):
                for tool in tools:
                    reset(hosts)
                    for phase in ("first", "noop"):
                        t0 = time.perf_counter()
                        if tool == "disaggctl":
                            run_disaggctl(hosts, phase)
                        else:
                            runners[tool](hosts)
                        dt = time.perf_counter() - t0
                        results.setdefault(tool, {}).setdefault(phase, {}).setdefault(n, []).append(dt)
                        print(f"  {tool:<10} {n:>3} hosts {phase:<5} {dt:7.2f} s", flush=True)
            reset(hosts)
    finally:
        if not a.keep:
            hosts_down()
    if a.json:
        a.json.write_text(
            json.dumps({"results": results, "spans": {f"{k[0]}/{k[1]}": v for k, v in SPANS.items()}}, indent=2)
        )
    print()
    print(f"median wall time, s ({a.repeats} runs; {os.cpu_count()} cores)")
    print(f"{'tool':<10} {'phase':<6}" + "".join(f"{n:>9}h" for n in sizes) + "   ratio to floor")
    for tool in tools:
        for phase in ("first", "noop"):
            meds = [statistics.median(results[tool][phase][n]) for n in sizes]
            floor = "floor" in results
            ratios = [
                m / statistics.median(results["floor"][phase][n]) if "floor" in results else float("nan")
                for m, n in zip(meds, sizes, strict=True)
            ]
            print(
                f"{tool:<10} {phase:<6}"
                + "".join(f"{m:>10.2f}" for m in meds)
                + "   "
                + " ".join(f"{r:.2f}x" for r in ratios)
                + ("   per repeat " + "; ".join(_spread(results, tool, phase, n) for n in sizes) if floor else "")
            )
    if "disaggctl" in results:
        from phases import summarize

        for (phase, n), runs in sorted(SPANS.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(f"\ndisaggctl {phase}, {n} hosts: where the time goes")
            print("\n".join(summarize(runs, results["disaggctl"][phase][n])))
        print()
        for other in ("ansible", "pyinfra"):
            if other in results:
                for phase in ("first", "noop"):
                    rs = [
                        statistics.median(results[other][phase][n]) / statistics.median(results["disaggctl"][phase][n])
                        for n in sizes
                    ]
                    print(
                        f"{other} / disaggctl ({phase}): "
                        + " ".join(f"{n}h {r:.1f}x" for n, r in zip(sizes, rs, strict=True))
                    )


if __name__ == "__main__":
    main()
