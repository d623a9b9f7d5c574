"""Pure parts of the SSH edge primitives: sudo's refusals, lock records and staleness, URLs."""

from __future__ import annotations

import os
import subprocess

import pytest

from disaggctl.hostlock import LockOwner, LockState, lock_path, pid_alive, stale_reason
from disaggctl.ssh import SudoError, sudo_refusal
from disaggctl.sshhttp import split_url


@pytest.mark.parametrize(
    ("rc", "stderr", "expected"),
    [
        (1, "sudo: a password is required\n", "a password is required"),
        (1, "sudo: unable to resolve host h1\nsudo: a password is required\n", "a password is required"),
        (1, "sudo: a terminal is required to read the password; either use the -S option\n",
         "a terminal is required to read the password; either use the -S option"),
        (1, "sudo: ops is not in the sudoers file.  This incident will be reported.\n",
         "ops is not in the sudoers file.  This incident will be reported."),
        (127, "sh: 1: sudo: not found\n", "sudo is not installed"),
        (1, "cat: /x: No such file or directory\n", None),  # the command failed, not sudo
        (1, "sudo: unable to resolve host h1\n", None),  # a warning; the command ran and exited 1
        (0, "sudo: a password is required\n", None),
        (2, "sudo: a password is required\n", None),
    ],
)
def test_sudo_refusal(rc: int, stderr: str, expected: str | None) -> None:
    assert sudo_refusal(rc, stderr) == expected


def test_sudo_error_names_host_user_command_and_message() -> None:
    e = SudoError("gpu1", "ops", "systemctl restart x", "a password is required")
    assert str(e).startswith("gpu1: sudo as ops refused `systemctl restart x`: a password is required")
    assert "NOPASSWD" in str(e) and e.host == "gpu1" and e.user == "ops"


def test_lock_owner_json_round_trip_and_damage() -> None:
    o = LockOwner.here("disaggctl apply x.yaml", deployment="d1")
    assert o.pid == os.getpid() and o.token and len(o.token) == 16
    assert LockOwner.from_json(o.to_json()) == o
    assert '"token": "' + o.token + '"' in o.to_json()  # the release script greps this form
    assert LockOwner.from_json("") is None
    assert LockOwner.from_json('{"user": "a"}') is None
    assert LockOwner.from_json('{"user": "a", "operator_host": "b", "pid": "x", "since": 1, "command": "c"}') is None


def test_lock_owner_describe() -> None:
    o = LockOwner("alice", "laptop", 4242, 1_796_256_000.0, "disaggctl apply a.yaml", "d1", "t")
    assert o.describe() == "alice@laptop (pid 4242) since 2026-12-03 00:00:00 UTC: disaggctl apply a.yaml"
    assert "(12 min ago)" in o.describe(o.since + 720)
    assert "(30 s ago)" in o.describe(o.since + 30)
    assert "(3.0 h ago)" in o.describe(o.since + 3 * 3600)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_reason() -> None:
    mine = LockOwner("me", "opbox", os.getpid(), 0.0, "apply", "d", "t")
    dead = LockOwner("me", "opbox", _dead_pid(), 0.0, "apply", "d", "t")
    other = LockOwner("bob", "elsewhere", _dead_pid(), 0.0, "apply", "d", "t")
    assert not pid_alive(dead.pid) and pid_alive(os.getpid())
    assert stale_reason(LockState("/l", mine, 10), "opbox") is None
    assert stale_reason(LockState("/l", dead, 10), "opbox") == f"its process {dead.pid} is gone on opbox"
    # another machine's pid says nothing here: only the age bound applies
    assert stale_reason(LockState("/l", other, 10), "opbox") is None
    assert stale_reason(LockState("/l", other, 7 * 3600), "opbox") == "older than 6.0 h"
    assert stale_reason(LockState("/l", other, 100), "opbox", stale_after_s=60) == "older than 60 s"
    # a lock dir without its owner record: being written (young) or damaged (old)
    assert stale_reason(LockState("/l", None, 5), "opbox") is None
    assert stale_reason(LockState("/l", None, 120), "opbox") == "no owner record"
    assert stale_reason(LockState("/l", dead, 10), "opbox", alive=lambda pid: True) is None


def test_lock_path() -> None:
    assert lock_path("llama70b") == "/var/lib/disaggctl/locks/llama70b.lock"
    assert lock_path("x", root="/run/dctl") == "/run/dctl/x.lock"
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError):
            lock_path(bad)


def test_split_url() -> None:
    assert split_url("http://10.0.0.1:8000/health") == ("10.0.0.1", 8000, "/health")
    assert split_url("http://h/v1/models?x=1") == ("h", 80, "/v1/models?x=1")
    assert split_url("http://[fd00::1]:9/") == ("fd00::1", 9, "/")
    with pytest.raises(ValueError):
        split_url("https://h/")
    with pytest.raises(ValueError):
        split_url("h:80/x")


