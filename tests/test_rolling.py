"""The rolling planner (targets/rolling.py): every plan is replayed step by step and checked
against the P/D invariants it promises."""

from __future__ import annotations

import itertools

import pytest

from disaggctl.targets.rolling import Op, RollInstance, RollPlan, plan_rollout, render_text


def fleet(n_prefill: int, n_decode: int, *, fp_change: bool = False, restart: bool = True) -> list[RollInstance]:
    new = "new" if fp_change else "old"
    out = [RollInstance(f"decode-{i}", "decode", restart, "old", new) for i in range(n_decode)]
    out += [RollInstance(f"prefill-{i}", "prefill", restart, "old", new) for i in range(n_prefill)]
    return out


def replay(instances: list[RollInstance], plan: RollPlan) -> list[dict[str, str]]:
    """Walk the steps; return the generation ("old"/"new" fingerprint) of each in-rotation
    instance after every step, and check the step's own bookkeeping."""
    gen = {i.name: i.old_fingerprint or i.new_fingerprint for i in instances}
    new = {i.name: i.new_fingerprint for i in instances}
    role = {i.name: i.role for i in instances}
    active = {i.name for i in instances if i.running}
    states = []
    for s in plan.steps:
        assert len({role[n] for n in s.instances}) == 1, s
        if s.op is Op.DRAIN:
            assert set(s.instances) <= active, f"drains what is not in rotation: {s}"
            active -= set(s.instances)
        elif s.op is Op.RESTART:
            assert not set(s.instances) & active, f"restarts an instance in rotation: {s}"
            for n in s.instances:
                gen[n] = new[n]
            for p in s.canary_with:  # the canary pair must be compatible
                assert gen[p] == gen[s.instances[0]], f"canary through an incompatible pair: {s}"
        else:
            active |= set(s.instances)
        assert tuple(sorted(s.in_rotation_after)) == tuple(sorted(active))
        empty = any(not any(role[n] == r for n in active) for r in ("prefill", "decode"))
        assert s.role_empty == empty, s
        states.append({n: gen[n] for n in active})
    return states


def mixed_pair(state: dict[str, str], instances: list[RollInstance]) -> bool:
    role = {i.name: i.role for i in instances}
    p = {g for n, g in state.items() if role[n] == "prefill"}
    d = {g for n, g in state.items() if role[n] == "decode"}
    return any(a != b for a, b in itertools.product(p, d))


def test_nothing_running_restarts_is_no_rollout() -> None:
    assert plan_rollout(fleet(2, 2, restart=False)).strategy == "none"
    fresh = [RollInstance("decode-0", "decode", True, None, "x"), RollInstance("prefill-0", "prefill", True, None, "x")]
    assert plan_rollout(fresh).strategy == "none"
    assert render_text(plan_rollout(fresh), True) == []


@pytest.mark.parametrize(("p", "d", "batch"), [(2, 2, 1), (3, 4, 1), (4, 4, 2), (1, 3, 1), (2, 2, 5)])
def test_same_fingerprint_rolls_decode_first_within_the_batch(p: int, d: int, batch: int) -> None:
    inst = fleet(p, d)
    plan = plan_rollout(inst, batch=batch)
    assert plan.strategy == "decode-first" and not plan.fingerprint_change and not plan.unsafe
    restarts = [s for s in plan.steps if s.op is Op.RESTART]
    roles = [s.role for s in restarts]
    assert roles == sorted(roles)  # "decode" < "prefill": every decode before any prefill
    assert sorted(plan.rolled) == sorted(i.name for i in inst)  # each exactly once
    for state in replay(inst, plan):
        out = {i.name for i in inst} - set(state)
        assert len(out) <= batch and len({r.split("-")[0] for r in out}) <= 1
    assert set(replay(inst, plan)[-1]) == {i.name for i in inst}  # all back in rotation
    for s in restarts:  # canary through the restarted instance with a partner in rotation
        assert len(s.canary_with) == 1 and s.canary_with[0].split("-")[0] != s.role
    assert plan.needs_fallback == (min(p, d) <= batch)


def test_one_instance_per_role_same_fingerprint_needs_fallback() -> None:
    inst = fleet(1, 1)
    plan = plan_rollout(inst)
    assert plan.needs_fallback and not plan.unsafe
    assert [s.op for s in plan.steps][:3] == [Op.DRAIN, Op.RESTART, Op.UNDRAIN]
    assert plan.steps[0].instances == ("decode-0",)
    assert plan.problems(router_fallback=True) == []
    (gap,) = plan.problems(router_fallback=False)
    assert "no aggregated fallback" in gap and "decode-0" in gap and "prefill-0" in gap


