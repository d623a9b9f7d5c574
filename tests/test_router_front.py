"""The router's own HTTP/1.1 server (front.py), on the wire: framing, keep-alive, pipelining,
100-continue, chunked request bodies, errors, and a graceful stop on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest

from disaggctl.router.front import HttpError, read_body
from tests.plugins.standin import Standin, StandinPD, http, metric_sum

LONG = "one two three four five six seven eight nine ten " * 4


def body_bytes(prompt: str = LONG, **kw: object) -> bytes:
    return json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 3, **kw}).encode()


def recv_response(s: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """Read one Content-Length framed answer off the socket (more may stay in buf)."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, "connection closed before the answer"
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers["content-length"])
    while len(buf) < end + 4 + n:
        chunk = s.recv(65536)
        assert chunk
        buf += chunk
    data = bytes(buf[end + 4 : end + 4 + n])
    del buf[: end + 4 + n]
    return int(lines[0].split(" ")[1]), headers, data


def post_head(length: int | None, extra: str = "") -> bytes:
    framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n{framing}{extra}\r\n".encode()
    )


@pytest.fixture(scope="module")
def pd(standin_module: Standin) -> StandinPD:
    return StandinPD(*standin_module.pair("nixl"))


def test_pipelined_requests_on_one_connection_are_answered_in_order(pd: StandinPD) -> None:
    prompts = [LONG + str(i) for i in range(3)]
    wire = b"".join(post_head(len(body_bytes(p))) + body_bytes(p) for p in prompts)
    with socket.create_connection(("127.0.0.1", pd.router.port)) as s:
        for cut in range(0, len(wire), 7):  # split at odd places
            s.sendall(wire[cut : cut + 7])
        buf = bytearray()
        answers = [recv_response(s, buf) for _ in prompts]
    direct = [
        json.loads(http("POST", pd.decode.url + "/v1/completions", json.loads(body_bytes(p)))[2]) for p in prompts
    ]
    for (status, headers, data), d in zip(answers, direct, strict=True):
        assert status == 200 and headers["x-request-id"]
        assert json.loads(data)["choices"][0]["text"] == d["choices"][0]["text"]


def test_chunked_request_body_and_expect_100_continue(pd: StandinPD) -> None:
    body = body_bytes()
    with socket.create_connection(("127.0.0.1", pd.router.port)) as s:
        s.sendall(post_head(len(body), "Expect: 100-continue\r\n"))
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        status, _, data = recv_response(s, bytearray())
        assert status == 200, data
        chunked = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (body[:10], body[10:])) + b"0\r\n\r\n"
        s.sendall(post_head(None) + chunked)
        status, _, data = recv_response(s, bytearray())
        assert status == 200 and json.loads(data)["choices"], data


def test_http10_and_connection_close_end_the_connection(pd: StandinPD) -> None:
    for head in (b"GET /health HTTP/1.0\r\n\r\n", b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", pd.router.port)) as s:
            s.sendall(head)
            status, _, _ = recv_response(s, buf := bytearray())
            assert status == 200
            s.settimeout(5)
            assert s.recv(10) == b"" and not buf  # closed by the router


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
        (b"POST /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"BROKEN\r\n\r\n", 400),
        (b"POST /v1/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n", 413),
        (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 5\r\n\r\n[1,2]", 400),
    ],
)
def test_errors_are_json(pd: StandinPD, wire: bytes, status: int) -> None:
    with socket.create_connection(("127.0.0.1", pd.router.port)) as s:
        s.sendall(wire)
        got, headers, data = recv_response(s, bytearray())
    assert got == status and headers["content-type"] == "application/json"
    assert json.loads(data)["error"]["code"] == status


def test_read_body_framing() -> None:
    buf = bytearray(b"hello world")
    assert read_body({"content-length": "5"}, buf) == b"hello" and buf == b" world"
    assert read_body({"content-length": "50"}, bytearray(b"abc")) is None
    buf = bytearray(b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\nNEXT")
    assert read_body({"transfer-encoding": "chunked"}, buf) == b"abcde" and buf == b"NEXT"
    assert read_body({"transfer-encoding": "chunked"}, bytearray(b"3\r\nabc\r\n0\r\n")) is None
    with pytest.raises(HttpError):
        read_body({"transfer-encoding": "chunked"}, bytearray(b"zz\r\n"))


def test_sigterm_lets_an_open_request_finish(standin: Standin) -> None:
    d = standin.engine("decode-0", args=("--standin-latency-ms", "700"))
    r = standin.router(kv_kind="nixl", prefill=[], decode=[d])
    out: dict[str, object] = {}

    def call() -> None:
        out["answer"] = http("POST", r.url + "/v1/completions", json.loads(body_bytes("x")))

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 10
    while metric_sum(r.metrics(), "disaggctl_router_upstream_in_flight") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    r.proc.send_signal(signal.SIGTERM)
    t.join(20)
    status = out["answer"][0]  # type: ignore[index]
    assert status == 200
    assert r.proc.wait(15) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", r.port), timeout=1).close()


def test_a_half_closed_client_still_gets_its_answer(pd: StandinPD) -> None:
    body = body_bytes()
    with socket.create_connection(("127.0.0.1", pd.router.port)) as s:
        s.sendall(post_head(len(body)) + body)
        s.shutdown(socket.SHUT_WR)
        status, _, data = recv_response(s, buf := bytearray())
        assert status == 200 and json.loads(data)["choices"]
        s.settimeout(5)
        assert s.recv(10) == b"" and not buf
