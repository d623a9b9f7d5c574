"""The systemd target's side of a rolling change (targets/rolling.py plans it, targets/rollout.py
runs it): which running instances roll, their fingerprints before (from the running MainPID's
command line that observe reads) and after (the compiled argv), and how one instance restarts
(`systemctl restart` of its unit on its host, after the new unit files were pushed).

An instance whose running command line is unknown gets an unknown fingerprint: the planner then
treats the change as a fingerprint change (the safe side).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from disaggctl.targets.base import Action
from disaggctl.targets.rolling import RollInstance, RollPlan, plan_rollout
from disaggctl.targets.rollout import fingerprinter

if TYPE_CHECKING:
    from disaggctl.deployment import DesiredState
    from disaggctl.spec import ClusterSpec
    from disaggctl.targets.invariants import InvariantCheck
    from disaggctl.targets.systemd.changes import Observed, Plan

UNKNOWN = "unknown: the running command line was not observed"


def served_argv(cmdline: list[str] | None) -> list[str] | None:
    """A running `vllm serve` command line as compile writes it (`vllm serve MODEL ...`): an
    interpreter or wrapper in front (`python3 /opt/vllm/bin/vllm serve ...`) is dropped."""
    if not cmdline or "serve" not in cmdline:
        return None
    i = cmdline.index("serve")
    return cmdline[i - 1 :] if i >= 1 else ["vllm", *cmdline]


@dataclass
class SystemdRoll:
    """The rolling plan of a systemd change and where each rolled instance's unit is."""

    plan: RollPlan
    units: dict[str, tuple[str, str]] = field(default_factory=dict)  # instance -> (host, unit)

    @property
    def rolled_units(self) -> set[str]:
        return {self.units[n][1] for n in self.plan.rolled if n in self.units}

    def by_host(self, instances: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in instances:
            host, unit = self.units[n]
            out.setdefault(host, []).append(unit)
        return out


def systemd_roll(
    spec: ClusterSpec,
    desired: DesiredState,
    plan: Plan,
    observed: Mapping[str, Observed],
    unit_of: Mapping[str, str],
) -> SystemdRoll | None:
    """None when the change restarts no running vLLM instance (then nothing is fingerprinted:
    a no-op plan of a large deployment stays cheap)."""
    restart_units = {u.unit for h in plan.hosts for u in h.units_with(Action.RESTART)}
    if not any(_running(observed, p.host, unit_of[p.name]) for p in desired.processes
               if p.name == p.instance and unit_of.get(p.name) in restart_units):  # fmt: skip
        return None
    digest = fingerprinter(spec, desired)
    instances: list[RollInstance] = []
    units: dict[str, tuple[str, str]] = {}
    for p in desired.processes:
        if p.role.value not in ("prefill", "decode") or p.name != p.instance:
            continue
        unit = unit_of[p.name]
        obs = observed.get(p.host)
        fact = obs.units.get(unit) if obs is not None else None
        running = fact is not None and fact.running
        old = served_argv(fact.cmdline) if fact is not None else None
        old_fp = (digest(p.name, old) if old is not None else UNKNOWN) if running else None
        instances.append(RollInstance(p.name, p.role.value, unit in restart_units, old_fp, digest(p.name, p.argv)))
        units[p.name] = (p.host, unit)
    roll = plan_rollout(instances)
    return None if roll.strategy == "none" else SystemdRoll(roll, units)


def systemd_checks(
    spec: ClusterSpec,
    desired: DesiredState,
    observed: Mapping[str, Observed],
    unit_of: Mapping[str, str],
    fetch: Callable[[str, float], bytes] | None = None,
) -> list[InvariantCheck]:
    """`status --check` on systemd hosts: the running instances' metrics (read from this machine,
    like /health) and fingerprints (from the running command lines), and the router's metrics."""
    from disaggctl.targets.gate import http_fetch
    from disaggctl.targets.invariants import scrape_and_check
    from disaggctl.targets.rollout import running_fingerprints

    urls: dict[str, tuple[str, str]] = {}
    argv: dict[str, list[str]] = {}
    for p in desired.processes:
        if p.role.value not in ("prefill", "decode") or p.name != p.instance or not p.health_url:
            continue
        if not _running(observed, p.host, unit_of[p.name]):
            continue
        urls[p.name] = (p.role.value, p.health_url.rsplit("/", 1)[0])
        fact = observed[p.host].units[unit_of[p.name]]
        served = served_argv(fact.cmdline)
        if served is not None:
            argv[p.name] = served
    router = desired.router_url.rstrip("/") + "/metrics" if spec.router.kind == "builtin" else None
    return scrape_and_check(urls, router, running_fingerprints(spec, desired, argv), fetch or http_fetch)


def _running(observed: Mapping[str, Observed], host: str, unit: str) -> bool:
    obs = observed.get(host)
    fact = obs.units.get(unit) if obs is not None else None
    return fact is not None and fact.running


def restarter(roll: SystemdRoll, restart_on: Callable[[str, list[str]], None]) -> Callable[[list[str]], None]:
    """restart(instances) for the RolloutRunner; `restart_on(host, units)` restarts units on a host."""

    def restart(instances: list[str]) -> None:
        for host, units in roll.by_host(instances).items():
            restart_on(host, units)

    return restart
