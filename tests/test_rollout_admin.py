"""The admin-API client of the rollout (targets/rollout.AdminRotation) against a stdlib server that
follows the drain contract (GET /admin/instances, POST /admin/drain -> 202 then draining ->
drained, POST /admin/undrain -> 200; Bearer token). The builtin router's own implementation is
the router work's; this pins the client side of the contract."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from disaggctl.errors import DisaggError
from disaggctl.targets.rollout import AdminRotation

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
