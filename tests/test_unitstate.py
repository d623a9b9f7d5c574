"""The cgroup unit-state probe (disaggctl/unitstate.py): parsing, and the same answer as
`systemctl show` on real systemd hosts for running, stopped, failed, restarting and missing units."""

from __future__ import annotations

import base64

import pytest

from disaggctl.ssh import SshTarget, connect
from disaggctl.unitstate import UnitState, parse_unit_states, unit_state_argv
from tests.plugins.infra import TestHosts


def test_parse_unit_states() -> None:
    cmd = base64.b64encode(b"sleep\x002000\x00").decode()
    out = f"a.service 2 39 1 {cmd}\nb.service 0 0 0 -\nnoise\nc.service 1 0 0 -\n"
    s = parse_unit_states(out, ["a.service", "b.service", "c.service", "d.service"])
    assert s["a.service"] == UnitState("a.service", 2, 39, True, ("sleep", "2000"))
    assert s["a.service"].running and not s["b.service"].running
    assert s["c.service"] == UnitState("c.service", 1, 0, False, None) and not s["c.service"].running
    assert s["d.service"] == UnitState("d.service")  # not printed: not running


def test_unit_state_argv_refuses_what_has_no_cgroup() -> None:
    assert unit_state_argv(["a.service"])[-1] == "a.service"
    for bad in (["x.target"], ["../x.service"], [".service"]):
        with pytest.raises(ValueError):
            unit_state_argv(bad)


UNITS = {
    # Type=exec like the rendered units; a child process in the cgroup besides the main one
    "dctl-us-run.service": "ExecStart=/bin/sh -c 'sleep 1000 & exec sleep 2000'",
    "dctl-us-stopped.service": "ExecStart=/bin/sleep 1000",
    "dctl-us-failed.service": "ExecStart=/bin/false",
    "dctl-us-restart.service": "ExecStart=/bin/false\nRestart=always\nRestartSec=300",
}
START = ["dctl-us-run.service", "dctl-us-failed.service", "dctl-us-restart.service"]


def _unit(body: str) -> bytes:
    text = f"[Unit]\nDescription=unitstate test\n[Service]\nType=exec\n{body}\n"
    return (text + "[Install]\nWantedBy=multi-user.target\n").encode()


@pytest.mark.infra
def test_same_answer_as_systemctl_show(systemd_hosts: TestHosts) -> None:
    def target(user: str) -> SshTarget:
        return SshTarget(name="s1", address=systemd_hosts.ip("s1"), user=user, key=str(systemd_hosts.key),
                         known_hosts=str(systemd_hosts.known_hosts), connect_timeout=5)

    units = [*UNITS, "dctl-us-missing.service"]
    with connect(target("root")) as root, connect(target("deploy")) as deploy:
        try:
            for name, body in UNITS.items():
                root.put(f"/etc/systemd/system/{name}", _unit(body))
            root.check(["systemctl", "daemon-reload"])
            root.check(["systemctl", "enable", "dctl-us-run.service", "dctl-us-stopped.service"])
            for u in START:
                root.run(["systemctl", "start", u], timeout=30)  # the failing ones exit non-zero
            show = root.check(["systemctl", "show", "--property=Id,ActiveState,SubState,MainPID", "--", *units]).out
            facts = {}
            for block in show.strip().split("\n\n"):
                kv = dict(line.split("=", 1) for line in block.splitlines())
                facts[kv["Id"]] = kv
            r = deploy.run(unit_state_argv(units))  # as the non-root user, without sudo
            assert r.ok, r.err
            got = parse_unit_states(r.out, units)
        finally:
            root.run(["systemctl", "disable", "--now", *UNITS], timeout=60)
            root.run(["rm", "-f", *(f"/etc/systemd/system/{u}" for u in UNITS)])
            root.run(["systemctl", "daemon-reload"])
            root.run(["systemctl", "reset-failed"])
    expected = {
        "dctl-us-run.service": ("active", "running"),
        "dctl-us-stopped.service": ("inactive", "dead"),
        "dctl-us-failed.service": ("failed", "failed"),
        "dctl-us-restart.service": ("activating", "auto-restart"),
        "dctl-us-missing.service": ("inactive", "dead"),
    }
    assert {u: (f["ActiveState"], f["SubState"]) for u, f in facts.items()} == expected
    for u in units:
        f, g = facts[u], got[u]
        assert g.running == (f["ActiveState"] == "active" and f["SubState"] == "running"), (u, f, g)
        assert g.main_pid == int(f["MainPID"]), (u, f, g)
    run = got["dctl-us-run.service"]
    assert run.cmdline == ("sleep", "2000") and run.processes == 2 and run.enabled
    assert got["dctl-us-stopped.service"].enabled and not got["dctl-us-failed.service"].enabled