def test_probe_skips_pure_jump_hosts() -> None:
    from disaggctl.probe.remote import probe_host_names
    from disaggctl.spec import Host, Ssh

    class _Spec:
        hosts = [
            Host(name="bastion", address="10.0.0.1", gpus=0, ssh=Ssh(user="ops")),
            Host(name="gpu1", address="10.0.0.2", ssh=Ssh(jump="bastion")),
            Host(name="gpu2", address="10.0.0.3", gpus=8, ssh=Ssh(jump="gpu1")),  # a GPU host as a jump: probed
            Host(name="idle", address="10.0.0.4", gpus=0),  # no GPU but nobody's jump: probed (and reported)
        ]

    assert probe_host_names(_Spec()) == ["gpu1", "gpu2", "idle"]  # type: ignore[arg-type]


def test_lock_quiet_time_from_the_acquire_answer() -> None:
    from disaggctl.hostlock import _quiet

    def _q(answer: str) -> float | None:
        return _quiet(answer.split())

    # "acquired <folder mtime before ours> [<release stamp>] <our owner record's mtime>"
    assert _q("acquired 100.5 103.0") == 2.5  # no release stamp yet: the folder's time
    assert _q("acquired 100.0 102.0 103.5") == 1.5  # the later of the two counts
    assert _q("acquired 102.0 101.0 103.5") == 1.5
    assert _q("acquired new 103.0") == float("inf")  # a new folder: no lock was ever there
    assert _q("acquired new 102.0 103.0") == 1.0
    for unknown in ("acquired - 103.0", "acquired 100.0", "acquired", "acquired x 103.0", "acquired 1 2 3 4"):
        assert _q(unknown) is None, unknown  # nothing to rely on: observe again under the lock


def test_lock_peek_answer() -> None:
    """hostlock.peek's answer: the host's time, then the lock folder's, the release stamp's and the
    lock's mtimes (those that exist), then the owner record."""
    from disaggctl.hostlock import _parse_peek

    path = "/r/x.lock"
    never = _parse_peek(path, "100.5\nnew\n@@owner\n")
    assert never.held is None and never.quiet_s == float("inf")  # no lock was ever in that folder
    released = _parse_peek(path, "100.5\n99.0 /r\n98.0 /r/.x.lock.released\n@@owner\n")
    assert released.held is None and released.quiet_s == 1.5  # the later of folder and stamp
    assert _parse_peek(path, "100.5\n98.0 /r\n99.5 /r/.x.lock.released\n@@owner\n").quiet_s == 1.0
    # created after the host's time was read: activity newer than the look, never quiet
    assert (_parse_peek(path, "100.5\nnew\n100.6 /r\n@@owner\n").quiet_s or 0) < 0
    owner = LockOwner("bob", "laptop", 7, 90.0, "disaggctl apply x.yaml", "x", "t")
    held = _parse_peek(path, f"100.5\n99.0 /r\n97.5 {path}\n@@owner\n{owner.to_json()}\n")
    assert held.held == LockState(path, owner, 3.0)
    # the lock appeared between the stat and the cat, or its owner record is not written yet
    assert _parse_peek(path, f"100.5\n99.0 /r\n@@owner\n{owner.to_json()}\n").held == LockState(path, owner, 0.0)
    assert _parse_peek(path, f"100.5\n99.0 /r\n100.0 {path}\n@@owner\n").held == LockState(path, None, 0.5)
    for unknown in ("N\n@@owner\n", "100.5\n@@owner\n", "", "100.5\nx /r\n@@owner\n"):
        assert _parse_peek(path, unknown) == _parse_peek(path, "")  # nothing to rely on
        assert _parse_peek(path, unknown).quiet_s is None and _parse_peek(path, unknown).held is None


def test_a_noop_apply_ends_unlocked_only_when_no_lock_was_held_while_it_observed() -> None:
    import time
    from types import SimpleNamespace

    from disaggctl.hostlock import LockHeld, Peek
    from disaggctl.targets.systemd.access import unlocked_since

    c = SimpleNamespace(hosts=["s1", "s2"], rendered=SimpleNamespace(for_host=lambda h: h == "s2"))
    began = time.monotonic() - 1.0  # observing began a second ago
    assert unlocked_since(c, Peek(None, float("inf")), began)  # type: ignore[arg-type]
    assert unlocked_since(c, Peek(None, 5.0), began)  # type: ignore[arg-type]
    assert not unlocked_since(c, Peek(None, 0.5), began)  # type: ignore[arg-type]  # a lock came and went
    assert not unlocked_since(c, Peek(None, 1.01), began)  # type: ignore[arg-type]  # within the margin
    assert not unlocked_since(c, Peek(None, None), began)  # type: ignore[arg-type]
    owner = LockOwner("bob", "laptop", 7, time.time() - 60, "disaggctl apply x.yaml")
    with pytest.raises(LockHeld, match=r"^s2: deployment is locked by bob@laptop \(pid 7\)"):  # the lock host
        unlocked_since(c, Peek(LockState("/l", owner, 60.0), 60.0), began)  # type: ignore[arg-type]
