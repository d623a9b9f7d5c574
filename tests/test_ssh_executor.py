"""The paramiko executor against real sshd hosts (fakehosts in network namespaces)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import paramiko
import pytest

from disaggctl.errors import DisaggError
from disaggctl.ssh import HostKeyError, SshError, SshTarget, connect, fingerprint, parse_jump, run_on_hosts, target_for
from disaggctl.sshcrypto import KEYS
from tests.plugins.infra import TestHosts

pytestmark = pytest.mark.infra


def _target(hosts: TestHosts, name: str, known_hosts: Path | None = None, **kw: object) -> SshTarget:
    return SshTarget(
        name=name,
        address=hosts.ip(name),
        key=str(hosts.key),
        known_hosts=str(known_hosts or hosts.known_hosts),
        connect_timeout=5,
        **kw,  # type: ignore[arg-type]
    )


def test_run_argv_rc_stdout_stderr_and_input(ssh_hosts: TestHosts) -> None:
    with connect(_target(ssh_hosts, "h1")) as c:
        r = c.run(["sh", "-c", 'echo "$1"; echo err >&2; exit 3', "sh", "a b; $HOME 'q' \"d\""])
        assert (r.rc, r.out, r.err) == (3, "a b; $HOME 'q' \"d\"\n", "err\n")
        r = c.run(["cat"], input=b"\x00\x01binary\n")
        assert r.stdout == b"\x00\x01binary\n" and r.ok
        assert c.run(["hostname"]).out.strip() == "h1"


def test_large_stdout_and_stderr_do_not_deadlock(ssh_hosts: TestHosts) -> None:
    with connect(_target(ssh_hosts, "h1")) as c:
        r = c.run(["sh", "-c", "head -c 5000000 /dev/zero; head -c 5000000 /dev/zero >&2"], timeout=60)
        assert len(r.stdout) == 5_000_000 and len(r.stderr) == 5_000_000


def test_command_timeout_names_host(ssh_hosts: TestHosts) -> None:
    with connect(_target(ssh_hosts, "h2")) as c, pytest.raises(SshError, match="h2: command timed out"):
        c.run(["sleep", "5"], timeout=0.5)


def test_put_is_atomic_with_mode_and_get(ssh_hosts: TestHosts) -> None:
    with connect(_target(ssh_hosts, "h1")) as c:
        c.run(["mkdir", "-p", "/srv/dctl-test"])
        c.put("/srv/dctl-test/secret.env", b"TOKEN=x\n", 0o600)
        c.put("/srv/dctl-test/secret.env", b"TOKEN=y\n", 0o600)  # overwrite via rename
        assert c.get("/srv/dctl-test/secret.env") == b"TOKEN=y\n"
        assert c.get("/srv/dctl-test/missing") is None
        ls = c.run(["ls", "-A", "/srv/dctl-test"]).out.split()
        assert ls == ["secret.env"]  # no temp files left behind
    f = ssh_hosts.fs("h1") / "srv" / "dctl-test" / "secret.env"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600


def test_put_into_missing_dir_names_host_and_path(ssh_hosts: TestHosts) -> None:
    with connect(_target(ssh_hosts, "h1")) as c, pytest.raises(SshError, match="h1: cannot write /nonexistent/x"):
        c.put("/nonexistent/x", b"", 0o644)


def test_accept_new_pins_unknown_key_then_refuses_changed_key(ssh_hosts: TestHosts, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    with connect(_target(ssh_hosts, "h3", kh)) as c:
        assert c.run(["true"]).ok
    line = kh.read_text().split()
    assert line[0] == ssh_hosts.ip("h3") and line[1] == "ssh-ed25519"
    # pin a different key for h3: the connection must be refused with both fingerprints
    other = paramiko.Ed25519Key.from_private_key_file(str(ssh_hosts.base / "h4" / "host_ed25519"))
    kh.write_text(f"{ssh_hosts.ip('h3')} ssh-ed25519 {other.get_base64()}\n")
    with pytest.raises(HostKeyError) as e:
        connect(_target(ssh_hosts, "h3", kh))
    msg = str(e.value)
    assert msg.startswith("h3: HOST KEY CHANGED") and fingerprint(other) in msg
    real = paramiko.Ed25519Key.from_private_key_file(str(ssh_hosts.base / "h3" / "host_ed25519"))
    assert fingerprint(real) in msg


def test_strict_refuses_unknown_key(ssh_hosts: TestHosts, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    with pytest.raises(HostKeyError, match=r"h2: host key ssh-ed25519 SHA256:.* strict"):
        connect(_target(ssh_hosts, "h2", kh, strict=True))
    assert not kh.exists()
    shutil.copy(ssh_hosts.known_hosts, kh)
    with connect(_target(ssh_hosts, "h2", kh, strict=True)) as c:
        assert c.run(["true"]).ok


def test_jump_host(ssh_hosts: TestHosts) -> None:
    jump = _target(ssh_hosts, "h1")
    t = SshTarget(**{**_target(ssh_hosts, "h5").__dict__, "jump": jump})
    with connect(t) as c:
        assert c.run(["hostname"]).out.strip() == "h5"


def test_connections_share_one_parsed_key_and_speak_aes_gcm(ssh_hosts: TestHosts) -> None:
    targets = [_target(ssh_hosts, f"h{i}") for i in (1, 2, 3)]
    jumped = SshTarget(**{**_target(ssh_hosts, "h5").__dict__, "jump": targets[0]})
    res = run_on_hosts([*targets, jumped], lambda c: c.client.get_transport(), max_workers=4)
    kinds = {h: (r.value.local_cipher, r.value.remote_cipher) for h, r in res.items() if r.value is not None}
    assert kinds == {h: ("aes128-gcm@openssh.com",) * 2 for h in ("h1", "h2", "h3", "h5")}
    key = KEYS.load(str(ssh_hosts.key))
    assert key is not None and KEYS.load(str(ssh_hosts.key)) is key  # parsed once for all of them


def test_a_key_with_a_passphrase_fails_as_before(ssh_hosts: TestHosts, tmp_path: Path) -> None:
    enc = tmp_path / "enc_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pw", "-f", str(enc)], check=True)
    t = SshTarget(**{**_target(ssh_hosts, "h1").__dict__, "key": str(enc)})
    with pytest.raises(SshError, match=r"h1: authentication as root failed: .*encrypted"):
        connect(t, attempts=1)


def test_unreachable_host_does_not_abort_others(ssh_hosts: TestHosts) -> None:
    good = [_target(ssh_hosts, f"h{i}") for i in (1, 2, 3)]
    bad = SshTarget(name="ghost", address="10.200.0.250", key=str(ssh_hosts.key), connect_timeout=0.5)
    res = run_on_hosts([*good, bad], lambda c: c.run(["hostname"]).out.strip(), max_workers=4)
    assert {h: r.value for h, r in res.items() if r.ok} == {"h1": "h1", "h2": "h2", "h3": "h3"}
    assert isinstance(res["ghost"].error, SshError) and str(res["ghost"].error).startswith("ghost: cannot connect")


def test_per_host_timeout(ssh_hosts: TestHosts) -> None:
    res = run_on_hosts([_target(ssh_hosts, "h1")], lambda c: c.run(["sleep", "10"]), timeout=1.0)
    assert not res["h1"].ok and "h1" in str(res["h1"].error)


def test_sudo_prefix_only_for_non_root(ssh_hosts: TestHosts) -> None:
    with connect(_target(ssh_hosts, "h1")) as c:
        assert c.command_line(["systemctl", "start", "a b"], sudo=True) == "systemctl start 'a b'"
    t = SshTarget(name="x", address="127.0.0.1", user="deploy")
    from disaggctl.ssh import Connection

    conn = Connection(t, paramiko.SSHClient())
    assert conn.command_line(["systemctl", "start", "a b"], sudo=True) == "sudo -n -- systemctl start 'a b'"


def test_parse_jump_forms() -> None:
    base = SshTarget(name="a", address="a", key="/k")
    j = parse_jump("ops@bastion:2222", base)
    assert (j.user, j.address, j.port, j.key) == ("ops", "bastion", 2222, "/k")
    j = parse_jump("[fd00::1]:22", base)
    assert (j.user, j.address, j.port) == ("root", "fd00::1", 22)


def test_target_for_spec_hosts_and_jump_loop() -> None:
    from disaggctl.spec import Host, Ssh

    class _Spec:
        hosts = [
            Host(name="bastion", address="10.0.0.1", ssh=Ssh(user="ops", key="/k")),
            Host(name="gpu1", address="10.0.0.2", ssh=Ssh(jump="bastion", strict_host_keys=True)),
            Host(name="loop1", ssh=Ssh(jump="loop2")),
            Host(name="loop2", ssh=Ssh(jump="loop1")),
        ]

    t = target_for(_Spec(), "gpu1")  # type: ignore[arg-type]
    assert t.address == "10.0.0.2" and t.strict and t.jump is not None and t.jump.user == "ops"
    with pytest.raises(DisaggError, match="loop"):
        target_for(_Spec(), "loop1")  # type: ignore[arg-type]
    with pytest.raises(DisaggError, match="not declared"):
        target_for(_Spec(), "nope")  # type: ignore[arg-type]
