"""The systemd target on real clusters' terms, against REAL systemd hosts (nspawn containers):
a non-root operator over sudo (and one whose sudo wants a password), hosts reachable only
through a bastion (health gates, canary, status through the SSH connections), one apply at a
time (two concurrent CLI applies, a killed apply's lock broken with --force-unlock), and no
host orphaned when it leaves the spec (apply and destroy still clean it).

Heavy: run under `flock /tmp/dctl-heavy.lock`. The stand-in engine and the builtin router are
those of tests/test_systemd_apply.py; this module's deployment is `acc` (its own ports).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from disaggctl.compile import compile_spec
from disaggctl.loader import load_text
from disaggctl.ssh import Connection, SshTarget, connect
from disaggctl.targets import OpsContext
from disaggctl.targets.systemd.backend import SystemdBackend
from tests.plugins.infra import TestHosts

pytestmark = pytest.mark.infra

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "support" / "standin_engine.py"
PY = sys.executable
CLI = str(Path(sys.executable).parent / "disaggctl")
WRAPPER = f"#!/bin/sh\nexec /usr/bin/python3 {STANDIN} \"$@\"\n"
LOCK = "/var/lib/disaggctl/locks/acc.lock"

HOST = """  - name: {name}
    address: {ip}
    gpus: 2
    ssh: {{user: {user}, key: "{key}", known_hosts: "{kh}", strict_host_keys: true, connect_timeout_s: 5{jump}}}
"""
SPEC = """
name: acc
model: {{path: /models/tiny, served_name: tiny}}
hosts:
{hosts}prefill: {{replicas: 1, hosts: {{names: [s1]}}}}
decode: {{replicas: {dreps}, env: {{STANDIN_HEALTH_DELAY_S: "{hdelay}"}}}}
engine: {{http_port: 8310}}
kv_transfer: {{kind: nixl, buffer_device: cpu}}
router: {{host: s1, port: 8300, local_prefill_threshold: 4, request_timeout_s: {rto}}}
target:
  kind: systemd
  vllm_bin: /opt/standin/vllm
  python_bin: {py}
  secrets: [DCTL_TEST_TOKEN]
  start_timeout_s: 60
health:
  startup_timeout_s: 30
  interval_s: 0.3
  request_timeout_s: 10
