"""The plan as data: observe output -> Observed, desired + observed -> actions, stale saved plans."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

from disaggctl.deployment import DesiredState, Rendered
from disaggctl.render.systemd import render_systemd
from disaggctl.targets.base import Action
from disaggctl.targets.systemd.backend import OBSERVE_SCRIPT
from disaggctl.targets.systemd.changes import (
    FileFact,
    Observed,
    UnitFact,
    make_plan,
    parse_observe,
    stale_reasons,
)
from disaggctl.targets.systemd.manifest import OwnedFile, build_manifest, spec_hash
from tests.test_systemd_render import _state

UNIT_DIR = "/etc/systemd/system/"


def _setup() -> tuple[DesiredState, Rendered, dict[str, str]]:
    desired, spec = _state()
    r = render_systemd(desired, spec, {"HF_TOKEN": "x"})  # type: ignore[arg-type]
    unit_of = {p.name: f"disaggctl-demo-{p.name}.service" for p in desired.processes}
    return desired, r, unit_of


def _converged(desired: DesiredState, r: Rendered, host: str) -> Observed:
    """A host exactly as apply leaves it: every file present, every unit running."""
    files = {f.path: FileFact(f.sha256, f.mode) for f in r.for_host(host)}
    units = {u: UnitFact(u, "loaded", "active", "running", 100 + i, cmdline=None) for i, u in enumerate(r.units[host])}
    m = build_manifest(r, host, "demo", "disaggctl-demo.target", {}, spec_hash(r))
    return Observed(host, manifest=m, files=files, units=units)


def _plan(desired: DesiredState, r: Rendered, unit_of: dict[str, str], obs: dict[str, Observed]):  # type: ignore[no-untyped-def]
    return make_plan(desired, r, obs, unit_of, "disaggctl-demo.target", spec_hash(r))


def test_parse_observe_output() -> None:
    cmd = base64.b64encode(b"/usr/bin/python3\0/x/standin.py\0serve\0m\0").decode()
    text = (
        '@@manifest\n{"deployment": "demo", "host": "s1", "spec_hash": "abc", "files": {"/a": {"sha256": "1", '
        '"mode": 420}}, "units": ["u.service"]}\n\n'
        "@@paths\n/etc/disaggctl/demo/secrets.env\n/etc/systemd/system/u.service\n/etc/x\\y\n"
        f"@@sha\n{'f' * 64}  /etc/disaggctl/demo/secrets.env\n\\{'e' * 64}  /etc/x\\\\y\n"
        "@@mode\n600 /etc/disaggctl/demo/secrets.env\n644 /etc/x\\y\n"
        "@@show\nId=u.service\nLoadState=loaded\nActiveState=active\nSubState=running\nMainPID=42\nNRestarts=0\n"
        "UnitFileState=enabled\nNeedDaemonReload=no\n\nId=v.service\nLoadState=not-found\nActiveState=inactive\n"
        f"SubState=dead\nMainPID=0\n\n@@cmdlines\n42 {cmd}\n@@end\n"
    )
    obs = parse_observe("s1", text)
    assert obs.manifest is not None and obs.manifest.spec_hash == "abc" and obs.manifest.units == ["u.service"]
    assert obs.files["/etc/disaggctl/demo/secrets.env"] == FileFact("f" * 64, 0o600)
    assert obs.files["/etc/systemd/system/u.service"] == FileFact(None, None)
    assert obs.files["/etc/x\\y"] == FileFact("e" * 64, 0o644)
    u = obs.units["u.service"]
    assert u.running and u.main_pid == 42 and u.cmdline == ["/usr/bin/python3", "/x/standin.py", "serve", "m"]
    assert not obs.units["v.service"].running and obs.units["v.service"].cmdline is None


def test_parse_observe_takes_the_expected_manifest_when_the_host_says_so() -> None:
    expected = b'{"deployment": "demo", "host": "s1", "spec_hash": "abc", "files": {}, "units": ["u.service"]}\n'
    text = f"@@paths\n/x\n@@sha\n{'1' * 64}  /state/manifest.json\n{'f' * 64}  /x\n@@manifest-as-expected\n@@end\n"
    obs = parse_observe("s1", text, expected)
    assert obs.manifest is not None and obs.manifest.spec_hash == "abc" and obs.files["/x"].sha256 == "f" * 64
    assert parse_observe("s1", text).manifest is None  # nothing expected: nothing to take


def test_parse_observe_tolerates_a_mangled_manifest() -> None:
    obs = parse_observe("s1", "@@manifest\n{not json\n@@paths\n@@end\n")
    assert obs.manifest is None and obs.files == {}


def test_empty_hosts_plan_creates_everything_in_start_order() -> None:
    desired, r, unit_of = _setup()
    plan = _plan(desired, r, unit_of, {"s1": Observed("s1"), "s2": Observed("s2")})
    s1 = plan.host("s1")
    assert {f.action for f in s1.files} == {Action.CREATE}
    assert [u.unit for u in s1.units_with(Action.CREATE)] == [
        "disaggctl-demo-decode-0.service",
        "disaggctl-demo-prefill-0.service",
        "disaggctl-demo-router.service",
        "disaggctl-demo.target",
    ]
    assert plan.changed and plan.counts()["create"] == 6 + 4 + 3 + 2


def test_converged_hosts_plan_nothing() -> None:
    desired, r, unit_of = _setup()
    obs = {h: _converged(desired, r, h) for h in ("s1", "s2")}
    plan = _plan(desired, r, unit_of, obs)
    assert not plan.changed


def test_config_change_restarts_only_its_reader_with_a_reason() -> None:
    desired, r, unit_of = _setup()
    obs = {h: _converged(desired, r, h) for h in ("s1", "s2")}
    obs["s1"].files["/etc/disaggctl/demo/router.json"] = FileFact("0" * 64, 0o644)
    plan = _plan(desired, r, unit_of, obs)
    s1 = plan.host("s1")
    assert [(f.path, f.action) for f in s1.files_with(Action.UPDATE)] == [
        ("/etc/disaggctl/demo/router.json", Action.UPDATE)
    ]
    assert [(u.unit, u.reason) for u in s1.units_with(Action.RESTART)] == [
        ("disaggctl-demo-router.service", "router.json changed")
    ]
    assert not plan.host("s2").changed


def test_mode_drift_secret_change_and_stopped_unit() -> None:
    desired, r, unit_of = _setup()
    obs = {h: _converged(desired, r, h) for h in ("s1", "s2")}
    obs["s2"].files["/etc/disaggctl/demo/secrets.env"] = FileFact(r.for_host("s2")[0].sha256, 0o644)
    obs["s1"].units["disaggctl-demo-decode-0.service"] = UnitFact(
        "disaggctl-demo-decode-0.service", "loaded", "failed", "failed"
    )
    plan = _plan(desired, r, unit_of, obs)
    sec = plan.host("s2").files_with(Action.UPDATE)
    assert len(sec) == 1 and sec[0].secret and "mode 644 -> 600" in sec[0].reason
    assert [u.reason for u in plan.host("s2").units_with(Action.RESTART)] == ["secrets changed"]
    assert [u.reason for u in plan.host("s1").units_with(Action.RESTART)] == ["not running (failed/failed)"]


def test_command_line_drift_restarts() -> None:
    desired, r, unit_of = _setup()
    obs = {h: _converged(desired, r, h) for h in ("s1", "s2")}
    p = desired.process("decode-1")
    u = unit_of["decode-1"]
    obs["s2"].units[u] = UnitFact(u, "loaded", "active", "running", 7, cmdline=["/usr/bin/python3", "x", *p.argv[1:]])
    assert not _plan(desired, r, unit_of, obs).changed  # a wrapper in front is fine
    obs["s2"].units[u] = UnitFact(u, "loaded", "active", "running", 7, cmdline=["python3", *p.argv[1:-1], "other"])
    plan = _plan(desired, r, unit_of, obs)
    assert [c.reason for c in plan.host("s2").units_with(Action.RESTART)] == [
        "running command line differs from the unit"
    ]


def test_files_the_spec_dropped_are_deleted() -> None:
    desired, r, unit_of = _setup()
    obs = {h: _converged(desired, r, h) for h in ("s1", "s2")}
    m = obs["s1"].manifest
    assert m is not None
    old = "/etc/systemd/system/disaggctl-demo-decode-9.service"
    obs["s1"].manifest = m.model_copy(
        update={"files": {**m.files, old: OwnedFile(sha256="1" * 64, mode=0o644)}, "units": [*m.units, old[20:]]}
    )
    obs["s1"].files[old] = FileFact("1" * 64, 0o644)
    plan = _plan(desired, r, unit_of, obs)
    s1 = plan.host("s1")
    assert [f.path for f in s1.files_with(Action.DELETE)] == [old]
    assert [u.unit for u in s1.units_with(Action.DELETE)] == ["disaggctl-demo-decode-9.service"]


def test_unreachable_host_is_an_error_in_the_plan() -> None:
    desired, r, unit_of = _setup()
    plan = _plan(desired, r, unit_of, {"s1": Observed("s1"), "s2": Observed("s2", error="s2: cannot connect")})
    assert plan.host("s2").error == "s2: cannot connect"


def test_stale_reasons() -> None:
    desired, r, unit_of = _setup()
    obs = {h: _converged(desired, r, h) for h in ("s1", "s2")}
    saved = _plan(desired, r, unit_of, obs)
    assert stale_reasons(saved, _plan(desired, r, unit_of, obs)) == []
    obs["s2"].files["/etc/disaggctl/demo/secrets.env"] = FileFact("e" * 64, 0o600)
    reasons = stale_reasons(saved, _plan(desired, r, unit_of, obs))
    assert reasons and reasons[0].startswith("s2: /etc/disaggctl/demo/secrets.env changed since the plan")


def test_lmcache_prefill_restart_restarts_decode_peers() -> None:
    desired, r, unit_of = _setup()
    desired = desired.model_copy(update={"kv_kind": "lmcache"})
    obs = {h: _converged(desired, r, h) for h in ("s1", "s2")}
    u = unit_of["prefill-0"]
    obs["s1"].units[u] = UnitFact(u, "loaded", "inactive", "dead")
    plan = _plan(desired, r, unit_of, obs)
    restarted = {c.process: c.reason for h in plan.hosts for c in h.units_with(Action.RESTART)}
    assert restarted["prefill-0"].startswith("not running")
    assert restarted["decode-0"] == restarted["decode-1"] == "peers with restarted prefill-0 (lmcache)"


def test_observe_script_hashes_each_path_once_and_adds_the_owned_ones_not_named(tmp_path: Path) -> None:
    """The owned list repeats the paths the spec names (a converged host): each is read once; an
    owned path the spec no longer names (to delete) is added. Run by the host's sh, here locally."""
    state = tmp_path / "state"
    state.mkdir()
    a, b, gone, odd = (tmp_path / n for n in ("a.conf", "b.conf", "gone.conf", "x y*.conf"))
    for f in (a, b, gone, odd):
        f.write_text(f.name)
    (state / "owned").write_text("".join(f"{p}\n" for p in sorted(map(str, (a, b, gone, odd)))))
    out = subprocess.run(
        ["sh", "-c", OBSERVE_SCRIPT, "observe", "fast", str(state), "-", str(a), str(b), str(odd)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    sha = out.split("@@sha\n", 1)[1].split("@@", 1)[0].splitlines()
    assert sorted(line.split("  ", 1)[1] for line in sha if line) == sorted(map(str, (a, b, gone, odd)))
    obs = parse_observe("h", out)
    assert set(obs.files) == {str(p) for p in (a, b, gone, odd)}
    assert all(f.sha256 for f in obs.files.values()) and obs.files[str(odd)].mode == 0o644
