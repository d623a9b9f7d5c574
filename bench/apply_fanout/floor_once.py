#!/usr/bin/env python3
"""The floor: a bare paramiko loop, one connection per host in threads, pinned host keys.

Per host: connect, one command that hashes the three files; when they differ, SFTP-put them and
run one command (daemon-reload + restart). Prints "changed" when any host changed. No plan, no
manifest, no atomic rename, no health gate (run.py polls HTTP afterwards, outside the tool).
Usage: floor_once.py HOSTS_JSON SYSHOSTS_BASE
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import paramiko

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]
from run import CONFIG, SERVER, unit_text  # noqa: E402

hosts = [tuple(h) for h in json.loads(Path(sys.argv[1]).read_text())]
base = Path(sys.argv[2])
FILES = {
    "/etc/bench/server.py": SERVER.encode(),
    "/etc/bench/app.json": CONFIG.encode(),
    "/etc/systemd/system/bench-floor.service": unit_text("floor", "/etc/bench").encode(),
}
WANT = "".join(f"{hashlib.sha256(d).hexdigest()}  {p}\n" for p, d in FILES.items())


def run(c: paramiko.SSHClient, cmd: str) -> tuple[int, str]:
    _, o, _e = c.exec_command(cmd)
    out = o.read().decode()
    return o.channel.recv_exit_status(), out


def one(h: tuple[str, str]) -> bool:
    c = paramiko.SSHClient()
    c.load_host_keys(str(base / "known_hosts"))
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    c.connect(h[1], username="root", key_filename=str(base / "client_key"), look_for_keys=False, allow_agent=False)
    try:
        _, have = run(c, "sha256sum " + " ".join(FILES) + " 2>/dev/null")
        if have == WANT:
            return False
        s = c.open_sftp()
        with contextlib.suppress(OSError):
            s.mkdir("/etc/bench")
        for p, d in FILES.items():
            s.putfo(io.BytesIO(d), p)
        s.chmod("/etc/bench/server.py", 0o755)
        s.close()
        rc, _ = run(
            c,
            # one systemd reload, like disaggctl (a plain `enable` would reload a second time)
            "systemctl enable --no-reload -q bench-floor.service && systemctl daemon-reload && "
            "systemctl restart bench-floor.service",
        )
        assert rc == 0
        return True
    finally:
        c.close()


with ThreadPoolExecutor(len(hosts)) as ex:
    changed = any(list(ex.map(one, hosts)))
print("changed" if changed else "unchanged")