"""


class Env:
    """One test topology (direct or behind a bastion), the deployment `acc` on it."""

    def __init__(self, hosts: TestHosts, tmp: Path) -> None:
        self.hosts, self.tmp = hosts, tmp
        self.backend = SystemdBackend()
        self.out = io.StringIO()

    def spec_text(self, user: str = "deploy", names: tuple[str, ...] = ("s1", "s2"), dreps: int = 2,
                  rto: int = 600, hdelay: float = 0, key: Path | None = None,
                  kh: Path | None = None) -> str:  # fmt: skip
        jump = f", jump: \"{user}@{self.hosts.jump[1]}\"" if self.hosts.jump else ""
        key, kh = key or self.hosts.key, kh or self.hosts.known_hosts
        hosts = "".join(
            HOST.format(name=n, ip=self.hosts.ip(n), user=user, key=key, kh=kh, jump=jump) for n in names
        )
        return SPEC.format(hosts=hosts, dreps=dreps, rto=rto, hdelay=hdelay, py=PY)

    def write(self, **kw: Any) -> Path:
        path = self.tmp / "spec.yaml"
        path.write_text(self.spec_text(**kw))
        return path

    def ctx(self, force_unlock: bool = False, **kw: Any) -> OpsContext:
        path = self.write(**kw)
        loaded = load_text(path.read_text(), str(path))
        self.out = io.StringIO()
        console = Console(file=self.out, width=200, force_terminal=False, color_system=None)
        ctx = OpsContext(loaded=loaded, desired=compile_spec(loaded), console=console, yes=True)
        ctx.options["force_unlock"] = force_unlock
        return ctx

    @property
    def text(self) -> str:
        return " ".join(self.out.getvalue().split())  # the console wraps long lines

    def conn(self, name: str) -> Connection:
        jump = None
        if self.hosts.jump:
            jump = SshTarget(name="j1", address=self.hosts.jump[1], key=str(self.hosts.key),
                             known_hosts=str(self.hosts.known_hosts), strict=True)  # fmt: skip
        return connect(SshTarget(name=name, address=self.hosts.ip(name), key=str(self.hosts.key),
                                 known_hosts=str(self.hosts.known_hosts), strict=True, jump=jump))  # fmt: skip

    def sh(self, host: str, *argv: str) -> str:
        with self.conn(host) as c:
            return c.run(list(argv)).out

    def show(self, host: str, unit: str, prop: str = "ActiveState") -> str:
        return self.sh(host, "systemctl", "show", "--value", f"--property={prop}", unit).strip()

    def wipe(self) -> None:
        for h in ("s1", "s2"):
            self.sh(h, "sh", "-c", "systemctl stop 'disaggctl-sysd*' 'disaggctl-acc*' 2>/dev/null; "
                    "rm -rf /etc/disaggctl/sysd /var/lib/disaggctl/sysd /etc/systemd/system/disaggctl-sysd* "
                    "/etc/disaggctl/acc /var/lib/disaggctl/acc /etc/systemd/system/disaggctl-acc* "
                    f"{LOCK}; systemctl daemon-reload")  # fmt: skip

    def apply_ok(self, **kw: Any) -> None:
        assert self.backend.apply(self.ctx(**kw), None) == 0, self.text


def _env(hosts: TestHosts, tmp: Path) -> Iterator[Env]:
    e = Env(hosts, tmp)
    for h in ("s1", "s2"):
        with e.conn(h) as c:
            c.run(["mkdir", "-p", "/opt/standin"])
            c.put("/opt/standin/vllm", WRAPPER.encode(), 0o755)
    e.wipe()
    mp = pytest.MonkeyPatch()
    mp.setenv("DCTL_TEST_TOKEN", "acc-token")
    yield e
    e.wipe()
    mp.undo()


@pytest.fixture(scope="module")
def env(systemd_hosts: TestHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from _env(systemd_hosts, tmp_path_factory.mktemp("acc"))


UNITS = {
    "s1": ["disaggctl-acc-decode-0.service", "disaggctl-acc-prefill-0.service", "disaggctl-acc-router.service"],
    "s2": ["disaggctl-acc-decode-1.service"],
}


def _cli(env: Env, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([CLI, *args, str(env.tmp / "spec.yaml")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})  # fmt: skip


def _wait_lock(env: Env, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while env.sh("s1", "sh", "-c", f"test -f {LOCK}/owner.json && echo yes").strip() != "yes":
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the apply never took the lock"
        time.sleep(0.1)


def test_askpass_is_refused_on_every_host_before_anything_changes(env: Env) -> None:
    env.wipe()
    assert env.backend.plan(env.ctx(user="askpass"), None, detailed_exitcode=True) == 1
    for h in ("s1", "s2"):
        assert f"{h}: sudo as askpass refused `true`: a password is required" in env.text, env.text
    with pytest.raises(Exception, match="a password is required") as e:
        env.backend.apply(env.ctx(user="askpass"), None)
    assert "s1: sudo as askpass" in str(e.value) and "s2: sudo as askpass" in str(e.value)
    for h in ("s1", "s2"):  # nothing was changed: no state, no lock, no unit
        assert env.sh(h, "sh", "-c", "ls -d /var/lib/disaggctl/acc /var/lib/disaggctl/locks/acc.lock "
                      "/etc/systemd/system/disaggctl-acc* 2>/dev/null").strip() == ""  # fmt: skip


def test_the_whole_workflow_as_a_sudo_user(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env.wipe()
    # a files step that fails on s2 (its config folder is a file) leaves no temporary file there
    env.sh("s2", "sh", "-c", "mkdir -p /etc/disaggctl && echo x > /etc/disaggctl/acc")
    assert env.backend.apply(env.ctx(), None) == 1
    assert "apply failed: s2: files: s2: push exited" in env.text, env.text
    tmps = "find /etc/systemd/system /var/lib/disaggctl /etc/disaggctl -name '*.dctl-tmp' 2>/dev/null"
    assert env.sh("s2", "sh", "-c", tmps).strip() == ""
    env.sh("s2", "rm", "-f", "/etc/disaggctl/acc")
    assert env.backend.plan(env.ctx(), None, detailed_exitcode=True) == 2
    env.apply_ok()
    assert "canary disaggctl-canary-" in env.text and "Apply complete" in env.text  # the pair canary's line
    for h, units in UNITS.items():
        for u in units:
            assert env.show(h, u) == "active", (h, u)
    manifest = json.loads(env.sh("s2", "cat", "/var/lib/disaggctl/acc/manifest.json"))
    assert set(manifest["hosts"]) == {"s1", "s2"} and manifest["hosts"]["s2"]["user"] == "deploy"
    assert env.backend.plan(env.ctx(), None, detailed_exitcode=True) == 0
    assert env.backend.status(env.ctx()) == 0, env.text
    assert env.sh("s1", "ls", "/var/lib/disaggctl/locks").strip() == ""  # released
    assert env.backend.logs(env.ctx(), "decode", None, False, 20) == 0
    assert "s2: " in capsys.readouterr().out
    # no staged upload left in the sudo user's home
    for h in ("s1", "s2"):
        assert env.sh(h, "sh", "-c", "ls -a /home/deploy | grep dctl || true").strip() == ""


# every file and folder an apply could write, with its change time (ctime: any write, rename or
# chmod moves it), and the lock folder with its release stamp
_SNAPSHOT = ("find /var/lib/disaggctl /etc/disaggctl/acc /etc/systemd/system -path '*disaggctl*' "
             "-printf '%p %C@ %T@\\n' 2>/dev/null | sort")  # fmt: skip


def test_a_noop_apply_takes_no_lock_writes_nothing_and_reports_a_held_lock(env: Env) -> None:
    from disaggctl.hostlock import LockOwner, acquire, release

    env.apply_ok()
    time.sleep(0.5)  # the last apply's release is older than the no-op's observing (else it locks: see below)
    before = {h: env.sh(h, "sh", "-c", _SNAPSHOT) for h in ("s1", "s2")}
    assert "/var/lib/disaggctl/locks " in before["s1"] and "/var/lib/disaggctl/acc/manifest.json" in before["s2"]
    env.apply_ok()
    assert "No changes." in env.text, env.text
    assert {h: env.sh(h, "sh", "-c", _SNAPSHOT) for h in ("s1", "s2")} == before  # no lock taken, nothing written
    # another operator holds the lock: a no-op says so (who, since when, from where) and exits 1
    bob = LockOwner("bob", "bobs-laptop", 4242, time.time() - 30, "disaggctl apply spec.yaml", "acc", "b0b")
    with env.conn("s1") as c:
        acquire(c, LOCK, bob)
        try:
            assert env.backend.apply(env.ctx(), None) == 1, env.text
            assert "apply refused: s1: deployment is locked by bob@bobs-laptop (pid 4242) since " in env.text
            assert "no changes" not in env.text.lower(), env.text
            assert '"token": "b0b"' in env.sh("s1", "cat", f"{LOCK}/owner.json")  # left as it was
        finally:
            assert release(c, LOCK, bob)
    env.apply_ok()  # released: the no-op goes through again, leaving no lock
    assert env.sh("s1", "ls", "/var/lib/disaggctl/locks").strip() == ""


def test_two_concurrent_applies_and_a_killed_ones_lock(env: Env) -> None:
    env.apply_ok()
    env.write(hdelay=5)  # a change: the first apply restarts decode and waits >= 5 s for its /health
    first = _cli(env, "apply", "--yes")
    _wait_lock(env, first)
    second = _cli(env, "apply", "--yes")
    out2, _ = second.communicate(timeout=60)
    out1, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out1
    assert second.returncode != 0, out2
    flat = " ".join(out2.split())
    assert "deployment is locked by" in flat, flat
    assert f"(pid {first.pid}) since " in flat and "disaggctl apply spec.yaml" in flat, flat
    assert env.sh("s1", "ls", "/var/lib/disaggctl/locks").strip() == ""
    # an apply killed while it holds the lock leaves it; the next says so, --force-unlock breaks it
    env.write(rto=400, hdelay=2)
    killed = _cli(env, "apply", "--yes")
    _wait_lock(env, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert env.backend.apply(env.ctx(rto=400, hdelay=2), None) == 1
    assert f"its process {killed.pid} is gone" in env.text and "--force-unlock" in env.text, env.text
    assert env.backend.apply(env.ctx(rto=400, hdelay=2, force_unlock=True), None) == 0, env.text
    assert "broke the deployment lock held by" in env.text and f"(pid {killed.pid})" in env.text
    assert env.backend.plan(env.ctx(rto=400, hdelay=2), None, detailed_exitcode=True) == 0, env.text


def test_a_host_removed_from_the_spec_is_cleaned_by_apply_and_destroy(env: Env) -> None:
    env.apply_ok()
    only_s1: dict[str, Any] = {"names": ("s1",), "dreps": 1}
    assert env.backend.plan(env.ctx(**only_s1), None, detailed_exitcode=True) == 2
    assert "s2" in env.text and "- " in env.text and "disaggctl-acc-decode-1.service" in env.text, env.text
    env.apply_ok(**only_s1)
    assert env.show("s2", "disaggctl-acc-decode-1.service", "LoadState") == "not-found"
    assert env.sh("s2", "sh", "-c", "ls -d /var/lib/disaggctl/acc /etc/disaggctl/acc 2>/dev/null").strip() == ""
    manifest = json.loads(env.sh("s1", "cat", "/var/lib/disaggctl/acc/manifest.json"))
    assert set(manifest["hosts"]) == {"s1"}  # s2 forgotten once clean
    assert env.backend.plan(env.ctx(**only_s1), None, detailed_exitcode=True) == 0, env.text
    # back on both hosts (applied by operator 1, whose key and known_hosts the manifests record);
    # then destroyed by operator 2, whose own paths differ, with a spec that no longer lists s2
    one, two = _operator(env, "op1"), _operator(env, "op2")
    env.apply_ok(**one)
    assert env.show("s2", "disaggctl-acc-decode-1.service") == "active"
    manifest = json.loads(env.sh("s1", "cat", "/var/lib/disaggctl/acc/manifest.json"))
    assert manifest["hosts"]["s2"]["key"] == str(one["key"])
    shutil.rmtree(one["key"].parent)  # operator 1's ~/.ssh is not on operator 2's laptop
    assert env.backend.destroy(env.ctx(**only_s1, **two)) == 0, env.text
    for h in ("s1", "s2"):
        assert env.sh(h, "sh", "-c", "ls -d /var/lib/disaggctl/acc /etc/systemd/system/disaggctl-acc* "
                      "2>/dev/null").strip() == "", h  # fmt: skip


def _rolls_through_the_bastion_as_the_sudo_user(env: Env) -> None:
    """A running decode's change (its env) rolls one decode at a time, each drained through the
    router's admin API on s1's loopback (the default admin_bind), reached through the bastion's
    SSH connection, as the non-root sudo user; only the decodes restart."""
    from disaggctl.compile import router_admin

    ctx = env.ctx(hdelay=0.2)
    admin = router_admin(ctx.spec, ctx.desired.placement)
    assert admin is not None and admin.host == "127.0.0.1"
    units = [u for us in UNITS.values() for u in us]
    pid = {u: env.show(_host_of(u), u, "MainPID") for u in units}
    since = env.sh("s1", "date", "+%s").strip()
    assert env.backend.apply(ctx, None) == 0, env.text
    steps = re.findall(r"step \d+/6: (.+?) \(", env.text)
    assert steps == ["drain decode-0", "restart decode-0", "undrain decode-0",
                     "drain decode-1", "restart decode-1", "undrain decode-1"], env.text  # fmt: skip
    moved = {u for u in units if env.show(_host_of(u), u, "MainPID") != pid[u]}
    assert moved == {"disaggctl-acc-decode-0.service", "disaggctl-acc-decode-1.service"}, moved
    journal = env.sh("s1", "journalctl", "-u", "disaggctl-acc-router.service", f"--since=@{since}", "-o", "cat")
    events = [ln.split("disaggctl.router.admin: ", 1)[1].split(" (")[0] for ln in journal.splitlines()
              if "router.admin: " in ln]  # fmt: skip
    assert events == ["draining decode decode-0", "decode decode-0 back in rotation",
                      "draining decode decode-1", "decode decode-1 back in rotation"], journal  # fmt: skip
    assert env.sh("s1", "stat", "-c", "%a %U", admin.token_file).split() == ["600", "root"]
    assert env.backend.plan(env.ctx(hdelay=0.2), None, detailed_exitcode=True) == 0, env.text


def _host_of(unit: str) -> str:
    return next(h for h, us in UNITS.items() if unit in us)


def _operator(env: Env, name: str) -> dict[str, Path]:
    """An operator's own copies of the test key and known_hosts, at paths of their own."""
    home = env.tmp / name
    home.mkdir(exist_ok=True)
    key, kh = home / "id", home / "known_hosts"
    shutil.copy(env.hosts.key, key)
    shutil.copy(env.hosts.known_hosts, kh)
    key.chmod(0o600)
    return {"key": key, "kh": kh}


