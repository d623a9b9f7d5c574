"""Targets run a compiled deployment: systemd hosts over SSH, a Slurm cluster, or this machine.

Each target subpackage (`systemd/`, `slurm/`, `local/`) has a `backend` module exposing
`backend() -> Backend`. The CLI loads the spec, compiles it and hands an `OpsContext` to the
backend of `spec.target.kind`. What every target shares lives once, next to this protocol:

    base     the closed set of plan actions (one per process), the one saved-plan format,
             the one confirmation, stale-plan checks
    gate     the one health gate: /health of each start phase, the router sees its upstreams,
             the canary (same inputs for every connector); HTTP transport injectable
    status   the one status report (docs/status.md)
    ui       apply progress (Phases)

A target says only how it reaches its hosts (SSH, sbatch/squeue, this machine) and what a unit
is (a systemd service, a het-job component, a row of the supervisor's process table).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console

    from disaggctl.deployment import DesiredState
    from disaggctl.loader import LoadedSpec
    from disaggctl.spec import ClusterSpec
    from disaggctl.topology import TopologyFile


@dataclass
class OpsContext:
    """What every operation gets: the spec, its compiled state and the user's options."""

    loaded: LoadedSpec
    desired: DesiredState
    console: Console
    topology: TopologyFile | None = None
    yes: bool = False  # do not ask for confirmation
    output: str = "text"  # "text" or "json"
    diff: bool = False  # show unified diffs in plans
    options: dict[str, object] = field(default_factory=dict)  # backend-specific CLI options

    @property
    def spec(self) -> ClusterSpec:
        return self.loaded.spec


class Backend(Protocol):
    """The operations of a target. Each returns the process exit code."""

    def plan(self, ctx: OpsContext, out_file: str | None, detailed_exitcode: bool) -> int: ...

    def apply(self, ctx: OpsContext, plan_file: str | None) -> int: ...

    def status(self, ctx: OpsContext) -> int: ...

    def destroy(self, ctx: OpsContext) -> int: ...

    def logs(self, ctx: OpsContext, role: str | None, instance: int | None, follow: bool, lines: int) -> int: ...


_MODULES = {
    "systemd": "disaggctl.targets.systemd.backend",
    "slurm": "disaggctl.targets.slurm.backend",
    "local": "disaggctl.targets.local.backend",
}


def get_backend(kind: str) -> Backend:
    module = importlib.import_module(_MODULES[kind])
    backend: Backend = module.backend()
    return backend
