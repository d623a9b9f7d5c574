"""Hostile strings through REAL systemd: render units whose ExecStart runs a dumper, start them on
a systemd host, and compare the argv and environment the process received, byte for byte.

The pure property test (test_systemd_quoting.py) checks many more strings against a parser that
follows systemd's rules; this one proves those rules on a real systemd 252 for a sample drawn
from the same strategy plus the known trouble makers.
"""

from __future__ import annotations

import json
import random

import pytest

from disaggctl.deployment import DesiredState
from disaggctl.render.systemd import render_systemd
from disaggctl.ssh import SshTarget, connect
from tests.plugins.infra import TestHosts
from tests.test_systemd_quoting import TROUBLE, random_hostile
from tests.test_systemd_render import _state

pytestmark = pytest.mark.infra

DUMPER = """#!/usr/bin/python3
import json, os, sys
unit = os.environ["DUMP_NAME"]
with open(f"/run/dump/{unit}.json", "w") as f:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, f)
"""


def _cases() -> list[tuple[list[str], str]]:
    rng = random.Random(20261127)
    cases = [([t, "x"], t) for t in TROUBLE]
    cases += [([random_hostile(rng), random_hostile(rng)], random_hostile(rng)) for _ in range(40)]
    return cases


def test_hostile_argv_and_env_reach_the_process_unchanged(systemd_hosts: TestHosts) -> None:
    desired, spec = _state()
    base = next(p for p in desired.processes if p.host == "s2")
    cases = _cases()
    procs = [
        base.model_copy(
            update={
                "name": f"q{i}",
                "argv": ["/usr/local/bin/dctl-dump", *argv],
                "env": {"DUMP_NAME": f"q{i}", "HOSTILE": env},
                "start_order": 0,
            }
        )
        for i, (argv, env) in enumerate(cases)
    ]
    secret = "hf_\"q' $HOME `x` \\n \\ %n ; é"
    state = desired.model_copy(update={"processes": procs, "files": {}})
    assert isinstance(state, DesiredState)
    rendered = render_systemd(state, spec, {"HF_TOKEN": secret})  # type: ignore[arg-type]
    units = rendered.units["s2"]
    t = SshTarget(
        name="s2",
        address=systemd_hosts.ip("s2"),
        key=str(systemd_hosts.key),
        known_hosts=str(systemd_hosts.known_hosts),
        strict=True,
    )
    with connect(t) as c:
        c.run(["sh", "-c", "rm -rf /run/dump /etc/disaggctl/demo; mkdir -p /run/dump /etc/disaggctl/demo"])
        c.put("/usr/local/bin/dctl-dump", DUMPER.encode(), 0o755)
        for f in rendered.for_host("s2"):
            c.put(f.path, f.content.encode(), f.mode)
        c.check(["systemctl", "daemon-reload"])
        r = c.run(["systemctl", "start", *units])
        assert r.rc == 0, r.err
        seen = {}
        for i in range(len(cases)):
            for _ in range(50):
                data = c.get(f"/run/dump/q{i}.json")
                if data:
                    break
                c.run(["sleep", "0.1"])
            assert data, f"unit q{i} wrote nothing: {c.run(['journalctl', '-u', units[i], '-n', '5']).out}"
            seen[i] = json.loads(data)
        c.run(
            [
                "sh",
                "-c",
                "rm -f /etc/systemd/system/disaggctl-demo*; systemctl daemon-reload; "
                "rm -rf /run/dump /etc/disaggctl/demo",
            ]
        )
    for i, (argv, env) in enumerate(cases):
        assert seen[i]["argv"] == argv, (i, argv)
        assert seen[i]["env"]["HOSTILE"] == env, (i, env)
        assert seen[i]["env"]["HF_TOKEN"] == secret
