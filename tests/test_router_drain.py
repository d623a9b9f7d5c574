"""Drain through the admin API, degraded serving on the surviving role, and 200-with-error counting:
the real router (`python -m disaggctl.router`) in front of stand-in engines, on the wire."""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from disaggctl.router.admin import read_token
from disaggctl.router.config import AdminConfig, ConfigError, parse_router_config
from tests.plugins.standin import Engine, RouterProc, Standin, free_port, http, metric_sum, post_json

LONG = "The quick brown fox jumps over the lazy dog. " * 4  # disaggregated (threshold 8 tokens)


class Admin:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        hdrs = {"Authorization": f"Bearer {self.token if token is None else token}"}
        status, _, data = http(method, self.url + path, body, hdrs)
        return status, json.loads(data) if data else None

    def states(self) -> dict[str, dict[str, Any]]:
        status, body = self.call("GET", "/admin/instances")
        assert status == 200, body
        return {i["name"]: i for i in body["instances"]}

    def drain(self, name: str) -> None:
        status, body = self.call("POST", "/admin/drain", {"instance": name})
        assert status == 202 and body["state"] in ("draining", "drained"), body

    def undrain(self, name: str) -> None:
        status, body = self.call("POST", "/admin/undrain", {"instance": name})
        assert status == 200, body

    def wait_state(self, name: str, state: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.states()[name]
            if got["state"] == state:
                return got
            assert time.monotonic() < deadline, f"{name} stays {got}"
            time.sleep(0.02)


def router_with_admin(
    standin: Standin, prefill: list[Engine], decode: list[Engine], token_mode: int = 0o600, **settings: Any
) -> tuple[RouterProc, Admin]:
    token = secrets.token_hex(16)
    path = standin.tmp / f"admin-{secrets.token_hex(4)}.token"
    path.write_text(token + "\n")
    os.chmod(path, token_mode)
    port = free_port()
    admin = {"host": "127.0.0.1", "port": port, "token_file": str(path)}
    settings.setdefault("kv_kind", "nixl")
    r = standin.router(prefill=prefill, decode=decode, admin=admin, **settings)
    return r, Admin(f"http://127.0.0.1:{port}", token)


def nixl(standin: Standin, name: str, role: str, *args: str, port: int | None = None) -> Engine:
    return standin.engine(name, kv="nixl", role=role, args=args, port=port)


def complete(r: RouterProc, prompt: str = LONG, **extra: Any) -> tuple[int, Any]:
    return post_json(r.url + "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2, **extra})


# ---------------------------------------------------------------------- config


def test_admin_config_parses_checks_and_round_trips() -> None:
    base = {"model": "m", "kv_kind": "nixl", "prefill": [], "decode": [{"name": "d", "url": "http://h:1"}]}
    cfg = parse_router_config({**base, "admin": {"port": 9001, "token_file": "/x/t"}})
    assert cfg.admin == AdminConfig(port=9001, host="127.0.0.1", token_file="/x/t")
    assert parse_router_config(json.loads(cfg.to_json())) == cfg
    assert list(json.loads(cfg.to_json())["admin"]) == ["host", "port", "token_file"]
    assert parse_router_config(base).admin is None
    with pytest.raises(ConfigError) as e:
        parse_router_config({**base, "admin": {"port": "9001", "tokn_file": "/t"}})
    assert "admin.tokn_file: unknown field (did you mean 'token_file'?)" in e.value.problems
    with pytest.raises(ConfigError) as e:
        parse_router_config({**base, "admin": {"port": 70000}, "retries": "1"})
    assert e.value.problems == [
        "admin.port: 70000 is not a TCP port (0-65535)",
        "retries: expected an integer, got a string ('1')",
    ]


def test_token_file_must_be_private(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text("abc\n")
    os.chmod(f, 0o600)
    assert read_token(str(f)) == "abc"
    os.chmod(f, 0o640)
    with pytest.raises(PermissionError, match="0640"):
        read_token(str(f))


# ---------------------------------------------------------------------- admin API


def test_admin_api_needs_the_token_and_lists_instances(standin: Standin) -> None:
    p, d = nixl(standin, "prefill-0", "kv_producer"), nixl(standin, "decode-0", "kv_consumer")
    r, admin = router_with_admin(standin, [p], [d])
    assert admin.call("GET", "/admin/instances", token="wrong")[0] == 401
    status, _, _ = http("GET", admin.url + "/admin/instances")  # no Authorization at all
    assert status == 401
    assert http("GET", r.url + "/admin/instances")[0] == 404  # not on the client port
    got = admin.states()
    assert got["prefill-0"] == {
        "name": "prefill-0",
        "role": "prefill",
        "url": p.url,
        "state": "active",
        "in_flight": 0,
        "kv_held": 0,
    }
    assert got["decode-0"]["role"] == "decode" and got["decode-0"]["state"] == "active"
    assert admin.call("POST", "/admin/drain", {"instance": "decode-9"})[0] == 404
    assert admin.call("POST", "/admin/drain", {"name": "decode-0"})[0] == 400
    m = r.metrics()
    assert m['disaggctl_router_upstream_state{upstream="decode-0",role="decode",state="active"}'] == 1
    assert m['disaggctl_router_upstream_state{upstream="decode-0",role="decode",state="drained"}'] == 0


def test_admin_refused_without_a_usable_token_file(standin: Standin) -> None:
    d = nixl(standin, "decode-0", "kv_consumer")
    port = free_port()
    standin.router(kv_kind="nixl", prefill=[], decode=[d], admin={"port": port})
    status, _, data = http("GET", f"http://127.0.0.1:{port}/admin/instances", headers={"Authorization": "Bearer x"})
    assert status == 403 and "token_file" in json.loads(data)["error"]["message"]
    _, admin = router_with_admin(standin, [], [d], token_mode=0o644)
    status, body = admin.call("GET", "/admin/instances")
    assert status == 403 and "0644" in body["error"]["message"]


def test_drain_finishes_in_flight_then_takes_no_new_requests(standin: Standin) -> None:
    slow = nixl(standin, "decode-0", "kv_consumer", "--standin-latency-ms", "800")
    other = nixl(standin, "decode-1", "kv_consumer")
    r, admin = router_with_admin(standin, [], [slow, other], decode_policy="round_robin")
    admin.drain("decode-1")  # so the first request goes to the slow one
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(complete(r, "x")[0]))
    t.start()
    deadline = time.monotonic() + 10
    while admin.states()["decode-0"]["in_flight"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    admin.undrain("decode-1")
    admin.drain("decode-0")
    assert admin.states()["decode-0"]["state"] == "draining"
    before = len(slow.requests())
    for _ in range(4):
        assert complete(r, "y")[0] == 200
    assert len(slow.requests()) == before  # no new request went to the draining instance
    t.join(10)
    assert results == [200]  # the in-flight one finished
    admin.wait_state("decode-0", "drained")
    admin.undrain("decode-0")
    assert admin.states()["decode-0"]["state"] == "active"
    for _ in range(4):
        assert complete(r, "z")[0] == 200
    assert len(slow.requests()) > before


def test_prefill_drained_only_after_decode_pulled_its_kv(standin: Standin) -> None:
    p = nixl(standin, "prefill-0", "kv_producer")
    d = nixl(standin, "decode-0", "kv_consumer", "--standin-token-latency-ms", "150")
    r, admin = router_with_admin(standin, [p], [d])
    done: list[int] = []
    body = {"model": "tiny", "prompt": LONG, "max_tokens": 8, "stream": True}
    t = threading.Thread(target=lambda: done.append(http("POST", r.url + "/v1/completions", body)[0]))
    t.start()
    deadline = time.monotonic() + 10
    while admin.states()["prefill-0"]["kv_held"] == 0:  # the prefill answered; decode is running
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert admin.states()["prefill-0"]["in_flight"] == 0
    admin.drain("prefill-0")
    assert admin.states()["prefill-0"]["state"] == "draining"  # its KV is still held for decode
    t.join(15)
    assert done == [200]
    got = admin.wait_state("prefill-0", "drained")
    assert got["kv_held"] == 0


# ---------------------------------------------------------------------- degraded, not down


def test_all_prefill_drained_serves_on_decode_then_disaggregates_again(standin: Standin) -> None:
    p, d = nixl(standin, "prefill-0", "kv_producer"), nixl(standin, "decode-0", "kv_consumer")
    r, admin = router_with_admin(standin, [p], [d])
    admin.drain("prefill-0")
    admin.wait_state("prefill-0", "drained")
    before = len(p.requests())
    assert complete(r)[0] == 200
    assert len(p.requests()) == before
    m = r.metrics()
    assert metric_sum(m, "disaggctl_router_aggregated_fallback_total", role="decode") == 1
    assert metric_sum(m, "disaggctl_router_requests_total", reason="prefill_drained") == 1
    admin.undrain("prefill-0")
    assert complete(r)[0] == 200
    assert len(p.requests()) == before + 1
    assert metric_sum(r.metrics(), "disaggctl_router_requests_total", path="disaggregated") == 1


def test_all_decode_drained_serves_whole_requests_on_prefill(standin: Standin) -> None:
    p, d = nixl(standin, "prefill-0", "kv_producer"), nixl(standin, "decode-0", "kv_consumer")
    r, admin = router_with_admin(standin, [p], [d])
    want = complete(r)[1]["choices"][0]["text"]
    admin.drain("decode-0")
    admin.wait_state("decode-0", "drained")
    status, _, data = http("GET", r.url + "/health")
    assert status == 200 and json.loads(data)["status"] == "degraded"
    assert json.loads(data)["decode"][0]["state"] == "drained"
    n = len(d.requests())
    status, out = complete(r)
    assert status == 200 and out["choices"][0]["text"] == want  # the same answer, from prefill alone
    status, _, sse = http(
        "POST", r.url + "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2, "stream": True}
    )
    assert status == 200 and sse.endswith(b"data: [DONE]\n\n")
    assert len(d.requests()) == n
    whole = [q["body"] for q in p.requests("/v1/completions") if "kv_transfer_params" not in q["body"]]
    assert len(whole) == 2 and all(b["max_tokens"] == 2 for b in whole)
    m = r.metrics()
    assert metric_sum(m, "disaggctl_router_aggregated_fallback_total", role="prefill") == 2
    assert metric_sum(m, "disaggctl_router_requests_total", path="prefill_only", reason="no_decode") == 2
    admin.undrain("decode-0")
    assert complete(r)[0] == 200 and len(d.requests()) == n + 1


def _load(r: RouterProc, stop: threading.Event, statuses: list[int], stream: bool) -> Callable[[], None]:
    def run() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            body = {"model": "tiny", "prompt": LONG + str(n), "max_tokens": 3, "stream": stream}
            status, _, data = http("POST", r.url + "/v1/completions", body)
            ok = status == 200 and (b'"error"' not in data)
            statuses.append(200 if ok else status or 599)

    return run


def _restart(standin: Standin, e: Engine, role: str) -> Engine:
    e.stop()
    return nixl(standin, e.name, role, port=e.port)


@pytest.mark.parametrize("first", ["decode", "prefill"])
def test_1p1d_rolls_either_role_with_zero_failed_requests(standin: Standin, first: str) -> None:
    """drain -> stop -> start -> undrain, one role then the other, under load: nothing fails."""
    p, d = nixl(standin, "prefill-0", "kv_producer"), nixl(standin, "decode-0", "kv_consumer")
    r, admin = router_with_admin(standin, [p], [d], health_interval_s=0.2)
    stop = threading.Event()
    statuses: list[int] = []
    workers = [threading.Thread(target=_load(r, stop, statuses, stream=i % 2 == 1)) for i in range(4)]
    for w in workers:
        w.start()
    engines = {"prefill": (p, "kv_producer"), "decode": (d, "kv_consumer")}
    order = [first, "prefill" if first == "decode" else "decode"]
    try:
        for role in order:
            e, kv_role = engines[role]
            admin.drain(e.name)
            admin.wait_state(e.name, "drained")
            _restart(standin, e, kv_role)
            admin.undrain(e.name)
            admin.wait_state(e.name, "active")
            time.sleep(0.3)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert len(statuses) >= 40 and statuses.count(200) == len(statuses), statuses
    m = r.metrics()
    assert metric_sum(m, "disaggctl_router_aggregated_fallback_total", role="prefill") >= 1
    assert metric_sum(m, "disaggctl_router_aggregated_fallback_total", role="decode") >= 1
    assert metric_sum(m, "disaggctl_router_error_in_200_total") == 0


def test_undrain_checks_a_restarted_instance_at_once_not_a_poll_interval_later(standin: Standin) -> None:
    """An instance that failed before it was drained and restarted is health-checked by undrain:
    it is active and takes requests from the undrain answer on (the poller runs once a minute here)."""
    p = nixl(standin, "prefill-0", "kv_producer")
    d0, d1 = nixl(standin, "decode-0", "kv_consumer"), nixl(standin, "decode-1", "kv_consumer")
    r, admin = router_with_admin(standin, [p], [d0, d1], health_interval_s=60)
    d1.stop()
    for i in range(6):  # least_loaded rotates ties: one of these tries decode-1, fails, retries on decode-0
        assert complete(r, LONG + str(i))[0] == 200
    assert admin.states()["decode-1"]["state"] == "down"
    admin.drain("decode-1")
    admin.wait_state("decode-1", "drained")
    d1 = nixl(standin, "decode-1", "kv_consumer", port=d1.port)
    status, body = admin.call("POST", "/admin/undrain", {"instance": "decode-1"})
    assert status == 200 and body["state"] == "active", body
    for i in range(6):
        assert complete(r, LONG + f"again {i}")[0] == 200
    assert d1.requests(), "the restarted decode takes requests before the next health poll"


def test_decode_killed_under_load_fails_no_whole_request(standin: Standin) -> None:
    """Not drained, just gone: calls that fail before any byte reached the client go to prefill."""
    p, d = nixl(standin, "prefill-0", "kv_producer"), nixl(standin, "decode-0", "kv_consumer")
    r = standin.router(kv_kind="nixl", prefill=[p], decode=[d], health_interval_s=0.2)
    stop = threading.Event()
    statuses: list[int] = []
    workers = [threading.Thread(target=_load(r, stop, statuses, stream=False)) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.3)
    d.stop()
    time.sleep(0.6)
    nixl(standin, "decode-0", "kv_consumer", port=d.port)
    time.sleep(0.6)
    stop.set()
    for w in workers:
        w.join(30)
    assert len(statuses) >= 20 and statuses.count(200) == len(statuses), statuses
    assert metric_sum(r.metrics(), "disaggctl_router_aggregated_fallback_total", role="prefill") >= 1


# ---------------------------------------------------------------------- 200 with an error inside


def test_errors_inside_200_answers_are_counted(standin: Standin) -> None:
    bad = standin.engine("decode-0", args=("--standin-error-in-200",))
    r = standin.router(kv_kind="nixl", prefill=[], decode=[bad])
    good = standin.engine("decode-1")
    r2 = standin.router(kv_kind="nixl", prefill=[], decode=[good])
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    for router in (r, r2):
        assert post_json(router.url + "/v1/completions", body)[0] == 200
        status, _, _ = http("POST", router.url + "/v1/completions", {**body, "stream": True})
        assert status == 200
    assert "error" in post_json(r.url + "/v1/completions", body)[1]
    assert r.metrics()["disaggctl_router_error_in_200_total"] == 3
    assert r2.metrics()["disaggctl_router_error_in_200_total"] == 0


def test_mid_stream_failure_counts_as_an_error_in_a_200(standin: Standin) -> None:
    d = standin.engine("decode-0", args=("--standin-die-mid-stream", "2"))
    r = standin.router(kv_kind="nixl", prefill=[], decode=[d])
    status, _, data = http(
        "POST", r.url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 5, "stream": True}
    )
    assert status == 200 and b"UpstreamStreamError" in data
    assert r.metrics()["disaggctl_router_error_in_200_total"] == 1


# ---------------------------------------------------------------------- what docs/router.md cites from vLLM


def test_vllm_names_cited_for_drain_exist_in_the_installed_vllm() -> None:
    """docs/router.md "Drain" names vLLM 0.32's NIXL lease and KV-transfer metrics: read them
    from the installed vLLM's own source (without importing it) so the text cannot go stale."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.fail("vLLM is not installed: make install puts the pinned version in .venv")
    root = Path(spec.origin).parent
    nixl_dir = root / "distributed" / "kv_transfer" / "kv_connector" / "v1" / "nixl"
    stats = (nixl_dir / "stats.py").read_text()
    for name in (
        "vllm:nixl_num_kv_expired_reqs",
        "vllm:nixl_num_failed_transfers",
        "vllm:nixl_num_failed_notifications",
    ):
        assert f'name="{name}"' in stats
    assert '"kv_lease_duration", 30' in (nixl_dir / "base_worker.py").read_text()
    # a request without kv_transfer_params (served whole on a prefill instance) holds no KV
    finished = (nixl_dir / "pull_scheduler.py").read_text().split("def request_finished", 1)[1][:1200]
    assert "if not params:\n            return False, None" in finished
    loggers = (root / "v1" / "metrics" / "loggers.py").read_text()
    assert 'name="vllm:num_requests_kv_fetch_by_stage"' in loggers
    # no gauge of KV held for remote decode on the prefill side (what the docs say is missing)
    assert "pending" not in " ".join(line for line in stats.splitlines() if 'name="vllm:' in line)
    docs = (Path(__file__).parents[1] / "docs" / "router.md").read_text()
    for name in ("vllm:nixl_num_kv_expired_reqs", "vllm:num_requests_kv_fetch_by_stage", "kv_lease_duration"):
        assert name in docs


def test_pool_out_counts_drained_and_recently_failed_not_a_lagging_poll() -> None:
    from disaggctl.router.config import Upstream
    from disaggctl.router.policies import Pool

    pool = Pool("decode", [Upstream("d0", "http://h:1"), Upstream("d1", "http://h:2")], "least_loaded")
    a, b = pool.instances
    assert not pool.out(2.0)
    a.draining = True
    assert not pool.out(2.0) and pool.pick() is b
    b.healthy = False  # a failed health poll alone: still tried
    assert not pool.out(2.0)
    b.failed_at = time.monotonic()  # a real call failed just now
    assert pool.out(2.0)
    b.failed_at -= 5  # long ago: half-open, tried again
    assert not pool.out(2.0)
    b.draining = True
    assert pool.out(2.0) and pool.pick() is None
    assert (a.state, b.state) == ("drained", "drained")
    a.kv_held = 1
    assert a.state == "draining"


def test_admin_port_in_use_is_one_line_exit_1(standin: Standin) -> None:
    import socket
    import subprocess
    import sys

    d = nixl(standin, "decode-0", "kv_consumer")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = {
            "bind": "127.0.0.1",
            "port": free_port(),
            "model": "tiny",
            "kv_kind": "nixl",
            "prefill": [],
            "decode": [d.upstream()],
            "admin": {"port": taken.getsockname()[1]},
        }
        path = standin.tmp / "router-admin-taken.json"
        path.write_text(json.dumps(cfg))
        r = subprocess.run(
            [sys.executable, "-m", "disaggctl.router", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 1
    assert "error: admin API cannot listen on 127.0.0.1:" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kv", ["shared-storage", "lmcache"])
def test_other_connectors_degrade_to_either_role(standin: Standin, kv: str) -> None:
    proxy = free_port() if kv == "lmcache" else None
    extra = {"shared_storage_path": str(standin.tmp / "kv-shared")} if kv == "shared-storage" else None
    d = standin.engine("decode-0", kv=kv, role="kv_consumer", extra=extra)
    p = standin.engine("prefill-0", kv=kv, role="kv_producer", extra=extra, proxy_port=proxy)
    lm = {"lmcache_proxy_bind": "127.0.0.1", "lmcache_proxy_port": proxy} if proxy else {}
    r, admin = router_with_admin(standin, [p], [d], kv_kind=kv, **lm)
    want = complete(r)[1]["choices"][0]["text"]
    for name in ("decode-0", "prefill-0"):
        admin.drain(name)
        admin.wait_state(name, "drained")
        status, out = complete(r)
        assert status == 200 and out["choices"][0]["text"] == want, out
        admin.undrain(name)
    m = r.metrics()
    assert metric_sum(m, "disaggctl_router_aggregated_fallback_total", role="prefill") == 1
    assert metric_sum(m, "disaggctl_router_aggregated_fallback_total", role="decode") == 1
    assert complete(r)[0] == 200
    assert metric_sum(r.metrics(), "disaggctl_router_requests_total", path="disaggregated") == 2