@pytest.mark.parametrize(("p", "d"), [(2, 2), (3, 2), (2, 5), (4, 4)])
def test_fingerprint_change_never_puts_a_mixed_pair_in_rotation(p: int, d: int) -> None:
    inst = fleet(p, d, fp_change=True)
    plan = plan_rollout(inst)
    assert plan.strategy == "cohorts" and plan.fingerprint_change and not plan.unsafe
    states = replay(inst, plan)
    for state in states:
        assert state, "nothing in rotation"
        assert not mixed_pair(state, inst), state
    assert states[-1] == {i.name: "new" for i in inst}
    assert sorted(plan.rolled) == sorted(i.name for i in inst)
    # the cohort restarted out of rotation is checked inside itself before the switch
    first_prefill = next(s for s in plan.steps if s.op is Op.RESTART and s.role == "prefill")
    assert first_prefill.canary_with
    assert plan.needs_fallback and plan.problems(router_fallback=True) == []
    assert plan.problems(router_fallback=False)


@pytest.mark.parametrize(("p", "d"), [(1, 1), (1, 3), (3, 1)])
def test_fingerprint_change_with_a_single_instance_is_unsafe(p: int, d: int) -> None:
    plan = plan_rollout(fleet(p, d, fp_change=True))
    assert plan.strategy == "unsafe" and plan.unsafe
    assert "single running instance" in plan.unsafe[0]
    assert plan.problems(router_fallback=True)  # even the fallback does not save it
    text = "\n".join(render_text(plan, True))
    assert "cannot roll safely" in text


def test_only_changed_instances_roll_and_partners_come_from_rotation() -> None:
    inst = [
        RollInstance("decode-0", "decode", True, "a", "a"),
        RollInstance("decode-1", "decode", False, "a", "a"),
        RollInstance("prefill-0", "prefill", False, "a", "a"),
        RollInstance("prefill-1", "prefill", True, "a", "a"),
    ]
    plan = plan_rollout(inst)
    assert plan.rolled == ["decode-0", "prefill-1"]
    assert not plan.needs_fallback
    replay(inst, plan)


def test_a_new_instance_of_another_generation_is_a_fingerprint_change() -> None:
    inst = [*fleet(2, 2), RollInstance("decode-2", "decode", True, None, "other")]
    assert plan_rollout(inst).fingerprint_change


def test_plan_serializes_and_renders() -> None:
    plan = plan_rollout(fleet(2, 2, fp_change=True))
    d = plan.to_dict()
    assert d["strategy"] == "cohorts" and isinstance(d["steps"], list) and d["steps"]
    lines = render_text(plan, router_fallback=False)
    assert lines[0].startswith("rolling order (cohorts)")
    assert any("cannot roll safely" in line for line in lines)


def test_a_router_without_drain_makes_a_fingerprint_change_a_problem() -> None:
    from disaggctl.targets.rollout import AdminRotation, NoRotation, roll_text, rollout_problems

    cohorts = plan_rollout(fleet(2, 2, fp_change=True))
    assert any("cannot drain" in p for p in rollout_problems(cohorts, NoRotation(fallback=True)))
    assert rollout_problems(cohorts, AdminRotation("http://127.0.0.1:1", "t", fallback=True)) == []
    same = plan_rollout(fleet(2, 2))
    assert rollout_problems(same, NoRotation()) == []
    assert roll_text(same, NoRotation())[-1].startswith("  rotation: the router has no admin API")


def test_the_rolling_key_covers_the_connector_not_the_role() -> None:
    from disaggctl.compile import compile_spec
    from disaggctl.loader import load_spec
    from disaggctl.targets.rollout import fingerprinter
    from tests.plugins.paths import EXAMPLES

    def keys(example: str) -> dict[str, str]:
        loaded = load_spec(EXAMPLES / example)
        desired = compile_spec(loaded)
        digest = fingerprinter(loaded.spec, desired)
        return {p.name: digest(p.name, p.argv) for p in desired.processes if p.role.value != "router"}

    nixl, shared = keys("local-cpu.yaml"), keys("local-cpu-shared-storage.yaml")
    assert len(set(nixl.values())) == 1 and len(set(shared.values())) == 1  # prefill and decode pair
    assert set(nixl.values()) != set(shared.values())  # the NIXL hash alone would not tell them apart
    lmcache = keys("b200-xpyd-lmcache.yaml")  # per-instance rpc ports and decode's skip_last_n_tokens
    assert len(set(lmcache.values())) == 1
