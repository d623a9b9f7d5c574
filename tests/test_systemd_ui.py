"""Plan and progress output: symbols, reasons, hidden secrets, per-phase elapsed lines."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from disaggctl.targets.base import Action
from disaggctl.targets.systemd.changes import FileChange, HostPlan, Plan, UnitChange
from disaggctl.targets.systemd.ui import print_plan
from disaggctl.targets.ui import Phases


def _console(terminal: bool = False) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=160, force_terminal=terminal, color_system=None), out


def _plan() -> Plan:
    return Plan(
        deployment="d",
        hosts=[
            HostPlan(
                host="s1",
                files=[
                    FileChange(path="/etc/d/router.json", action=Action.UPDATE, reason="content differs"),
                    FileChange(path="/etc/d/secrets.env", action=Action.UPDATE, secret=True, reason="content differs"),
                    FileChange(path="/etc/d/old.yaml", action=Action.DELETE, reason="no longer in the spec"),
                    FileChange(path="/etc/d/same.yaml", action=Action.UNCHANGED),
                ],
                units=[UnitChange(unit="d-router.service", action=Action.RESTART, reason="router.json changed")],
            ),
            HostPlan(host="s2", error="s2: cannot connect"),
        ],
    )


def test_plan_lines_reasons_and_hidden_secrets() -> None:
    console, out = _console()
    diffs = {("s1", "/etc/d/router.json"): "-a\n+b\n", ("s1", "/etc/d/secrets.env"): "-TOKEN=old\n+TOKEN=new\n"}
    print_plan(console, _plan(), diffs)
    text = out.getvalue()
    assert "~ update    /etc/d/router.json  (content differs)" in text
    assert "      -a" in text and "      +b" in text
    assert "secret, content hidden" in text and "TOKEN" not in text
    assert "- delete    /etc/d/old.yaml" in text and "↻ restart   d-router.service  (router.json changed)" in text
    assert "= 1 unchanged" in text and "s2  cannot plan: s2: cannot connect" in text
    assert "Plan: 0 to create, 2 to update, 1 to restart, 1 to delete." in text


def test_no_changes() -> None:
    console, out = _console()
    print_plan(console, Plan(deployment="d", hosts=[HostPlan(host="s1")]))
    assert "No changes." in out.getvalue()


@pytest.mark.parametrize("terminal", [False, True])
def test_phases_print_host_phase_and_elapsed(terminal: bool) -> None:
    console, out = _console(terminal)
    with Phases(console) as phases:
        with phases.step("s1", "files"):
            pass
        with pytest.raises(RuntimeError), phases.step("s2", "start decode"):
            raise RuntimeError("boom")
        phases.note("canary: ok")
    lines = [line for line in out.getvalue().splitlines() if "s1" in line or "s2" in line or "canary" in line]
    assert any("s1" in line and "files" in line and "ok" in line and line.rstrip().endswith("s") for line in lines)
    assert any("s2" in line and "start decode" in line and "FAILED" in line for line in lines)
    assert any("canary: ok" in line for line in lines)
