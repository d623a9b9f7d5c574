"""P/D-coherent rolling changes: the order in which `apply` restarts running instances (pure).

A change that restarts running vLLM instances is rolled one instance (or `batch` instances of
one role) at a time; each step is drain -> restart -> /health -> canary through that instance ->
back in rotation. The order comes from the compatibility fingerprints (docs/compat.md):

- **Fingerprint unchanged** (the new generation pairs with the old one): decode instances first,
  then prefill. A new decode then only ever receives KV from prefills it is compatible with, and
  prefill's KV lease is never cut short by a decode restart (vLLM's pull connector: decode reads
  from prefill, so a restarting prefill would fail the transfers decode still has to make; it
  is drained, which waits for those pulls, before it restarts).
- **Fingerprint changed** (the two generations refuse each other's handshake): old prefill must
  never pair with new decode, nor new prefill with old decode. The instances are split in two
  cohorts (B: half of each role, A: the rest). B is drained and restarted out of rotation and
  checked with a canary inside B; then the switch: drain A's prefills, undrain B's decodes,
  drain A's decodes, undrain B's prefills. Between the first and the last switch step no prefill
  is in rotation, so the router serves aggregated on the decodes in rotation; mixed-generation
  pairs never carry a request. Then A is restarted and put back.

A step that takes the last instance of a role out of rotation needs the router's aggregated
fallback (every instance can prefill and decode; the router serves on the surviving role).
Without it the step is a *gap*: requests arriving during it fail. A fingerprint change with
one instance of a role cannot be rolled at all without mixed pairs or a gap. `plan` shows
both; `apply` asks before it runs such a rollout.

Only `RollInstance` data goes in; `RollPlan` comes out. The targets execute it (`rollout.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

ROLES = ("decode", "prefill")


class Op(StrEnum):
    """What one rollout step does to its instances."""

    DRAIN = "drain"  # out of rotation; wait for in-flight requests (and decode's KV pulls) to finish
    RESTART = "restart"  # restart with the new definition; wait for /health; canary through it
    UNDRAIN = "undrain"  # back in rotation


@dataclass(frozen=True)
class RollInstance:
    """One vLLM instance as the planner sees it."""

    name: str
    role: str  # "prefill" | "decode"
    restart: bool  # the change restarts it (definition changed, or it must start again)
    old_fingerprint: str | None  # None: not running now (new, or stopped): it starts, it is not rolled
    new_fingerprint: str

    @property
    def running(self) -> bool:
        return self.old_fingerprint is not None

    @property
    def fingerprint_changes(self) -> bool:
        return self.running and self.old_fingerprint != self.new_fingerprint


@dataclass(frozen=True)
class Step:
    """One step of the rollout: `op` on `instances` (all of one role)."""

    op: Op
    instances: tuple[str, ...]
    role: str
    in_rotation_after: tuple[str, ...]  # every instance the router may route to after this step
    role_empty: bool = False  # after this step no instance of some role is in rotation
    canary_with: tuple[str, ...] = ()  # RESTART: partner instances for the canary through it
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "op": self.op.value,
            "instances": list(self.instances),
            "role": self.role,
            "role_empty": self.role_empty,
            "canary_with": list(self.canary_with),
            "in_rotation_after": list(self.in_rotation_after),
            "note": self.note,
        }

    def describe(self) -> str:
        what = f"{self.op.value} {', '.join(self.instances)}"
        if self.canary_with:
            what += f" (canary with {', '.join(self.canary_with)})"
        if self.role_empty:
            what += " [no instance of a role in rotation: aggregated fallback]"
        return what + (f": {self.note}" if self.note else "")


@dataclass
class RollPlan:
    """The ordered steps, and why the order is what it is."""

    strategy: str  # "none" | "decode-first" | "cohorts" | "unsafe"
    steps: list[Step] = field(default_factory=list)
    fingerprint_change: bool = False
    needs_fallback: bool = False  # some step empties a role: needs the router's aggregated fallback
    unsafe: list[str] = field(default_factory=list)  # why it cannot be rolled safely (apply asks)
    notes: list[str] = field(default_factory=list)

    @property
    def rolled(self) -> list[str]:
        return [n for s in self.steps if s.op is Op.RESTART for n in s.instances]

    def problems(self, router_fallback: bool) -> list[str]:
        """What breaks requests with this router: the unsafe reasons, and gaps without fallback."""
        out = list(self.unsafe)
        if self.needs_fallback and not router_fallback:
            gaps = [s.describe() for s in self.steps if s.role_empty and s.op is not Op.UNDRAIN]
            out.append(
                "the router has no aggregated fallback: requests fail while no instance of a role is in "
                f"rotation ({'; '.join(gaps)})"
            )
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "strategy": self.strategy,
            "fingerprint_change": self.fingerprint_change,
            "needs_fallback": self.needs_fallback,
            "unsafe": list(self.unsafe),
            "notes": list(self.notes),
            "steps": [s.to_dict() for s in self.steps],
        }


class _Rotation:
    """Which instances the router may route to, as the steps are laid out."""

    def __init__(self, instances: list[RollInstance]) -> None:
        self.role = {i.name: i.role for i in instances}
        self.order = [i.name for i in instances]
        self.active = {i.name for i in instances if i.running}
        self.steps: list[Step] = []

    def _empty(self) -> bool:
        return any(not any(self.role[n] == r for n in self.active) for r in ROLES)

    def now(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if n in self.active)

    def add(self, op: Op, names: list[str], note: str = "", partners: tuple[str, ...] = ()) -> None:
        if op is Op.DRAIN:
            self.active -= set(names)
        elif op is Op.UNDRAIN:
            self.active |= set(names)
        role = self.role[names[0]]
        self.steps.append(Step(op, tuple(names), role, self.now(), self._empty(), partners, note))

    def partners(self, role: str, within: list[str] | None = None) -> tuple[str, ...]:
        """Canary partners of the other role: in rotation (or, inside a cohort, the cohort's)."""
        other = "prefill" if role == "decode" else "decode"
        pool = within if within is not None else [n for n in self.order if n in self.active]
        return tuple(n for n in pool if self.role[n] == other)[:1]


def _chunks(names: list[str], size: int) -> list[list[str]]:
    return [names[i : i + size] for i in range(0, len(names), size)]


def plan_rollout(instances: list[RollInstance], batch: int = 1) -> RollPlan:
    """The order in which to restart the running instances that `instances` marks for restart.

    `batch`: at most this many instances of one role out of rotation at once (>= 1).
    Instances that are not running start with the change (no drain); they are not steps.
    """
    batch = max(1, batch)
    rolled = [i for i in instances if i.restart and i.running]
    if not rolled:
        return RollPlan("none")
    fp_change = any(i.fingerprint_changes for i in instances) or _mixed_new(instances)
    if not fp_change:
        return _decode_first(instances, rolled, batch)
    return _cohorts(instances, batch)


def _mixed_new(instances: list[RollInstance]) -> bool:
    """The new generation's prefill and decode fingerprints differ from what runs (a new instance
    whose fingerprint no running instance of the other role has)."""
    running = {i.old_fingerprint for i in instances if i.running}
    return bool(running) and any(not i.running and i.new_fingerprint not in running for i in instances)


def _decode_first(instances: list[RollInstance], rolled: list[RollInstance], batch: int) -> RollPlan:
    rot = _Rotation(instances)
    for role in ROLES:
        names = [i.name for i in rolled if i.role == role]
        for chunk in _chunks(names, batch):
            rot.add(Op.DRAIN, chunk)
            rot.add(Op.RESTART, chunk, partners=rot.partners(role))
            rot.add(Op.UNDRAIN, chunk)
    plan = RollPlan("decode-first", rot.steps)
    plan.needs_fallback = any(s.role_empty for s in rot.steps)
    plan.notes.append("the fingerprints do not change: decode instances first, then prefill")
    return plan


def _cohorts(instances: list[RollInstance], batch: int) -> RollPlan:
    """Fingerprint change: two cohorts, a generation switch that never forms a mixed pair."""
    running = [i for i in instances if i.running]
    plan = RollPlan("cohorts", fingerprint_change=True)
    by_role = {r: [i.name for i in running if i.role == r] for r in ROLES}
    short = [r for r in ROLES if len(by_role[r]) < 2]
    if short:
        plan.strategy = "unsafe"
        plan.unsafe.append(
            f"the compatibility fingerprint changes and {' and '.join(short)} has a single running instance: "
            "the old and new generations refuse each other's KV, so every order either pairs an old "
            "instance with a new one or leaves no instance of a role serving; restart everything at once "
            "(requests fail until it is back) or add an instance per role first"
        )
        rot = _Rotation(instances)
        for role in ROLES:
            for chunk in _chunks(by_role[role], batch):
                rot.add(Op.DRAIN, chunk)
                rot.add(Op.RESTART, chunk)
                rot.add(Op.UNDRAIN, chunk)
        plan.steps = rot.steps
        plan.needs_fallback = True
        return plan
    cohort_b = {r: by_role[r][len(by_role[r]) - len(by_role[r]) // 2 :] for r in ROLES}
    cohort_a = {r: by_role[r][: len(by_role[r]) - len(by_role[r]) // 2] for r in ROLES}
    rot = _Rotation(instances)
    b_all = cohort_b["decode"] + cohort_b["prefill"]
    _restart_out_of_rotation(rot, cohort_b, b_all, batch, "cohort B (new generation), out of rotation")
    note = "generation switch: no mixed pair is ever in rotation"
    rot.add(Op.DRAIN, cohort_a["prefill"], note)
    rot.add(Op.UNDRAIN, cohort_b["decode"], note)
    rot.add(Op.DRAIN, cohort_a["decode"], note)
    rot.add(Op.UNDRAIN, cohort_b["prefill"], note)
    a_all = cohort_a["decode"] + cohort_a["prefill"]
    _restart_out_of_rotation(rot, cohort_a, a_all, batch, "cohort A (new generation)", drain=False)
    for role in ROLES:
        rot.add(Op.UNDRAIN, cohort_a[role], "cohort A back in rotation")
    plan.steps = rot.steps
    plan.needs_fallback = True  # the switch serves aggregated on decode while no prefill is in rotation
    plan.notes.append(
        f"the fingerprint changes: cohort B ({', '.join(b_all)}) is restarted out of rotation and checked "
        f"within itself, then the router is switched to it, then cohort A ({', '.join(a_all)})"
    )
    return plan


def _restart_out_of_rotation(
    rot: _Rotation, cohort: dict[str, list[str]], members: list[str], batch: int, note: str, drain: bool = True
) -> None:
    if drain:
        for role in ROLES:
            for chunk in _chunks(cohort[role], batch):
                rot.add(Op.DRAIN, chunk, note)
    for role in ROLES:  # decode first; the canary runs once the cohort's prefill is new as well
        for chunk in _chunks(cohort[role], batch):
            partners = rot.partners(role, within=members) if role == "prefill" else ()
            rot.add(Op.RESTART, chunk, note, partners=partners)


def render_text(plan: RollPlan, router_fallback: bool, problems: list[str] | None = None) -> list[str]:
    """The lines `plan` prints for a rollout (empty when nothing running restarts); `problems`:
    instead of the plan's own (rollout.rollout_problems adds the router's)."""
    if plan.strategy == "none":
        return []
    out = [f"rolling order ({plan.strategy}):"]
    out += [f"  {n}. {s.describe()}" for n, s in enumerate(plan.steps, 1)]
    out += [f"  note: {n}" for n in plan.notes]
    probs = plan.problems(router_fallback) if problems is None else problems
    out += [f"  cannot roll safely: {p}" for p in probs]
    return out