# --- behind a bastion ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def benv(systemd_bastion_hosts: TestHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from _env(systemd_bastion_hosts, tmp_path_factory.mktemp("acc-bastion"))


def test_bastion_only_hosts_apply_status_logs_destroy(benv: Env, capsys: pytest.CaptureFixture[str]) -> None:
    env = benv
    health = f"http://{env.hosts.ip('s2')}:8310/health"
    with pytest.raises(OSError):  # the operator cannot reach the hosts' ports
        urllib.request.urlopen(health, timeout=2)
    assert env.backend.plan(env.ctx(), None, detailed_exitcode=True) == 2, env.text
    env.apply_ok()  # health gates of every phase, the router's upstreams, the canary: all through SSH
    # the pair canary (prefill, then decode directly) through SSH too
    assert "canary disaggctl-canary-" in env.text and "decode received the KV" in env.text, env.text
    assert env.backend.status(env.ctx()) == 0, env.text
    assert env.backend.plan(env.ctx(), None, detailed_exitcode=True) == 0
    _rolls_through_the_bastion_as_the_sudo_user(env)
    assert env.backend.logs(env.ctx(), "router", None, False, 20) == 0
    assert "s1: " in capsys.readouterr().out
    assert env.backend.destroy(env.ctx()) == 0, env.text
    assert env.show("s2", "disaggctl-acc-decode-1.service", "LoadState") == "not-found"
