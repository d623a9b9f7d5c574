"""The admin-API client of the rollout (targets/rollout.AdminRotation) against a stdlib server that
follows the drain contract (GET /admin/instances, POST /admin/drain -> 202 then draining ->
drained, POST /admin/undrain -> 200; Bearer token). The builtin router's own implementation is
the router work's; this pins the client side of the contract."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from disaggctl.errors import DisaggError
from disaggctl.health import HealthError
from disaggctl.ssh import SshError
from disaggctl.targets.rolling import RollInstance, RollPlan, plan_rollout
from disaggctl.targets.rollout import AdminRotation, RolloutRunner, urllib_request

TOKEN = "s3cret"


class Router:
    def __init__(self) -> None:
        self.state = {"prefill-0": "active", "decode-0": "active"}
        self.polls_until_drained = 2
        self.calls: list[tuple[str, str, object]] = []


@pytest.fixture
def router() -> Iterator[tuple[Router, str]]:
    r = Router()

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def _send(self, code: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(401, {"error": "unauthorized"})
                return False
            return True

        def do_GET(self) -> None:
            if not self._authorized():
                return
            for n, st in r.state.items():
                if st == "draining":
                    r.polls_until_drained -= 1
                    if r.polls_until_drained <= 0:
                        r.state[n] = "drained"
            items = [
                {"name": n, "role": n.split("-")[0], "url": "", "state": s, "in_flight": int(s == "draining")}
                for n, s in r.state.items()
            ]
            self._send(200, {"instances": items})

        def do_POST(self) -> None:
            if not self._authorized():
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            r.calls.append(("POST", self.path, body))
            name = body["instance"]
            if name not in r.state:
                self._send(404, {"error": f"no instance {name}"})
            elif self.path == "/admin/drain":
                r.state[name] = "draining"
                self._send(202, {"state": "draining"})
            else:
                r.state[name] = "active"
                self._send(200, {"state": "active"})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield r, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_drain_waits_for_drained_then_undrain(router: tuple[Router, str]) -> None:
    r, url = router
    sleeps: list[float] = []
    rot = AdminRotation(url, TOKEN, sleep=sleeps.append)
    rot.drain(["prefill-0"], timeout_s=30)
    assert r.state["prefill-0"] == "drained" and sleeps  # it polled until drained
    rot.undrain(["prefill-0"])
    assert r.state["prefill-0"] == "active"
    assert [c[1] for c in r.calls] == ["/admin/drain", "/admin/undrain"]


def test_drain_timeout_names_what_is_still_in_flight(router: tuple[Router, str]) -> None:
    r, url = router
    r.polls_until_drained = 10**9
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    rot = AdminRotation(url, TOKEN, sleep=sleep, clock=lambda: now[0])
    with pytest.raises(DisaggError, match=r"not drained after 5 s \(decode-0: 1 in flight\)"):
        rot.drain(["decode-0"], timeout_s=5)


def test_wrong_token_and_unknown_instance_are_clear_errors(router: tuple[Router, str]) -> None:
    _, url = router
    with pytest.raises(DisaggError, match="HTTP 401"):
        AdminRotation(url, "wrong").drain(["decode-0"], 5)
    with pytest.raises(DisaggError, match="HTTP 404"):
        AdminRotation(url, TOKEN).undrain(["decode-9"])


class FakeTransport:
    """A `request` with SshHttp.request's signature: records every call, answers from `answers`."""

    def __init__(self, answers: list[tuple[int, bytes] | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, str, bytes | None, float, dict[str, str]]] = []

    def __call__(
        self, method: str, url: str, body: bytes | None, timeout_s: float, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        self.calls.append((method, url, body, timeout_s, dict(headers)))
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a


def test_admin_calls_go_through_the_injected_transport() -> None:
    drained = json.dumps({"instances": [{"name": "decode-0", "state": "drained", "in_flight": 0}]}).encode()
    t = FakeTransport([(202, b'{"state": "draining"}'), (200, drained), (200, b'{"state": "active"}')])
    reads: list[int] = []
    rot = AdminRotation("http://127.0.0.1:9100/", "", read_token=lambda: reads.append(1) or TOKEN, request=t)
    rot.drain(["decode-0"], timeout_s=5)
    rot.undrain(["decode-0"])
    assert [(c[0], c[1]) for c in t.calls] == [
        ("POST", "http://127.0.0.1:9100/admin/drain"),
        ("GET", "http://127.0.0.1:9100/admin/instances"),
        ("POST", "http://127.0.0.1:9100/admin/undrain"),
    ]
    assert json.loads(t.calls[0][2] or b"") == {"instance": "decode-0"} and t.calls[1][2] is None
    assert all(c[4]["Authorization"] == f"Bearer {TOKEN}" for c in t.calls)
    assert reads == [1]  # the token is read once, on the first call


def test_transport_answers_and_failures_become_located_errors() -> None:
    t = FakeTransport([(401, b'{"error": "unauthorized"}')])
    with pytest.raises(DisaggError, match=r"router admin POST /admin/drain: HTTP 401 b'\{\"error\": \"unauthorized"):
        AdminRotation("http://127.0.0.1:9100", "wrong", request=t).drain(["decode-0"], 5)
    t = FakeTransport([OSError("s1: channel refused: 127.0.0.1:9100")])
    with pytest.raises(DisaggError, match=r"router admin POST /admin/undrain: s1: channel refused"):
        AdminRotation("http://127.0.0.1:9100", TOKEN, request=t).undrain(["decode-0"])
    t = FakeTransport([(200, b"not json")])
    with pytest.raises(DisaggError, match=r"router admin GET /admin/instances"):
        AdminRotation("http://127.0.0.1:9100", TOKEN, request=t).states()


def test_the_default_transport_is_urllib_from_this_machine(router: tuple[Router, str]) -> None:
    _, url = router
    status, body = urllib_request("GET", url + "/admin/instances", None, 5, {"Authorization": "Bearer x"})
    assert status == 401 and b"unauthorized" in body  # an error status is an answer, not an exception
    assert AdminRotation(url, TOKEN).request is urllib_request


class RecordingRotation:
    description = "recording"
    fallback = False

    def __init__(self, fail_drain: str | None = None) -> None:
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.fail_drain = fail_drain

    def drain(self, names: Sequence[str], timeout_s: float) -> None:
        self.calls.append(("drain", tuple(names)))
        if self.fail_drain in names:
            raise DisaggError(f"not drained after {timeout_s:g} s ({self.fail_drain}: 1 in flight)")

    def undrain(self, names: Sequence[str]) -> None:
        self.calls.append(("undrain", tuple(names)))


def _two_decodes() -> RollPlan:
    return plan_rollout([RollInstance("prefill-0", "prefill", False, "a", "a"),
                        RollInstance("decode-0", "decode", True, "a", "a"),
                        RollInstance("decode-1", "decode", True, "a", "a")])  # fmt: skip


class _NoGate:
    desired = type("Desired", (), {"kv_kind": "none"})()  # a kind without a pair canary

    def wait(self, names: list[str], alive: object = None) -> None:
        return None

    def pair_canary(self, p: str, d: str) -> object:
        raise HealthError(d, "no canary in this test")


def test_a_failed_restart_puts_what_was_drained_back_in_rotation() -> None:
    rot = RecordingRotation()
    said: list[str] = []

    def restart(names: list[str]) -> None:
        if names == ["decode-1"]:
            raise SshError("s2", "connection is closed")

    runner = RolloutRunner(_two_decodes(), _NoGate(), rot, restart, said.append)  # type: ignore[arg-type]
    with pytest.raises(SshError):
        runner.run()
    assert rot.calls == [("drain", ("decode-0",)), ("undrain", ("decode-0",)),
                         ("drain", ("decode-1",)), ("undrain", ("decode-1",))]  # fmt: skip
    assert runner.current is not None and runner.current.instances == ("decode-1",)
    assert "put decode-1 back in rotation" in said[-1] and runner.drained == []


def test_a_drain_that_times_out_is_undone() -> None:
    rot = RecordingRotation(fail_drain="decode-0")
    runner = RolloutRunner(_two_decodes(), _NoGate(), rot, lambda n: None, lambda m: None)  # type: ignore[arg-type]
    with pytest.raises(DisaggError, match="not drained"):
        runner.run()
    assert rot.calls == [("drain", ("decode-0",)), ("undrain", ("decode-0",))]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once closed: connection refused


def test_a_router_without_the_admin_api_is_told_apart_from_admin_errors(router: tuple[Router, str]) -> None:
    from disaggctl.targets.rollout import AdminMissing

    with pytest.raises(AdminMissing, match=r"router admin POST /admin/drain: .*[Rr]efused"):
        AdminRotation(f"http://127.0.0.1:{_closed_port()}", TOKEN).drain(["decode-0"], 5)
    # a router that answers but does not know the route (its client port, or a proxy)
    t = FakeTransport([(404, b'{"error": {"message": "no route /admin/drain"}}')])
    with pytest.raises(AdminMissing, match="HTTP 404"):
        AdminRotation("http://127.0.0.1:9100", TOKEN, request=t).drain(["decode-0"], 5)
    # the admin API's own answers stay located errors: an unknown instance, a wrong token
    _, url = router
    with pytest.raises(DisaggError, match="no instance decode-9") as e:
        AdminRotation(url, TOKEN).drain(["decode-9"], 5)
    assert not isinstance(e.value, AdminMissing)
    with pytest.raises(DisaggError, match="HTTP 401") as e:
        AdminRotation(url, "wrong").drain(["decode-0"], 5)
    assert not isinstance(e.value, AdminMissing)


def test_a_router_from_before_the_admin_api_rolls_without_drain_with_a_warning() -> None:
    rot = AdminRotation(f"http://127.0.0.1:{_closed_port()}", TOKEN, fallback=True)
    said: list[str] = []
    restarted: list[list[str]] = []
    runner = RolloutRunner(_two_decodes(), _NoGate(), rot, restarted.append, said.append)  # type: ignore[arg-type]
    runner.run()
    assert restarted == [["decode-0"], ["decode-1"]] and runner.drained == []
    warnings = [m for m in said if "warning:" in m]
    assert len(warnings) == 1, said
    assert "no admin API" in warnings[0] and "restarting without drain from decode-0 on" in warnings[0]
    assert "Connection refused" in warnings[0]
    assert runner.rotation.fallback and not isinstance(runner.rotation, AdminRotation)
    assert [m.split(":")[0] for m in said if m.startswith("step ")] == [f"step {n}/6" for n in range(1, 7)]


def test_plan_time_probe_tells_a_router_without_the_admin_api(router: tuple[Router, str]) -> None:
    _, url = router
    assert AdminRotation(url, "").missing() is None  # 401 without the token: the admin API is there
    closed = AdminRotation(f"http://127.0.0.1:{_closed_port()}", "")
    assert "refused" in (closed.missing() or "").lower()
    assert AdminRotation("http://h:1", "", request=FakeTransport([(404, b"no route")])).missing() == (
        "GET http://h:1/admin/instances: HTTP 404"
    )
    # a transport failure that is not a refusal (a lost SSH link, a timeout) is left to the calls
    assert AdminRotation("http://h:1", "", request=FakeTransport([OSError("s1: timed out")])).missing() is None


def test_rotation_for_a_running_router_without_the_admin_api_is_no_rotation_said_so() -> None:
    from disaggctl.targets.rollout import FALLBACK_METRIC, NoRotation, rotation_for
    from tests.test_systemd_render import _state

    desired, spec = _state()
    metrics = (200, f'{FALLBACK_METRIC}{{role="decode"}} 0\n'.encode())
    refused = OSError("s1: GET http://127.0.0.1:8001/admin/instances: cannot connect (Connection refused)")
    rot = rotation_for(spec, desired, request=FakeTransport([metrics, refused]))  # type: ignore[arg-type]
    assert isinstance(rot, NoRotation) and rot.fallback
    assert rot.description.startswith("no router admin API answers (GET http://127.0.0.1:")
    assert "Connection refused" in rot.description and "instances are not drained" in rot.description
    rot = rotation_for(spec, desired, request=FakeTransport([metrics, (401, b"")]))  # type: ignore[arg-type]
    assert isinstance(rot, AdminRotation) and rot.fallback
