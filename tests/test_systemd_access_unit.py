"""The systemd target's access logic as data (no hosts): the host registry the manifests keep
(what a removed host is reached with, when it is forgotten), the lock host, and which SSH
connection an HTTP check leaves from. The real paths run in tests/test_systemd_access.py."""

from __future__ import annotations

from typing import Any

import pytest

from disaggctl.compile import compile_spec
from disaggctl.loader import load_text
from disaggctl.ssh import target_for
from disaggctl.targets.systemd.access import (
    SshHttp,
    address_of,
    lock_dir,
    lock_host,
    reach,
    remembered,
    set_registry,
    stale_registry,
    target_of,
)
from disaggctl.targets.systemd.backend import Context, build_context
from disaggctl.targets.systemd.changes import Observed
from disaggctl.targets.systemd.manifest import HostAddress, build_manifest, parse_manifest

SPEC = """
name: demo
model: {{path: /models/tiny, served_name: tiny}}
hosts:
  - {{name: bastion, address: 192.0.2.1, gpus: 0, ssh: {{user: ops}}}}
{hosts}prefill: {{replicas: 1, hosts: {{names: [s1]}}}}
decode: {{replicas: {dreps}}}
kv_transfer: {{kind: shared-storage, path: /var/tmp/kv}}
router: {{host: s1, port: 8000}}
target: {{kind: systemd, vllm_bin: /opt/v/vllm, python_bin: /opt/venv/bin/python, state_dir: /srv/dctl}}
"""
HOST = "  - {{name: {n}, address: 10.9.0.{i}, gpus: 2, ssh: {{user: deploy, port: 2222, jump: bastion}}}}\n"


def _ctx(names: tuple[str, ...] = ("s1", "s2"), dreps: int = 2) -> Context:
    hosts = "".join(HOST.format(n=n, i=10 + int(n[1:])) for n in names)
    loaded = load_text(SPEC.format(hosts=hosts, dreps=dreps), "spec.yaml")
    return build_context(loaded.spec, compile_spec(loaded), {})


def _holding(c: Context, host: str, registry: dict[str, HostAddress]) -> Observed:
    m = build_manifest(c.rendered, host, "demo", None, {}, c.digest, hosts=registry)
    return Observed(host, manifest=parse_manifest(m.to_bytes()))


def test_an_address_round_trips_through_the_manifest_with_its_jump() -> None:
    c = _ctx()
    t = target_for(c.spec, "s2")
    a = address_of(t)
    assert a.jump is not None and a.jump.user == "ops" and a.user == "deploy" and a.port == 2222
    back = parse_manifest(build_manifest(c.rendered, "s1", "demo", None, {}, c.digest, hosts={"s2": a}).to_bytes())
    assert back is not None
    assert target_of(back.hosts["s2"]) == t  # everything connect() needs, without the spec


def test_registry_remembers_a_removed_host_until_it_is_clean() -> None:
    full = _ctx()
    reg = {h: address_of(target_for(full.spec, h)) for h in ("s1", "s2")}
    c = _ctx(("s1",), dreps=1)  # s2 left the spec
    declared = {"s1": _holding(c, "s1", reg), "bastion": Observed("bastion")}
    gone = {n: a for n, a in remembered(declared).items() if n not in declared}
    assert list(gone) == ["s2"]
    c.removed = gone
    # s2 still holds files: remembered while pending, forgotten in the final manifests
    set_registry(c, {**declared, "s2": _holding(c, "s2", reg)})
    assert set(c.registry) == {"s1"} and set(c.registry_pending) == {"s1", "s2"}
    assert stale_registry(c, declared) == ["s1"]  # s1 must forget s2 even if nothing else changes there
    # s2 unreachable: it keeps its files, so it stays remembered
    set_registry(c, {**declared, "s2": Observed("s2", error="s2: cannot connect")})
    assert set(c.registry) == {"s1", "s2"} and c.registry["s2"].address == "10.9.0.12"
    # a declared host that is unreachable but never held files is not remembered
    c2 = _ctx(("s1", "s2", "s3"), dreps=2)
    set_registry(c2, {"s1": _holding(c2, "s1", reg), "s3": Observed("s3", error="s3: cannot connect")})
    assert "s3" not in c2.registry_pending


