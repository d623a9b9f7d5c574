"""The local target's side of a rolling change (targets/rolling.py plans it, targets/rollout.py
runs it): which instances roll, and how one instance restarts with its new definition.

One instance restarts at a time by rewriting the process table with only the instances rolled so
far changed and SIGHUPing the supervisor (it restarts exactly the rows that changed); the final
table (router, new and removed processes) is written after the last step.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Set
from dataclasses import replace
from typing import TYPE_CHECKING

from disaggctl.render.local import Table, paths
from disaggctl.targets.base import Action, ProcessAction
from disaggctl.targets.local.supervisor import supervisor_pid, write_atomic
from disaggctl.targets.rolling import RollPlan, plan_rollout
from disaggctl.targets.rollout import roll_instances

if TYPE_CHECKING:
    from disaggctl.deployment import DesiredState
    from disaggctl.spec import ClusterSpec

VLLM_ROLES = ("prefill", "decode")


def rolled_instances(old: Table, actions: list[ProcessAction], failed: Set[str]) -> set[str]:
    """Instances whose running process restarts with this change (not new, not failed ones)."""
    running = {p.instance for p in old.processes if p.role in VLLM_ROLES and p.name not in failed}
    return {
        a.instance
        for a in actions
        if a.instance in running and a.role in VLLM_ROLES and a.action in (Action.UPDATE, Action.RESTART)
    }


def head_argv(tbl: Table, failed: Set[str] = frozenset()) -> dict[str, list[str]]:
    return {p.instance: p.argv for p in tbl.processes if p.role in VLLM_ROLES and p.name == p.instance
            and p.name not in failed}  # fmt: skip


def local_rollplan(
    spec: ClusterSpec, desired: DesiredState, old: Table, new: Table, actions: list[ProcessAction], failed: Set[str]
) -> RollPlan:
    """The rolling plan of a local change: fingerprints from the running and the new table's argv."""
    restart = rolled_instances(old, actions, failed)
    if not restart:
        return plan_rollout([])
    return plan_rollout(roll_instances(spec, desired, head_argv(old, failed), head_argv(new), restart))


def intermediate(old: Table, new: Table, done: Set[str]) -> Table:
    """The old table with the rows of the instances in `done` taken from the new one."""
    fresh = {p.name: p for p in new.processes}
    rows = [fresh.get(p.name, p) if p.instance in done else p for p in old.processes]
    return replace(old, processes=rows)


class LocalRestarter:
    """restart(instances) for the RolloutRunner: table with them changed, SIGHUP, wait."""

    def __init__(self, state_dir: str, old: Table, new: Table, wait: Callable[[str, list[str], float], None]) -> None:
        self.state_dir = state_dir
        self.old = old
        self.new = new
        self.done: set[str] = set()
        self.wait = wait  # backend._wait_reloaded(state_dir, process names, since)

    def __call__(self, instances: list[str]) -> None:
        self.done |= set(instances)
        tbl = intermediate(self.old, self.new, self.done)
        names = [p.name for p in tbl.processes if p.instance in instances]
        self.signal(tbl, names)

    def finish(self) -> list[str]:
        """Write the final table; returns the processes this last reload restarts."""
        before = {p.name: p for p in intermediate(self.old, self.new, self.done).processes}
        names = [p.name for p in self.new.processes if before.get(p.name) != p]
        self.signal(self.new, names)
        return names

    def signal(self, tbl: Table, names: list[str]) -> None:
        t0 = time.time()
        write_atomic(paths(self.state_dir)["table"], tbl.to_json())
        pid = supervisor_pid(self.state_dir)
        if pid is None:
            from disaggctl.errors import DisaggError

            raise DisaggError(f"the supervisor of {self.state_dir} stopped during the rollout")
        os.kill(pid, signal.SIGHUP)
        if names:
            self.wait(self.state_dir, names, t0)
