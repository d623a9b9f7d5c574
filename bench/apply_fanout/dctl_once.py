#!/usr/bin/env python3
"""One `disaggctl apply` of the fan-out deployment (run.py times this process).

The deployment is one stand-in server per host, built as a DesiredState by hand (the vLLM
compile is not what this measures) and applied by the real systemd backend: observe, plan,
pending manifest, atomic uploads, daemon-reload + enable, start, /health gate, final manifest.
Usage: dctl_once.py HOSTS_JSON SYSHOSTS_BASE [SPANS_JSON]

With SPANS_JSON, the time of each phase on each host is written there (see phases.py): the
backend's own functions, wrapped here, nothing changed in them.
"""

from __future__ import annotations

import time

T_MAIN = time.time()

import atexit  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from rich.console import Console  # noqa: E402
from run import CONFIG, PORT, SERVER  # noqa: E402

from disaggctl.deployment import ConfigFile, DesiredState, Placement, Process  # noqa: E402
from disaggctl.loader import load_text  # noqa: E402
from disaggctl.spec import Role  # noqa: E402
from disaggctl.targets import OpsContext  # noqa: E402
from disaggctl.targets.systemd.backend import SystemdBackend  # noqa: E402

atexit.register(gc.freeze)  # as disaggctl.cli does: no collector walk over every object at exit

T_IMPORTED = time.time()
hosts = [tuple(h) for h in json.loads(Path(sys.argv[1]).read_text())]
base = Path(sys.argv[2])
ssh = f'{{key: "{base}/client_key", known_hosts: "{base}/known_hosts", strict_host_keys: true}}'
spec_text = f"""
name: fan
model: {{path: /models/tiny}}
hosts:
{"".join(f"  - {{name: {n}, address: {ip}, gpus: 2, ssh: {ssh}}}" + chr(10) for n, ip in hosts)}
kv_transfer: {{kind: shared-storage, path: /var/tmp/kv}}
target: {{kind: systemd, unit_prefix: bd, install_dir: /etc/bench-dctl, state_dir: /var/lib/bench-dctl}}
health: {{startup_timeout_s: 60, interval_s: 0.05}}
"""
loaded = load_text(spec_text, "fan.yaml")
cfg = "/etc/bench-dctl/fan"
procs = [
    Process(
        name=f"app-{n}",
        instance=f"decode-{i}",
        role=Role.DECODE,
        host=n,
        address=ip,
        argv=["/usr/bin/python3", "-S", f"{cfg}/server.py", str(PORT)],
        files=["server.py", "app.json"],
        http_port=PORT,
        start_order=0,
    )
    for i, (n, ip) in enumerate(hosts)
]
files = {
    n: [ConfigFile(name="server.py", content=SERVER, mode=0o755), ConfigFile(name="app.json", content=CONFIG)]
    for n, _ in hosts
}
ip0 = hosts[0][1]
desired = DesiredState(
    name="fan",
    vllm_version="0.32.0",
    model_name="tiny",
    kv_kind="shared-storage",
    config_dir=cfg,
    processes=procs,
    files=files,
    router_url=f"http://{ip0}:8000",
    placement=Placement(name="fan", instances=[], router_host=hosts[0][0], router_address=ip0, router_port=8000),
)
console = Console(stderr=True, force_terminal=False)
ctx = OpsContext(loaded=loaded, desired=desired, console=console, yes=True)
if len(sys.argv) > 3:
    from phases import Recorder

    rec = Recorder(T_MAIN, T_IMPORTED)
    rec.instrument()
    rc = SystemdBackend().apply(ctx, None)
    rec.write(Path(sys.argv[3]))
    sys.exit(rc)
sys.exit(SystemdBackend().apply(ctx, None))
