"""SSH edge primitives against real sshd hosts: non-root operators over sudo (NOPASSWD and
password-requiring), staged uploads cleaned up on failure, HTTP through the SSH connection,
the per-deployment host lock - directly (fakehosts) and through a bastion that is the only
host the operator can reach (bastion_hosts)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from disaggctl import hostlock
from disaggctl.hostlock import LockHeld, LockOwner
from disaggctl.ssh import Connection, HttpError, SshError, SshTarget, SudoError, connect, run_on_hosts
from tests.plugins.infra import TestHosts

pytestmark = pytest.mark.infra

# a tiny HTTP server: echoes method, path and body as JSON; /slow never answers in time
SERVER = r"""
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def _answer(self):
        if self.path == "/slow":
            time.sleep(30)
        n = int(self.headers.get("Content-Length") or 0)
        body = json.dumps({"method": self.command, "path": self.path,
                           "body": self.rfile.read(n).decode(), "ct": self.headers.get("Content-Type")}).encode()
        self.send_response(404 if self.path == "/missing" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Served-By", sys.argv[2])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = _answer
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""
PORT = 18080


def _target(hosts: TestHosts, name: str, user: str = "root", via_jump: bool = True) -> SshTarget:
    jump = None
    if hosts.jump is not None and via_jump:
        jump = SshTarget(name=hosts.jump[0], address=hosts.jump[1], user=user, key=str(hosts.key),
                         known_hosts=str(hosts.known_hosts), connect_timeout=5)
    ip = hosts.jump[1] if hosts.jump and name == hosts.jump[0] else hosts.ip(name)
    return SshTarget(name=name, address=ip, user=user, key=str(hosts.key), known_hosts=str(hosts.known_hosts),
                     connect_timeout=5, jump=jump)


@pytest.fixture(params=["direct", "bastion"])
def hosts(request: pytest.FixtureRequest) -> TestHosts:
    """The same checks on fakehosts reached directly and on hosts reachable only through j1."""
    return request.getfixturevalue("ssh_hosts" if request.param == "direct" else "bastion_hosts")  # type: ignore[no-any-return]


def _home_leftovers(hosts: TestHosts, name: str, user: str) -> list[str]:
    return sorted(p.name for p in (hosts.fs(name) / "home" / user).iterdir() if p.name.startswith(".dctl"))


# --- sudo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["root", "deploy"])
def test_put_get_as_root_and_sudo_user(hosts: TestHosts, user: str) -> None:
    d = f"/srv/dctl-edge-{user}"
    with connect(_target(hosts, "h1", user)) as c:
        assert c.run(["id", "-un"]).out.strip() == user
        c.check_sudo()  # root: nothing to check; deploy: NOPASSWD works
        c.check(["mkdir", "-p", d], sudo=True)
        c.put(f"{d}/secret.env", b"TOKEN=1\n", 0o600)
        c.put(f"{d}/secret.env", b"TOKEN=2\n", 0o600)
        assert c.get(f"{d}/secret.env") == b"TOKEN=2\n"
        assert c.get(f"{d}/missing") is None  # missing is None, for both
        assert c.run(["ls", "-A", d], sudo=True).out.split() == ["secret.env"]
        c.check(["rm", "-rf", d], sudo=True)
    f = hosts.fs("h1") / "srv" / f"dctl-edge-{user}"
    assert not f.exists()
    if user != "root":
        assert _home_leftovers(hosts, "h1", user) == []


def test_password_sudo_is_refused_before_anything_changes(hosts: TestHosts) -> None:
    u = hosts.password_user
    with connect(_target(hosts, "h2", u)) as c:
        with pytest.raises(SudoError) as e:
            c.check_sudo()
        msg = str(e.value)
        assert msg.startswith(f"h2: sudo as {u} refused `true`: a password is required"), msg
        assert (e.value.host, e.value.user, e.value.sudo_message) == ("h2", u, "a password is required")
        # "sudo failed" is not "file missing": get() must not answer None
        with pytest.raises(SudoError, match="a password is required"):
            c.get("/etc/hostname")
        with pytest.raises(SudoError, match=r"refused `install -m 644"):
            c.put("/srv/should-not-exist", b"x")
        with pytest.raises(SudoError):
            c.run(["systemctl", "daemon-reload"], sudo=True)
        assert not c.run(["test", "-e", "/srv/should-not-exist"]).ok
        # the same sudo with its password works: the refusal was sudo's, nothing else
        r = c.run(["sh", "-c", 'echo "$1" | sudo -S -p "" id -un', "sh", hosts.sudo_password])
        assert r.out.strip() == "root", r.err
    assert _home_leftovers(hosts, "h2", u) == []  # the staged upload went too


def test_failed_upload_leaves_no_staged_or_temp_file(ssh_hosts: TestHosts) -> None:
    with connect(_target(ssh_hosts, "h3", "deploy")) as c:
        with pytest.raises(SshError, match=r"h3: .*install.*/nonexistent"):
            c.put("/nonexistent/dir/x", b"data")
        # the destination is a directory: the final rename fails after the temp file was installed
        c.check(["mkdir", "-p", "/srv/dctl-edge-dir/target/sub"], sudo=True)
        with pytest.raises(SshError, match=r"mv -fT"):
            c.put("/srv/dctl-edge-dir/target", b"data")
        assert c.run(["ls", "-A", "/srv/dctl-edge-dir"], sudo=True).out.split() == ["target"]
        c.check(["rm", "-rf", "/srv/dctl-edge-dir"], sudo=True)
    with connect(_target(ssh_hosts, "h3")) as c, pytest.raises(SshError, match="cannot write"):
        c.put("/proc/dctl-nope", b"x")  # as root (SFTP): the temp file cannot even be created
    assert _home_leftovers(ssh_hosts, "h3", "deploy") == []


# --- bastion --------------------------------------------------------------------------------


def test_bastion_hosts_are_reachable_only_through_the_jump_host(bastion_hosts: TestHosts) -> None:
    with pytest.raises(SshError, match="h1: cannot connect"):
        t = _target(bastion_hosts, "h1", via_jump=False)
        connect(SshTarget(**{**t.__dict__, "connect_timeout": 1.0}), attempts=1)
    with connect(_target(bastion_hosts, "j1", "deploy", via_jump=False)) as j:
        assert j.run(["hostname"]).out.strip() == "j1"
    for name in bastion_hosts.names():
        with connect(_target(bastion_hosts, name, "deploy")) as c:
            assert c.run(["hostname"]).out.strip() == name
            assert c.run(["id", "-un"], sudo=True).out.strip() == "root"


# --- HTTP through the SSH connection ------------------------------------------------------


@pytest.fixture
def http_server(hosts: TestHosts) -> Iterator[TestHosts]:
    """The echo server on h2:18080 (as deploy, started and stopped over SSH)."""
    with connect(_target(hosts, "h2", "deploy")) as c:
        start = f"nohup python3 -c '{SERVER}' {PORT} h2 >/dev/null 2>&1 & echo $! > /tmp/dctl-edge-http.pid"
        c.check(["sh", "-c", start])
        deadline = time.monotonic() + 10
        while c.run(["python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', {PORT}), 1)"]).rc:
            assert time.monotonic() < deadline, "test HTTP server did not start"
            time.sleep(0.1)
    yield hosts
    with connect(_target(hosts, "h2", "deploy")) as c:
        c.run(["sh", "-c", "kill $(cat /tmp/dctl-edge-http.pid)"])


def test_http_get_post_through_the_connection(http_server: TestHosts) -> None:
    hosts = http_server
    h2 = hosts.ip("h2")
    # from h1's connection (through j1 in the bastion topology) to h2's port
    with connect(_target(hosts, "h1", "deploy")) as c:
        status, headers, body = c.http("GET", h2, PORT, "/health", timeout=5)
        assert status == 200 and headers["x-served-by"] == "h2"
        assert body == b'{"method": "GET", "path": "/health", "body": "", "ct": null}'
        r = c.http("POST", h2, PORT, "/v1/completions", b'{"prompt": "hi"}', timeout=5)
        assert r.status == 200 and json.loads(r.body) == {
            "method": "POST", "path": "/v1/completions", "body": '{"prompt": "hi"}', "ct": "application/json"
        }
        assert c.http_url("GET", f"http://{h2}:{PORT}/missing", timeout=5).status == 404
        for _ in range(20):  # one channel per request, none leaked
            assert c.http("GET", h2, PORT, "/x", timeout=5).status == 200
    # from h2's own connection, to itself
    with connect(_target(hosts, "h2", "deploy")) as c:
        assert c.http("GET", "127.0.0.1", PORT, "/self", timeout=5).headers["x-served-by"] == "h2"
    if hosts.jump is not None:  # the jump host reaches it too (its connection has no jump)
        with connect(_target(hosts, "j1", "deploy", via_jump=False)) as j:
            assert j.http("GET", h2, PORT, "/", timeout=5).status == 200


def test_http_refused_and_timeout_name_host_and_url(http_server: TestHosts) -> None:
    hosts = http_server
    h2 = hosts.ip("h2")
    with connect(_target(hosts, "h1", "deploy")) as c:
        with pytest.raises(HttpError, match=rf"h1: GET http://{h2}:1/health: cannot connect from h1 to {h2}:1"):
            c.http("GET", h2, 1, "/health", timeout=5)
        start = time.monotonic()
        with pytest.raises(HttpError, match=r"h1: GET .*/slow: timed out after"):
            c.http("GET", h2, PORT, "/slow", timeout=1.0)
        assert time.monotonic() - start < 5
        assert c.http("GET", h2, PORT, "/after", timeout=5).status == 200  # the connection is still good


# --- the deployment lock --------------------------------------------------------------------


def _owner(command: str, **kw: object) -> LockOwner:
    o = LockOwner.here(command, deployment="edge")
    return LockOwner(**{**o.__dict__, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("user", ["root", "deploy"])
def test_lock_acquire_held_release(hosts: TestHosts, user: str) -> None:
    path = hostlock.lock_path(f"edge-{user}")
    a = _owner("disaggctl apply a.yaml")
    b = _owner("disaggctl apply b.yaml", user="bob", operator_host="bobs-laptop", pid=7)
    with connect(_target(hosts, "h1", user)) as c1, connect(_target(hosts, "h1", user)) as c2:
        c1.run(["rm", "-rf", path], sudo=True)
        assert hostlock.read(c1, path) is None
        assert hostlock.acquire(c1, path, a) is None
        st = hostlock.read(c2, path)
        assert st is not None and st.owner == a and 0 <= st.age_s < 30
        with pytest.raises(LockHeld) as e:
            hostlock.acquire(c2, path, b)
        msg = str(e.value)
        me = f"{a.user}@{a.operator_host} (pid {os.getpid()})"
        assert msg.startswith(f"h1: deployment is locked by {me} since ") and "disaggctl apply a.yaml" in msg
        assert path in msg and "--force-unlock" in msg and e.value.stale is None  # we are alive: not stale
        assert not hostlock.release(c2, path, b)  # not b's lock: left alone
        assert hostlock.read(c1, path) is not None
        assert hostlock.release(c1, path, a)
        assert hostlock.read(c1, path) is None
        with hostlock.held(c2, path, b), pytest.raises(LockHeld, match="bob@bobs-laptop"):
            hostlock.acquire(c1, path, a)
        assert hostlock.read(c1, path) is None  # released on exit


def test_lock_take_says_how_long_the_lock_folder_was_quiet(hosts: TestHosts) -> None:
    """The lock's answer that lets apply keep what it observed while taking it (access.locked_observation)."""
    root = f"/tmp/dctl-edge-quiet-{os.getpid()}"
    path = hostlock.lock_path("edge-quiet", root=root)
    a, b = _owner("disaggctl apply a.yaml"), _owner("disaggctl apply b.yaml")
    with connect(_target(hosts, "h2", "deploy")) as c:
        c.run(["rm", "-rf", root], sudo=True)
        with hostlock.held(c, path, a) as first:
            assert first.quiet_s == float("inf") and first.broken is None  # new folder: never locked
        with hostlock.held(c, path, b) as second:  # right after a's release
            assert second.quiet_s is not None and 0 <= second.quiet_s < 5
            stamp = c.check(["stat", "-c", "%Y", f"{root}/.edge-quiet.lock.released"], sudo=True).out.strip()
            assert stamp.isdigit()  # the release stamped its time beside the lock
        time.sleep(1.2)
        with hostlock.held(c, path, a) as third:
            assert third.quiet_s is not None and third.quiet_s > 1.0
        hostlock.take(c, path, a)  # left held, then broken: a break is never quiet
        broken = hostlock.take(c, path, b, force=True)
        assert broken.broken is not None and broken.quiet_s is None
        assert hostlock.release(c, path, b)
        c.run(["rm", "-rf", root], sudo=True)


def test_lock_peek_sees_holder_and_activity_and_changes_nothing(hosts: TestHosts) -> None:
    """The read-only look a no-op apply takes instead of the lock (access.unlocked_since)."""
    root = f"/tmp/dctl-edge-peek-{os.getpid()}"
    path = hostlock.lock_path("edge-peek", root=root)
    a = _owner("disaggctl apply a.yaml")
    listing = f"ls -a --full-time {root} 2>&1; stat -c '%n %y %z' {root} 2>&1"
    with connect(_target(hosts, "h2", "deploy")) as c:
        c.run(["rm", "-rf", root], sudo=True)
        never = hostlock.peek(c, path)
        assert never.held is None and never.quiet_s == float("inf")
        assert "No such file" in c.run(["sh", "-c", listing], sudo=True).out  # nothing created
        with hostlock.held(c, path, a):
            seen = hostlock.peek(c, path)
            assert seen.held is not None and seen.held.owner == a and 0 <= seen.held.age_s < 5
            assert seen.quiet_s is not None and 0 <= seen.quiet_s < 5
        just = hostlock.peek(c, path)  # right after the release
        assert just.held is None and just.quiet_s is not None and 0 <= just.quiet_s < 1.0
        time.sleep(1.2)
        before = c.run(["sh", "-c", listing], sudo=True).out
        later = hostlock.peek(c, path)
        assert later.held is None and later.quiet_s is not None and later.quiet_s > 1.0
        assert c.run(["sh", "-c", listing], sudo=True).out == before  # a peek changes nothing
        c.run(["rm", "-rf", root], sudo=True)


def test_stale_lock_is_reported_and_broken_only_with_force(hosts: TestHosts) -> None:
    path = hostlock.lock_path("edge-stale")
    killed = _owner("disaggctl apply killed.yaml", pid=2**22 + 12345)  # no such process here
    me = _owner("disaggctl apply new.yaml")
    with connect(_target(hosts, "h3", "deploy")) as c:
        c.run(["rm", "-rf", path], sudo=True)
        hostlock.acquire(c, path, killed)
        with pytest.raises(LockHeld) as e:
            hostlock.acquire(c, path, me)
        assert e.value.stale == f"its process {killed.pid} is gone on {killed.operator_host}"
        assert "looks stale" in str(e.value)
        broken = hostlock.acquire(c, path, me, force=True)
        assert broken is not None and broken.owner == killed
        st = hostlock.read(c, path)
        assert st is not None and st.owner == me
        assert hostlock.release(c, path, me)


def test_lock_is_atomic_under_contention(ssh_hosts: TestHosts) -> None:
    path = hostlock.lock_path("edge-race")
    conns: list[Connection] = [connect(_target(ssh_hosts, "h4", "deploy")) for _ in range(8)]
    try:
        conns[0].run(["rm", "-rf", path], sudo=True)
        won: list[LockOwner] = []
        lost: list[LockHeld] = []
        barrier = threading.Barrier(len(conns))

        def one(i: int) -> None:
            o = _owner(f"apply #{i}")
            barrier.wait()
            try:
                hostlock.acquire(conns[i], path, o)
                won.append(o)
            except LockHeld as e:
                lost.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(conns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(lost) == len(conns) - 1
        assert all(e.state.owner is None or e.state.owner == won[0] for e in lost)
        st = hostlock.read(conns[0], path)
        assert st is not None and st.owner == won[0]
        assert hostlock.release(conns[0], path, won[0])
    finally:
        for c in conns:
            c.close()



def _ssh_sessions_to(ip: str) -> int:
    r = subprocess.run(["ss", "-Htn", "state", "established", "dst", f"{ip}:22"], capture_output=True, text=True)
    return len(r.stdout.splitlines())


def _settled_sessions_to(ip: str, timeout_s: float = 10.0) -> int:
    """The count once it held still for 0.5 s: an earlier test's jump session may still be closing."""
    deadline = time.monotonic() + timeout_s
    last, since = _ssh_sessions_to(ip), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = _ssh_sessions_to(ip)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.5:
            break
    return last


def test_hosts_behind_a_bastion_share_one_login_to_it(bastion_hosts: TestHosts) -> None:
    """N hosts through one jump host: one SSH session to the jump host, not N (sshd's MaxStartups)."""
    assert bastion_hosts.jump is not None
    j1 = bastion_hosts.jump[1]
    before = _settled_sessions_to(j1)
    res = run_on_hosts([_target(bastion_hosts, n, "deploy") for n in bastion_hosts.names()],
                       lambda c: (c.run(["hostname"]).out.strip(), _ssh_sessions_to(j1)))
    assert {h: r.value[0] for h, r in res.items() if r.value} == {n: n for n in bastion_hosts.names()}
    assert all(r.value and r.value[1] == before + 1 for r in res.values())
    conns = [connect(_target(bastion_hosts, n, "deploy")) for n in bastion_hosts.names()]
    assert _ssh_sessions_to(j1) == before + 1
    conns[0].close()
    assert conns[1].run(["true"]).ok  # the shared jump connection outlives one user
    for c in conns[1:]:
        c.close()
    deadline = time.monotonic() + 5
    while _ssh_sessions_to(j1) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ssh_sessions_to(j1) == before  # closed with its last user


def test_systemd_hosts_behind_a_bastion(systemd_bastion_hosts: TestHosts) -> None:
    """Real systemd hosts reachable only through j1, driven as the sudo user: the topology the
    systemd target's apply runs on when hosts sit behind a bastion."""
    hosts = systemd_bastion_hosts
    t = _target(hosts, "s1", via_jump=False)
    with pytest.raises(SshError, match="s1: cannot connect"):
        connect(SshTarget(**{**t.__dict__, "connect_timeout": 1.0}), attempts=1)
    for name in hosts.names():
        with connect(_target(hosts, name, "deploy")) as c:
            c.check_sudo()
            assert c.run(["hostname"]).out.strip() == name
            assert c.run(["systemctl", "is-system-running"], sudo=True).out.strip() in ("running", "degraded")
            c.put("/etc/dctl-edge-probe", b"x\n")
            assert c.get("/etc/dctl-edge-probe") == b"x\n"
            c.check(["rm", "-f", "/etc/dctl-edge-probe"], sudo=True)
        with connect(_target(hosts, name, "askpass")) as c, pytest.raises(SudoError, match="a password is required"):
            c.check_sudo()
    # a unit's port on s2 (a transient systemd service), from s1's connection (through j1)
    s2 = hosts.ip("s2")
    with connect(_target(hosts, "s2", "deploy")) as c2, connect(_target(hosts, "s1", "deploy")) as c1:
        with pytest.raises(HttpError, match=rf"cannot connect from s1 to {s2}:18081"):
            c1.http("GET", s2, 18081, "/", timeout=5)
        c2.check(["systemd-run", "--unit=dctl-edge-http", "--", "python3", "-m", "http.server", "18081"], sudo=True)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    r = c1.http("GET", s2, 18081, "/", timeout=5)
                    break
                except HttpError:
                    assert time.monotonic() < deadline, "the transient HTTP service did not come up"
                    time.sleep(0.2)
            assert r.status == 200 and b"Directory listing" in r.body
        finally:
            c2.run(["systemctl", "stop", "dctl-edge-http"], sudo=True)
