"""Rolling changes on the local target, end to end with the real supervisor and builtin router
and stand-in engines: the plan's order, zero failed requests under load, and the refusal of a
change that cannot be rolled (a fingerprint change with one instance per role)."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.test_local_backend import cli, free_base, standin_vllm  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(300)


def write_spec(tmp: Path, vllm_bin: str, replicas: int, env: str = "{}", revision: str | None = None) -> Path:
    saved = tmp / "ports.json"
    if saved.exists():
        http, router, side = json.loads(saved.read_text())
    else:
        http, router, side = free_base(2 * replicas), free_base(2), free_base(2 * replicas)
        saved.write_text(json.dumps([http, router, side]))
    (tmp / "model").mkdir(exist_ok=True)
    rev = f", revision: {revision}" if revision else ""
    spec = tmp / "spec.yaml"
    spec.write_text(f"""\
name: roll
model: {{path: {tmp / "model"}, served_name: tiny{rev}}}
hosts: [{{name: localhost, address: 127.0.0.1, gpus: {2 * replicas}}}]
prefill: {{replicas: {replicas}, env: {env}}}
decode: {{replicas: {replicas}, env: {env}}}
kv_transfer: {{kind: nixl, buffer_device: cpu, side_channel_port: {side}}}
router: {{port: {router}, bind: 127.0.0.1, local_prefill_threshold: 8}}
engine: {{host_bind: 127.0.0.1, http_port: {http}}}
target: {{kind: local, cpu: true, state_dir: {tmp / "state"}, vllm_bin: {vllm_bin}}}
health: {{startup_timeout_s: 30, interval_s: 0.2, request_timeout_s: 10}}
""")
    return spec


class Load:
    """Closed-loop requests through the router until stopped; counts what failed."""

    def __init__(self, url: str) -> None:
        self.url = url + "/v1/completions"
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            body = json.dumps({"model": "tiny", "prompt": f"{i} the quick brown fox " * 8, "max_tokens": 4}).encode()
            req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    json.loads(r.read())
                self.ok += 1
            except (urllib.error.URLError, OSError, ValueError) as e:
                self.failed.append(str(e))
            i += 1

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *a: object) -> None:
        self.stop.set()
        self.thread.join(15)


def _router_url(tmp: Path) -> str:
    return f"http://127.0.0.1:{json.loads((tmp / 'ports.json').read_text())[1]}"


def test_2p2d_change_rolls_decode_first_with_zero_failed_requests(tmp_path: Path, standin_vllm: str) -> None:  # noqa: F811
    spec = write_spec(tmp_path, standin_vllm, 2)
    try:
        r = cli("apply", str(spec), "-y")
        assert r.returncode == 0, r.stdout + r.stderr
        write_spec(tmp_path, standin_vllm, 2, env="{FOO: '1'}")
        r = cli("plan", str(spec), "--output", "json")
        roll = json.loads(r.stdout)["target"]["rollout"]
        assert roll["strategy"] == "decode-first" and not roll["problems"]
        restarts = [s["instances"][0] for s in roll["steps"] if s["op"] == "restart"]
        assert restarts == ["decode-0", "decode-1", "prefill-0", "prefill-1"]
        with Load(_router_url(tmp_path)) as load:
            r = cli("apply", str(spec), "-y", timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "step 12/12" in r.stdout and "canary" in r.stdout
        assert load.ok > 20 and load.failed == [], load.failed[:5]
        r = cli("status", str(spec), "--check", "--output", "json")
        assert r.returncode == 0, r.stdout + r.stderr
        checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
        assert checks["prefill_handles_requests"]["ok"] and checks["decode_receives_kv"]["ok"], checks
        assert checks["fingerprints_match"]["ok"] and checks["kv_transfer_failures"]["ok"], checks
        # the fingerprint changes (model revision): two cohorts, still no failed request
        write_spec(tmp_path, standin_vllm, 2, env="{FOO: '1'}", revision="v2")
        r = cli("plan", str(spec))
        assert "rolling order (cohorts)" in r.stdout, r.stdout
        assert "drained through the router's admin API" in r.stdout, r.stdout
        assert "the router cannot drain" not in r.stdout
    finally:
        cli("destroy", str(spec), "-y")


class AdminWatch:
    """Polls the router's GET /admin/instances (token from the file apply made) while running;
    records every (instance, state) it sees."""

    def __init__(self, tmp: Path) -> None:
        self.url = f"http://127.0.0.1:{json.loads((tmp / 'ports.json').read_text())[1] + 1}/admin/instances"
        self.token = (tmp / "state" / "router-admin.token").read_text().strip()
        self.seen: set[tuple[str, str]] = set()
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            req = urllib.request.Request(self.url, headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    for i in json.loads(r.read())["instances"]:
                        self.seen.add((i["name"], i["state"]))
            except (urllib.error.URLError, OSError, ValueError) as e:
                self.errors.append(str(e))

    def __enter__(self) -> AdminWatch:
        self.thread.start()
        return self

    def __exit__(self, *a: object) -> None:
        self.stop.set()
        self.thread.join(15)


def test_1p1d_change_drains_through_admin_api_with_zero_failed_requests(tmp_path: Path, standin_vllm: str) -> None:  # noqa: F811
    spec = write_spec(tmp_path, standin_vllm, 1)
    try:
        r = cli("apply", str(spec), "-y")
        assert r.returncode == 0, r.stdout + r.stderr
        tok = tmp_path / "state" / "router-admin.token"
        assert tok.stat().st_mode & 0o777 == 0o600
        token = tok.read_text().strip()
        assert len(token) >= 32 and token not in r.stdout + r.stderr
        write_spec(tmp_path, standin_vllm, 1, env="{FOO: '1'}")
        with Load(_router_url(tmp_path)) as load, AdminWatch(tmp_path) as watch:
            r = cli("apply", str(spec), "-y", timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "drained through the router's admin API" in r.stdout, r.stdout
        assert token not in r.stdout + r.stderr
        assert tok.read_text().strip() == token  # a re-apply keeps the token
        for name in ("decode-0", "prefill-0"):
            assert {(name, "draining"), (name, "drained")} & watch.seen, watch.seen
        assert load.ok > 20 and load.failed == [], load.failed[:5]
    finally:
        cli("destroy", str(spec), "-y")
    assert not (tmp_path / "state" / "router-admin.token").exists()


def test_1p1d_fingerprint_change_says_it_cannot_roll_and_apply_asks(tmp_path: Path, standin_vllm: str) -> None:  # noqa: F811
    spec = write_spec(tmp_path, standin_vllm, 1)
    try:
        r = cli("apply", str(spec), "-y")
        assert r.returncode == 0, r.stdout + r.stderr
        write_spec(tmp_path, standin_vllm, 1, revision="v2")
        r = cli("plan", str(spec))
        assert "cannot roll safely" in r.stdout and "single running instance" in r.stdout, r.stdout
        r = cli("apply", str(spec))  # no -y, no terminal: refused before anything changes
        assert r.returncode != 0 and "confirmation" in (r.stdout + r.stderr)
        r = cli("apply", str(spec), "-y")  # accepted: not rolled (every order fails), all at once
        assert r.returncode == 0, r.stdout + r.stderr
        assert "restarting every changed instance at once" in r.stdout and "step 1/" not in r.stdout
    finally:
        cli("destroy", str(spec), "-y")
