"""plan / apply / status / destroy / logs against REAL systemd hosts (nspawn containers s1, s2).

The processes are real: the stdlib stand-in engine (tests/support/standin_engine.py) behind a
`vllm` wrapper script on each host, and the builtin router from the repository's venv (bind-
mounted read-only into the containers by tests/infra/systemd_hosts.sh). The tests share the two
hosts but not an order: each starts from the state it needs (`clean` hosts, or `env.converge()`
to a spec; a converge of an already converged deployment is one no-op plan per host).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from disaggctl.compile import compile_spec
from disaggctl.loader import load_text
from disaggctl.ssh import Connection, SshTarget, connect
from disaggctl.targets import OpsContext
from disaggctl.targets.base import StalePlan
from disaggctl.targets.systemd.backend import OBSERVE_SCRIPT, PUSH_SCRIPT, SystemdBackend, expected_manifest, observe
from disaggctl.targets.systemd.changes import Observed
from tests.plugins.infra import TestHosts

pytestmark = pytest.mark.infra

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "support" / "standin_engine.py"
PY = sys.executable  # the venv's python: the same path exists inside the containers (bind mount)

# `vllm` on the hosts: the stand-in engine; FAIL_START=1 in the unit's environment makes it crash.
WRAPPER = f"""#!/bin/sh
if [ -n "$FAIL_START" ]; then echo "simulated engine crash: CUDA error: out of memory" >&2; exit 3; fi
exec /usr/bin/python3 {STANDIN} "$@"
"""

SPEC = """
name: sysd
model: {{path: /models/tiny, served_name: tiny}}
hosts:
  - name: s1
    address: 10.201.0.11
    gpus: 2
    ssh: {{key: "{key}", known_hosts: "{kh}", strict_host_keys: true, connect_timeout_s: 3}}
  - name: s2
    address: 10.201.0.12
    gpus: 2
    ssh: {{key: "{key}", known_hosts: "{kh}", strict_host_keys: true, connect_timeout_s: 3}}
{extra_hosts}prefill: {{replicas: 1, hosts: {{names: [s1]}}{prefill_extra}}}
decode: {{replicas: {dreps}{decode_extra}}}
kv_transfer: {{kind: nixl, buffer_device: cpu}}
router: {{host: s1, port: 8000, local_prefill_threshold: 4, request_timeout_s: {rto}}}
target:
  kind: systemd
  vllm_bin: /opt/standin/vllm
  python_bin: {py}
  secrets: [DCTL_TEST_TOKEN]
  start_timeout_s: 60
health:
  startup_timeout_s: {startup}
  interval_s: 0.3
  request_timeout_s: 10