def test_a_removed_host_is_reached_with_this_operators_key_not_the_recorded_paths(tmp_path: Any) -> None:
    mine = tmp_path / "mine"
    mine.write_text("key")
    ssh = f"{{user: deploy, key: {mine}, known_hosts: {tmp_path}/kh}}"
    hosts = f"  - {{name: s1, address: 10.9.0.11, gpus: 2, ssh: {ssh}}}\n"
    loaded = load_text(SPEC.format(hosts=hosts, dreps=1), "spec.yaml")
    c = build_context(loaded.spec, compile_spec(loaded), {})
    jump = HostAddress(name="bastion", address="192.0.2.1", user="ops", key="/home/alice/.ssh/id_ops")
    gone = HostAddress(name="s2", address="10.9.0.12", port=2222, user="deploy", key="/home/alice/.ssh/id_ed25519",
                       known_hosts="/home/alice/.ssh/known_hosts", strict=True, jump=jump)  # fmt: skip
    t = reach(gone, c.spec)  # alice's paths do not exist here: this operator's (s1's, same user deploy)
    assert (t.address, t.port, t.user, t.strict) == ("10.9.0.12", 2222, "deploy", True)
    assert t.key == str(mine) and t.known_hosts == f"{tmp_path}/kh"
    # the jump's user (ops) is declared with no key: agent and default keys, ~/.ssh/known_hosts
    assert t.jump is not None and t.jump.address == "192.0.2.1" and t.jump.key is None and t.jump.known_hosts is None
    # recorded paths that exist here are kept (the same operator, or a shared key path)
    here = tmp_path / "recorded"
    here.write_text("key")
    kept = reach(HostAddress(name="s2", address="10.9.0.12", user="deploy", key=str(here)), c.spec)
    assert kept.key == str(here) and kept.known_hosts == f"{tmp_path}/kh"


def test_lock_host_is_the_first_declared_host_that_runs_something() -> None:
    c = _ctx()
    assert lock_host(c) == "s1"  # not the bastion (gpus: 0, nothing rendered)
    assert lock_dir(c) == "/srv/dctl/locks/demo.lock"


class _Conn:
    """What SshHttp uses of a Connection: http_url (the real one is tested on real hosts)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, str]] = []

    def http_url(self, method: str, url: str, body: Any, timeout: float, headers: Any) -> Any:
        from disaggctl.ssh import HttpError, HttpResponse

        self.calls.append((method, url))
        if url.endswith("/down"):
            raise HttpError(self.name, f"{method} {url}: cannot connect")
        return HttpResponse(503 if url.endswith("/busy") else 200, {}, b"{}")


def test_each_check_leaves_from_the_host_the_url_names() -> None:
    c = _ctx()
    conns = {"s1": _Conn("s1"), "s2": _Conn("s2")}
    via = SshHttp.for_context(c, conns)  # type: ignore[arg-type]
    assert via.probe("http://10.9.0.12:8100/health", 1) == (True, "200")
    assert conns["s2"].calls == [("GET", "http://10.9.0.12:8100/health")]
    assert via.request("POST", "http://127.0.0.1:8000/v1/completions", b"{}", 1, {})[0] == 200
    assert conns["s1"].calls[-1][1].startswith("http://127.0.0.1")  # unknown address: the router's host
    assert via.probe("http://10.9.0.11:8100/busy", 1) == (False, "HTTP 503")
    ok, detail = via.probe("http://10.9.0.11:8100/down", 1)
    assert not ok and "cannot connect" in detail
    with pytest.raises(OSError, match="HTTP 503"):
        via.fetch("http://10.9.0.11:8100/busy", 1)

