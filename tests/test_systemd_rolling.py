"""The systemd target's rolling plan (targets/systemd/rolling.py) from observed hosts: the running
MainPID command lines give the old fingerprints; the plan's RESTART units give what rolls."""

from __future__ import annotations

from disaggctl.targets.rolling import Op
from disaggctl.targets.systemd.backend import start_phases
from disaggctl.targets.systemd.changes import UnitFact
from disaggctl.targets.systemd.rolling import UNKNOWN, served_argv, systemd_roll
from tests.test_systemd_plan import _converged, _plan, _setup
from tests.test_systemd_render import _state


def _observed(cmdline_of):  # type: ignore[no-untyped-def]
    desired, r, unit_of = _setup()
    obs = {h: _converged(desired, r, h) for h in ("s1", "s2")}
    for p in desired.processes:
        u = unit_of[p.name]
        for o in obs.values():
            if u in o.units:
                o.units[u] = UnitFact(u, "loaded", "active", "running", 7, cmdline=cmdline_of(p))
    return desired, r, unit_of, obs


def test_served_argv_drops_the_interpreter() -> None:
    assert served_argv(["/usr/bin/python3", "/opt/vllm/bin/vllm", "serve", "m", "--x"]) == [
        "/opt/vllm/bin/vllm", "serve", "m", "--x"]  # fmt: skip
    assert served_argv(["router"]) is None and served_argv(None) is None


def test_a_running_decode_change_rolls_decode_first_and_skips_the_start_phase() -> None:
    # decode-0 and decode-1 run with a different, fingerprint-neutral flag: both restart
    desired, r, unit_of, obs = _observed(
        lambda p: [*p.argv, "--max-num-seqs", "7"] if p.role.value == "decode" else list(p.argv)
    )
    _, spec = _state()
    plan = _plan(desired, r, unit_of, obs)
    roll = systemd_roll(spec, desired, plan, obs, unit_of)  # type: ignore[arg-type]
    assert roll is not None and roll.plan.strategy == "decode-first"
    assert roll.plan.rolled == ["decode-0", "decode-1"]
    restarts = [s for s in roll.plan.steps if s.op is Op.RESTART]
    assert all(s.canary_with == ("prefill-0",) for s in restarts)
    assert roll.rolled_units == {unit_of["decode-0"], unit_of["decode-1"]}
    changed = [h for h in plan.hosts if h.changed]
    assert start_phases(changed, skip=roll.rolled_units) == []  # the rollout restarts them, not a phase
    assert start_phases(changed)  # without the rollout: a start phase


def test_a_fingerprint_change_with_one_prefill_is_unsafe() -> None:
    desired, r, unit_of, obs = _observed(lambda p: [*p.argv, "--kv-cache-dtype", "fp8"])
    _, spec = _state()
    roll = systemd_roll(spec, desired, _plan(desired, r, unit_of, obs), obs, unit_of)  # type: ignore[arg-type]
    assert roll is not None and roll.plan.strategy == "unsafe" and roll.plan.fingerprint_change


def test_unknown_running_command_line_is_treated_as_a_fingerprint_change() -> None:
    desired, r, unit_of, obs = _observed(lambda p: None)
    _, spec = _state()
    # the unit files differ from what runs: restart every vLLM unit; nothing known of the running argv
    for o in obs.values():
        for path in list(o.files):
            if path.endswith(".service") and "router" not in path:
                o.files[path] = type(o.files[path])("0" * 64, o.files[path].mode)
    roll = systemd_roll(spec, desired, _plan(desired, r, unit_of, obs), obs, unit_of)  # type: ignore[arg-type]
    assert roll is not None and roll.plan.fingerprint_change
    assert UNKNOWN.startswith("unknown")


def test_nothing_running_restarts_is_no_rollout() -> None:
    desired, r, unit_of, obs = _observed(lambda p: list(p.argv))
    _, spec = _state()
    assert systemd_roll(spec, desired, _plan(desired, r, unit_of, obs), obs, unit_of) is None  # type: ignore[arg-type]


def test_status_check_reads_running_fingerprints_and_metrics() -> None:
    from disaggctl.targets.systemd.rolling import systemd_checks

    desired, _r, unit_of, obs = _observed(
        lambda p: [*p.argv, "--kv-cache-dtype", "fp8"] if p.name == "decode-1" else list(p.argv)
    )
    _, spec = _state()
    seen: list[str] = []

    def fetch(url: str, timeout_s: float) -> bytes:
        seen.append(url)
        if url.endswith(":8000/metrics"):  # the router
            return b'disaggctl_router_requests_total{path="disaggregated"} 3\n'
        raise OSError("connection refused")

    checks = {c.name: c for c in systemd_checks(spec, desired, obs, unit_of, fetch)}  # type: ignore[arg-type]
    assert checks["fingerprints_match"].ok is False and checks["fingerprints_match"].instances == ["decode-1"]
    assert checks["prefill_handles_requests"].ok is None  # engine metrics unreadable: unknown, not ok
    assert len(seen) == 4  # three engines and the router


def test_a_host_lost_mid_roll_is_an_apply_error_naming_instance_host_and_unit() -> None:
    from disaggctl.errors import DisaggError
    from disaggctl.ssh import SshError
    from disaggctl.targets.systemd.backend import ApplyError, _roll_failure
    from disaggctl.targets.systemd.rolling import SystemdRoll

    desired, r, unit_of, obs = _observed(
        lambda p: [*p.argv, "--max-num-seqs", "7"] if p.role.value == "decode" else list(p.argv)
    )
    _, spec = _state()
    roll = systemd_roll(spec, desired, _plan(desired, r, unit_of, obs), obs, unit_of)  # type: ignore[arg-type]
    assert isinstance(roll, SystemdRoll)
    host1, unit1 = roll.units["decode-1"]
    step = next(s for s in roll.plan.steps if s.op is Op.RESTART and s.instances == ("decode-1",))
    e = _roll_failure(None, roll, step, SshError(host1, "connection is closed"))  # type: ignore[arg-type]
    assert isinstance(e, ApplyError) and (e.host, e.unit) == (host1, unit1)
    assert str(e) == f"{host1}: {unit1}: connection is closed (the rollout stopped at restart decode-1)"
    drain = next(s for s in roll.plan.steps if s.op is Op.DRAIN and s.instances == ("decode-1",))
    e = _roll_failure(None, roll, drain, DisaggError("router admin POST /admin/drain: HTTP 403 b''"))  # type: ignore[arg-type]
    why = "router admin POST /admin/drain: HTTP 403 b''"
    assert str(e) == f"{host1}: {unit1}: {why} (the rollout stopped at drain decode-1)"