"""


class Env:
    def __init__(self, hosts: TestHosts, tmp: Path) -> None:
        self.hosts = hosts
        self.tmp = tmp
        self.backend = SystemdBackend()
        self.out = io.StringIO()

    def spec_text(self, **kw: Any) -> str:
        args = {"prefill_extra": "", "decode_extra": "", "extra_hosts": "", "dreps": 2, "rto": 600, "startup": 20, **kw}
        return SPEC.format(key=self.hosts.key, kh=self.hosts.known_hosts, py=PY, **args)

    def ctx(self, yes: bool = True, diff: bool = False, **kw: Any) -> OpsContext:
        path = self.tmp / "spec.yaml"
        text = self.spec_text(**kw)
        path.write_text(text)
        loaded = load_text(text, str(path))
        self.out = io.StringIO()
        console = Console(file=self.out, width=200, force_terminal=False, color_system=None)
        return OpsContext(loaded=loaded, desired=compile_spec(loaded), console=console, yes=yes, diff=diff)

    @property
    def text(self) -> str:
        return self.out.getvalue()

    def conn(self, name: str) -> Connection:
        return connect(
            SshTarget(
                name=name,
                address=self.hosts.ip(name),
                key=str(self.hosts.key),
                known_hosts=str(self.hosts.known_hosts),
                strict=True,
            )
        )

    def sh(self, host: str, *argv: str) -> str:
        with self.conn(host) as c:
            return c.run(list(argv)).out

    def show(self, host: str, unit: str, prop: str) -> str:
        return self.sh(host, "systemctl", "show", "--value", f"--property={prop}", unit).strip()

    def wipe(self) -> None:
        """Nothing of the deployment on either host (what a first apply finds)."""
        for h in ("s1", "s2"):
            self.sh(
                h,
                "sh",
                "-c",
                "systemctl stop 'disaggctl-sysd*' 2>/dev/null; rm -rf /etc/disaggctl/sysd "
                "/var/lib/disaggctl/sysd /etc/systemd/system/disaggctl-sysd*; systemctl daemon-reload",
            )

    def converge(self, **kw: Any) -> None:
        """The deployment of spec_text(**kw) is running (applied now unless it already was)."""
        rc = self.backend.apply(self.ctx(**kw), None)
        assert rc == 0, self.text


@pytest.fixture(scope="module")
def env(
    systemd_hosts: TestHosts,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Env]:
    e = Env(systemd_hosts, tmp_path_factory.mktemp("sysd"))
    for h in ("s1", "s2"):
        with e.conn(h) as c:
            c.run(["mkdir", "-p", "/opt/standin"])
            c.put("/opt/standin/vllm", WRAPPER.encode(), 0o755)
    e.wipe()  # leftovers of an earlier session (the containers' /etc is a tmpfs overlay, but be sure)
    mp = pytest.MonkeyPatch()
    mp.setenv("DCTL_TEST_TOKEN", 'tok "$1" %n')
    yield e
    mp.undo()


@pytest.fixture
def clean(env: Env) -> Env:
    env.wipe()
    return env


@pytest.fixture
def deployed(env: Env) -> Env:
    """The default spec deployed and converged."""
    env.converge()
    return env


UNITS = {
    "s1": ["disaggctl-sysd-decode-0.service", "disaggctl-sysd-prefill-0.service", "disaggctl-sysd-router.service"],
    "s2": ["disaggctl-sysd-decode-1.service"],
}


def _pids(env: Env) -> dict[str, str]:
    return {u: env.show(h, u, "MainPID") for h, us in UNITS.items() for u in us}


def test_01_plan_shows_creates_with_detailed_exitcode(clean: Env) -> None:
    env = clean
    ctx = env.ctx()
    saved = env.tmp / "first.json"
    assert env.backend.plan(ctx, str(saved), detailed_exitcode=True) == 2
    assert "+ create    /etc/systemd/system/disaggctl-sysd-decode-1.service" in env.text
    assert "secret, content hidden" in env.text and "tok" not in env.text
    plan = json.loads(saved.read_text())
    assert plan["format"] == "disaggctl-plan" and plan["meta"]["spec_file"].endswith("spec.yaml")
    assert {h["host"] for h in plan["target"]["hosts"]} == {"s1", "s2"}
    assert [a["process"] for a in plan["actions"]][:2] == ["decode-0", "decode-1"]  # per process, start order
    assert "tok" not in saved.read_text()  # secrets never land in a saved plan


def test_02_apply_starts_everything_and_passes_the_canary(clean: Env) -> None:
    env = clean
    rc = env.backend.apply(env.ctx(), None)
    assert rc == 0, env.text
    assert "canary " in env.text and "decode received the KV" in env.text and "Apply complete" in env.text
    for h, units in UNITS.items():
        for u in units:
            assert env.show(h, u, "ActiveState") == "active", (h, u)
            assert env.show(h, u, "UnitFileState") == "enabled", (h, u)
    # order on one host: prefill waits for decode, the router for both
    assert "disaggctl-sysd-decode-0.service" in env.show("s1", "disaggctl-sysd-prefill-0.service", "After")
    stat = env.sh("s1", "stat", "-c", "%a", "/etc/disaggctl/sysd/secrets.env").strip()
    assert stat == "600"
    # the secret reached the process byte for byte (systemd EnvironmentFile parsing)
    pid = env.show("s1", "disaggctl-sysd-decode-0.service", "MainPID")
    environ = env.sh("s1", "cat", f"/proc/{pid}/environ").split("\0")
    assert 'DCTL_TEST_TOKEN=tok "$1" %n' in environ
    # ... to the engines only: the router's unit has no EnvironmentFile, its process no token
    router_pid = env.show("s1", "disaggctl-sysd-router.service", "MainPID")
    assert not [e for e in env.sh("s1", "cat", f"/proc/{router_pid}/environ").split("\0") if "DCTL_TEST_TOKEN" in e]
    assert 'tok "$1"' not in env.sh("s1", "sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '")
    manifest = json.loads(env.sh("s2", "cat", "/var/lib/disaggctl/sysd/manifest.json"))
    assert manifest["units"] == UNITS["s2"] and not manifest["pending"]
    assert "/etc/disaggctl/sysd/secrets.env" in manifest["files"]


def test_03_second_apply_reports_no_changes_and_touches_nothing(deployed: Env) -> None:
    env = deployed
    before = _pids(env)
    mtime = env.sh("s1", "stat", "-c", "%Y.%N", "/var/lib/disaggctl/sysd/manifest.json")
    assert env.backend.plan(env.ctx(), None, detailed_exitcode=True) == 0
    assert env.backend.apply(env.ctx(), None) == 0
    assert "No changes." in env.text and "canary" not in env.text
    assert _pids(env) == before
    assert env.sh("s1", "stat", "-c", "%Y.%N", "/var/lib/disaggctl/sysd/manifest.json") == mtime
    assert env.backend.status(env.ctx()) == 0, env.text


def test_04_hand_edit_is_drift_and_reapply_restarts_only_the_router(deployed: Env) -> None:
    env = deployed
    env.sh("s1", "sh", "-c", 'sed -i \'s/"retries": 1/"retries": 3/\' /etc/disaggctl/sysd/router.json')
    assert env.backend.status(env.ctx()) == 1
    assert "/etc/disaggctl/sysd/router.json edited by hand" in env.text
    assert env.backend.plan(env.ctx(diff=True), None, detailed_exitcode=True) == 2
    assert "~ update    /etc/disaggctl/sysd/router.json" in env.text
    assert '-  "retries": 3,' in env.text and '+  "retries": 1,' in env.text
    assert "↻ restart   disaggctl-sysd-router.service  (router.json changed)" in env.text
    before = _pids(env)
    assert env.backend.apply(env.ctx(), None) == 0, env.text
    after = _pids(env)
    changed = {u for u in before if before[u] != after[u]}
    assert changed == {"disaggctl-sysd-router.service"}
    assert env.backend.plan(env.ctx(), None, detailed_exitcode=True) == 0


def test_05_stopped_unit_is_drift_and_reapply_starts_it(deployed: Env) -> None:
    env = deployed
    env.sh("s2", "systemctl", "stop", "disaggctl-sysd-decode-1.service")
    assert env.backend.status(env.ctx()) == 1 and "unit inactive" in env.text
    assert env.backend.apply(env.ctx(), None) == 0, env.text
    assert "not running (inactive/dead)" in env.text
    assert env.show("s2", "disaggctl-sysd-decode-1.service", "ActiveState") == "active"


def _unit_facts(env: Env, host: str) -> tuple[dict[str, tuple[object, ...]], dict[str, tuple[object, ...]], str]:
    """(plan's observe, status's observe, the plan observe's raw output) of one host's services."""
    c = env.backend._ctx(env.ctx())
    with env.conn(host) as conn:
        fast, full = observe(conn, c), observe(conn, c, full=True)
        paths = [f.path for f in c.rendered.for_host(host)]
        raw = conn.run(["sh", "-c", OBSERVE_SCRIPT, "observe", "fast", c.state_dir, "-", *paths]).out

    def facts(o: Observed) -> dict[str, tuple[object, ...]]:
        return {
            u: (f.load_state, f.active_state, f.sub_state, f.main_pid, f.need_reload, f.cmdline)
            for u, f in o.units.items()
            if u.endswith(".service")
        }

    return facts(fast), facts(full), raw


def test_05b_plan_reads_running_units_from_the_cgroup_with_systemctls_answer(deployed: Env) -> None:
    env = deployed
    unit = "disaggctl-sysd-router.service"
    fast, full, raw = _unit_facts(env, "s1")
    assert fast == full and set(fast) == set(UNITS["s1"])
    assert all(f[:3] == ("loaded", "active", "running") and not f[4] for f in fast.values())
    assert "@@state\n" in raw and "@@show" not in raw  # no systemctl at all on a converged host
    # a unit file newer than the last reload: systemd now wants a reload; the cgroup cannot say
    # so, the plan asks systemctl for that unit and gets systemd's answer
    env.sh("s1", "touch", f"/etc/systemd/system/{unit}")
    try:
        fast, full, raw = _unit_facts(env, "s1")
        assert fast == full and fast[unit][4] is True
        assert f"Id={unit}" in raw and raw.count("Id=") == 1
        assert env.backend.plan(env.ctx(), None, detailed_exitcode=True) == 2
        assert "unit file on disk differs from the loaded unit" in env.text
        # a drop-in folder that applies to the units (prefix drop-in): systemctl for all of them
        env.sh("s1", "sh", "-c", "systemctl daemon-reload && mkdir -p /run/systemd/system/disaggctl-.service.d")
        fast, full, raw = _unit_facts(env, "s1")
        assert fast == full and raw.count("Id=") == len(UNITS["s1"])
    finally:
        env.sh("s1", "sh", "-c", "rmdir /run/systemd/system/disaggctl-.service.d; systemctl daemon-reload")


def test_05c_a_converged_host_sends_no_manifest_and_a_different_one_sends_it(deployed: Env) -> None:
    """observe passes the sha256 of the manifest this spec leaves on the host: when the host's is
    that one, its text stays there (the plan reads the expected one); else the host sends it."""
    env = deployed
    c = env.backend._ctx(env.ctx())
    path = f"{c.state_dir}/manifest.json"
    with env.conn("s2") as conn:
        text = conn.run(["cat", path]).out.encode()
        assert expected_manifest(c, "s2") == text  # what apply wrote is what observe expects
        paths = [f.path for f in c.rendered.for_host("s2")]
        want = hashlib.sha256(text).hexdigest()
        raw = conn.run(["sh", "-c", OBSERVE_SCRIPT, "observe", "fast", c.state_dir, want, *paths]).out
        assert "@@manifest-as-expected\n" in raw and '"spec_hash"' not in raw
        quiet = observe(conn, c)
        assert quiet.manifest is not None and quiet.manifest.to_bytes() == text
        conn.run(["sh", "-c", f"cp {path} /tmp/m.json && printf ' ' >> {path}"])  # same JSON, other bytes
        try:
            loud = observe(conn, c)
            assert loud.manifest == quiet.manifest and loud.files == quiet.files
            raw = conn.run(["sh", "-c", OBSERVE_SCRIPT, "observe", "fast", c.state_dir, want, *paths]).out
            assert "@@manifest\n{" in raw and "@@manifest-as-expected" not in raw
        finally:
            conn.run(["mv", "/tmp/m.json", path])
    assert env.backend.plan(env.ctx(), None, detailed_exitcode=True) == 0, env.text


def test_06_saved_plan_is_refused_when_a_host_changed(deployed: Env) -> None:
    env = deployed
    saved = env.tmp / "plan.json"
    assert env.backend.plan(env.ctx(rto=300), str(saved), detailed_exitcode=True) == 2
    env.sh("s1", "sh", "-c", "echo '# hand edit' >> /etc/systemd/system/disaggctl-sysd-decode-0.service")
    with pytest.raises(StalePlan, match="stale") as stale:
        env.backend.apply(env.ctx(rto=300), str(saved))
    assert "s1: /etc/systemd/system/disaggctl-sysd-decode-0.service changed" in str(stale.value)
    # a fresh plan applies and converges (the hand edit is overwritten)
    assert env.backend.plan(env.ctx(rto=300), str(saved), detailed_exitcode=True) == 2
    assert env.backend.apply(env.ctx(rto=300), str(saved)) == 0, env.text
    assert "# hand edit" not in env.sh("s1", "cat", "/etc/systemd/system/disaggctl-sysd-decode-0.service")
    # and a plan saved for one spec is refused for another
    assert env.backend.plan(env.ctx(rto=300), str(saved), detailed_exitcode=True) == 0
    with pytest.raises(StalePlan, match="renders differently"):
        env.backend.apply(env.ctx(rto=200), str(saved))


def test_07_unit_that_fails_to_start_names_host_unit_and_journal(deployed: Env) -> None:
    env = deployed
    ctx = env.ctx(rto=200, decode_extra=", env: {FAIL_START: '1'}")
    assert env.backend.apply(ctx, None) == 1
    text = env.text
    assert "apply failed:" in text and "disaggctl-sysd-decode-" in text
    assert "simulated engine crash: CUDA error: out of memory" in text  # the journal tail
    # the running decodes roll: the first one's new unit dies, the rollout stops there and puts it back
    assert "(the rollout stopped at restart decode-0)" in text and "put decode-0 back in rotation" in text
    # nothing lost: the manifest still names every file; re-running the good spec converges
    m = json.loads(env.sh("s2", "cat", "/var/lib/disaggctl/sysd/manifest.json"))
    assert "/etc/systemd/system/disaggctl-sysd-decode-1.service" in m["files"]
    assert env.backend.apply(env.ctx(rto=200), None) == 0, env.text
    assert env.backend.plan(env.ctx(rto=200), None, detailed_exitcode=True) == 0


def test_08_health_that_never_passes_times_out_naming_the_instance(deployed: Env) -> None:
    env = deployed
    ctx = env.ctx(rto=200, startup=3, prefill_extra=", env: {STANDIN_FAIL_HEALTH: '1'}")
    assert env.backend.apply(ctx, None) == 1
    assert "s1: disaggctl-sysd-prefill-0.service: not healthy" in env.text
    assert "(the rollout stopped at restart prefill-0)" in env.text
    assert env.backend.apply(env.ctx(rto=200), None) == 0, env.text


ADMIN_GET = (
    "import sys, urllib.request; t = open(sys.argv[1]).read().strip(); "
    "r = urllib.request.Request(sys.argv[2], headers={'Authorization': 'Bearer ' + t}); "
    "print(urllib.request.urlopen(r, timeout=5).read().decode())"
)


def test_08b_a_running_decode_change_rolls_draining_through_the_admin_api_over_ssh(deployed: Env) -> None:
    from disaggctl.compile import router_admin

    env = deployed
    kw: dict[str, Any] = {"decode_extra": ", env: {GEN: 'rolled'}"}  # the router stays as it is
    ctx = env.ctx(**kw)
    admin = router_admin(ctx.spec, ctx.desired.placement)
    assert admin is not None and admin.host == "127.0.0.1"  # the default: the router host's loopback only
    assert env.backend.plan(ctx, None, detailed_exitcode=True) == 2
    url = f"http://127.0.0.1:{admin.port}"
    assert "rolling order (decode-first):" in env.text
    assert f"rotation: drained through the router's admin API at {url}" in env.text
    before, since = _pids(env), env.sh("s1", "date", "+%s").strip()
    assert env.backend.apply(env.ctx(**kw), None) == 0, env.text
    steps = re.findall(r"step \d+/6: (.+?) \(", env.text)
    assert steps == ["drain decode-0", "restart decode-0", "undrain decode-0",
                     "drain decode-1", "restart decode-1", "undrain decode-1"], env.text  # fmt: skip
    assert "Apply complete" in env.text and "Traceback" not in env.text
    after = _pids(env)
    assert {u for u in before if before[u] != after[u]} == {f"disaggctl-sysd-decode-{i}.service" for i in (0, 1)}
    # the router's own record: each decode left rotation and came back before the next one left
    journal = env.sh("s1", "journalctl", "-u", "disaggctl-sysd-router.service", f"--since=@{since}", "-o", "cat")
    events = [ln.split("disaggctl.router.admin: ", 1)[1] for ln in journal.splitlines() if "router.admin: " in ln]
    assert [e.split(" (")[0] for e in events] == [
        "draining decode decode-0", "decode decode-0 back in rotation",
        "draining decode decode-1", "decode decode-1 back in rotation"], journal  # fmt: skip
    assert env.sh("s1", "stat", "-c", "%a", admin.token_file).strip() == "600"
    states = json.loads(env.sh("s1", "python3", "-c", ADMIN_GET, admin.token_file, url + "/admin/instances"))
    assert {i["name"]: i["state"] for i in states["instances"]} == dict.fromkeys(
        ["prefill-0", "decode-0", "decode-1"], "active"
    )
    assert env.backend.plan(env.ctx(**kw), None, detailed_exitcode=True) == 0


class _CutAfterFiles:
    """A connector whose s2 connection drops (network cut, then closed) when units start.

    The first start phase runs inside the files command (PUSH_SCRIPT: its last "--" is followed
    by the reload flag and the units to start): that command runs without its units, so the
    files land, and then the link drops before any unit starts.
    """

    def __init__(self, hosts: TestHosts) -> None:
        self.hosts = hosts

    def __call__(self, target: SshTarget) -> Connection:
        conn = connect(target)
        if target.name != "s2":
            return conn
        real_run: Callable[..., Any] = conn.run

        def cut() -> None:
            subprocess.run(["ip", "link", "set", "tsysv2", "down"], check=True)
            conn.client.close()

        def run(argv: list[str], *a: Any, **kw: Any) -> Any:
            if argv[:3] == ["sh", "-c", PUSH_SCRIPT]:
                last = len(argv) - 1 - argv[::-1].index("--")
                if argv[last + 2 :]:  # units to start: files only, then the cut
                    assert real_run(argv[: last + 2], *a, **kw).rc == 0
                    cut()
            if argv[:2] == ["systemctl", "restart"]:
                cut()
            return real_run(argv, *a, **kw)

        conn.run = run  # type: ignore[method-assign]
        return conn


GEN2 = ", env: {GEN: '2'}"  # changes both decode units (s1 and s2)


def test_09_host_unreachable_mid_apply(deployed: Env) -> None:
    env = deployed
    backend = SystemdBackend()
    backend.connector = _CutAfterFiles(env.hosts)  # type: ignore[assignment]
    try:
        assert backend.apply(env.ctx(rto=100, decode_extra=GEN2), None) == 1
        text = env.out.getvalue()
        # the cut comes in the rollout (decode-0 on s1 rolled, then decode-1's restart on s2):
        # a located apply failure, what was drained back in rotation, no traceback
        assert "apply failed: s2: disaggctl-sysd-decode-1.service: " in text, text
        assert "(the rollout stopped at restart decode-1)" in text and "put decode-1 back in rotation" in text
        assert "Traceback" not in text
        # still unreachable: refused before touching anything, naming the host
        assert env.backend.apply(env.ctx(rto=100, decode_extra=GEN2), None) == 1
        assert "s2: cannot connect" in env.text and "Nothing was changed" in env.text
    finally:
        subprocess.run(["ip", "link", "set", "tsysv2", "up"], check=True)
    # nothing lost: s2's (pending) manifest names every file it may hold; re-apply converges
    m = json.loads(env.sh("s2", "cat", "/var/lib/disaggctl/sysd/manifest.json"))
    assert set(m["files"]) >= {"/etc/systemd/system/disaggctl-sysd-decode-1.service", "/etc/disaggctl/sysd/secrets.env"}
    assert env.backend.apply(env.ctx(rto=100, decode_extra=GEN2), None) == 0, env.text
    assert env.backend.plan(env.ctx(rto=100, decode_extra=GEN2), None, detailed_exitcode=True) == 0


def test_09b_an_unreachable_host_the_spec_does_not_use_is_skipped(env: Env) -> None:
    env.converge(rto=100, decode_extra=GEN2 + ", hosts: {names: [s1, s2]}")
    down = "  - {name: s9, address: 127.0.0.1, gpus: 2, ssh: {port: 1, connect_timeout_s: 1}}\n"
    ctx = env.ctx(rto=100, decode_extra=GEN2 + ", hosts: {names: [s1, s2]}", extra_hosts=down)
    assert {p.host for p in ctx.desired.processes} == {"s1", "s2"}
    assert env.backend.apply(ctx, None) == 0, env.text
    assert "s9: cannot connect" in env.text and "not used by this spec; skipped" in env.text
    assert "No changes." in env.text


def test_10_logs_show_the_journal_per_host(deployed: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env = deployed
    assert env.backend.logs(env.ctx(rto=100), "decode", None, False, 20) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("s1: ") for line in out.splitlines())
    assert any(line.startswith("s2: ") for line in out.splitlines())


def test_11_scale_down_deletes_what_the_spec_dropped(deployed: Env) -> None:
    env = deployed
    ctx = env.ctx(rto=100, dreps=1)
    assert [p.host for p in ctx.desired.processes if p.role.value == "decode"] == ["s1"]
    assert env.backend.plan(ctx, None, detailed_exitcode=True) == 2
    assert "- delete    /etc/systemd/system/disaggctl-sysd-decode-1.service" in env.text
    assert "- delete    disaggctl-sysd-decode-1.service" in env.text
    assert env.backend.apply(env.ctx(rto=100, dreps=1), None) == 0, env.text
    assert env.sh("s2", "ls", "/etc/systemd/system/").count("disaggctl-sysd") == 0
    assert "manifest.json" not in env.sh("s2", "ls", "/var/lib/disaggctl/sysd")


def test_12_destroy_removes_exactly_what_the_manifest_owns(deployed: Env) -> None:
    env = deployed
    env.sh("s1", "touch", "/etc/disaggctl/sysd/not-ours.txt")
    assert env.backend.destroy(env.ctx(rto=100, dreps=1)) == 0, env.text
    assert env.sh("s1", "ls", "/etc/disaggctl/sysd").split() == ["not-ours.txt"]
    assert "disaggctl-sysd" not in env.sh("s1", "systemctl", "list-units", "--all", "--no-legend", "disaggctl-*")
    assert env.sh("s1", "ls", "/etc/systemd/system/").count("disaggctl-sysd") == 0
    assert (
        env.sh("s1", "sh", "-c", "ls /var/lib/disaggctl/sysd 2>&1 || true")
        .strip()
        .endswith("No such file or directory")
    )
    env.sh("s1", "rm", "-rf", "/etc/disaggctl/sysd")
