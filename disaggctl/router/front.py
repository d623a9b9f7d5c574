"""The router's client-facing HTTP/1.1 server: a small asyncio protocol for the few routes the
router has (standard library only; uvloop when installed).

Why not aiohttp's server: on the request path it was about half of the router's own Python
time per request (request objects, multidicts, the URL dispatcher, payload streams). This
speaks what OpenAI clients send: keep-alive HTTP/1.1 (and 1.0), bodies framed by
Content-Length or chunked encoding, `Expect: 100-continue`, requests on one connection
answered in order. Answers are whole (`Response`) or chunked streams (`StreamResponse`, SSE);
a client that disconnects makes the next stream write raise ConnectionResetError. The
handler of a request runs to its end even if the client went away (as aiohttp's default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from disaggctl.router.bodies import JSON_CT, dumps

log = logging.getLogger("disaggctl.router.front")

MAX_HEAD = 64 * 1024  # request line + headers
MAX_BODY = 64 * 1024 * 1024
KEEPALIVE_S = 75.0  # idle keep-alive connections are closed after this (aiohttp's default)
REASONS = {s.value: s.phrase for s in HTTPStatus}


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class Request:
    """One parsed request; header names are lower case."""

    __slots__ = ("body", "conn", "headers", "keep_alive", "method", "path")

    def __init__(self, conn: HttpProtocol, method: str, path: str, headers: dict[str, str], keep_alive: bool) -> None:
        self.conn = conn
        self.method = method
        self.path = path
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = b""

    async def read(self) -> bytes:
        return self.body


def _head(status: int, headers: dict[str, str], extra: str) -> bytes:
    lines = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
    return f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n{lines}{extra}\r\n".encode("latin-1")


class Response:
    """A whole answer (Content-Length framed)."""

    def __init__(
        self,
        *,
        status: int = 200,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
        text: str | None = None,
        charset: str | None = None,
    ) -> None:
        self.status = status
        self.body = text.encode(charset or "utf-8") if text is not None else body
        self.headers = dict(headers) if headers else {}
        if content_type is not None:
            self.headers["Content-Type"] = content_type + (f"; charset={charset}" if charset else "")

    def encode(self, keep_alive: bool) -> bytes:
        extra = f"Content-Length: {len(self.body)}\r\n" + ("" if keep_alive else "Connection: close\r\n")
        return _head(self.status, self.headers, extra) + self.body


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status=status, body=dumps(obj), headers={"Content-Type": JSON_CT, **(headers or {})})


class StreamResponse:
    """A chunked answer written part by part (SSE)."""

    def __init__(self, *, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.headers = dict(headers) if headers else {}
        self.conn: HttpProtocol | None = None
        self.finished = False

    async def prepare(self, request: Request) -> None:
        self.conn = request.conn
        self.conn.streaming = True
        self.conn.send(_head(self.status, self.headers, "Transfer-Encoding: chunked\r\n"))

    async def write(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None, "prepare() first"
        if conn.closed:
            raise ConnectionResetError("the client disconnected")
        if data:
            conn.send(b"%x\r\n%b\r\n" % (len(data), data))
            if conn.paused:
                await conn.drain()

    async def write_eof(self) -> None:
        if self.finished:
            return
        await self.write(b"")
        assert self.conn is not None
        self.conn.send(b"0\r\n\r\n")
        self.finished = True


Reply = Response | StreamResponse
Handler = Callable[[Request], Awaitable[Reply]]


class HttpProtocol(asyncio.Protocol):
    """One client connection: parse a request, run its handler, answer, parse the next one."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # a handler runs for this connection; later bytes wait in buf
        self.closed = False
        self.paused = False
        self._drain: asyncio.Future[None] | None = None
        self._head: Request | None = None  # parsed head whose body is still arriving
        self._continued = False
        self.streaming = False  # the current answer is a prepared stream (its head is out)
        self.idle_since = server.loop.time()
        self.eof = False  # the client sent FIN

    # ---- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports have the same methods
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.conns.discard(self)
        self._wake_drain()

    def eof_received(self) -> bool:
        """The client half-closed: answer what it sent, then close (True keeps writing open)."""
        self.eof = True
        if not self.busy and self._head is None and not self.buf:
            self.close()
        return True

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.idle_since = self.server.loop.time()
        self.buf += data
        if not self.busy:
            self._next()

    # ---- writing

    def send(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("the client disconnected")
        self._drain = asyncio.get_running_loop().create_future()
        await self._drain

    def _wake_drain(self) -> None:
        d, self._drain = self._drain, None
        if d is not None and not d.done():
            if self.closed:
                d.set_exception(ConnectionResetError("the client disconnected"))
            else:
                d.set_result(None)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    # ---- requests

    def _next(self) -> None:
        try:
            req = self._parse()
        except HttpError as e:
            self.send(json_response(_error(e.status, str(e)), e.status).encode(keep_alive=False))
            self.close()
            return
        if req is not None:
            self.busy = True
            task = self.server.loop.create_task(self._run(req))
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)

    def _parse(self) -> Request | None:
        req = self._head
        if req is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    raise HttpError(431, "request head too large")
                return None
            req = self._head = parse_head(self, bytes(self.buf[:end]))
            del self.buf[: end + 4]
            self._continued = False
        body = read_body(req.headers, self.buf)
        if body is None:
            if req.headers.get("expect", "").lower() == "100-continue" and not self._continued:
                self._continued = True
                self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        req.body = body
        self._head = None
        return req

    async def _run(self, req: Request) -> None:
        self.streaming = False
        try:
            reply = await self.server.dispatch(req)
        except Exception:
            log.exception("%s %s failed", req.method, req.path)
            if self.streaming:  # the head is out: nothing more can be said on this connection
                self.close()
                return
            reply = json_response(_error(500, "internal router error"), 500)
        if isinstance(reply, StreamResponse):
            if reply.conn is None or not reply.finished:  # never prepared, or cut short: the connection is spent
                self.close()
                return
        else:
            self.send(reply.encode(req.keep_alive))
        if not req.keep_alive or self.server.closing or (self.eof and not self.buf):
            self.close()
            return
        self.busy = False
        self.idle_since = self.server.loop.time()
        if self.buf:
            self._next()


def parse_head(conn: HttpProtocol, raw: bytes) -> Request:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "bad request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if not sep:
            raise HttpError(400, "bad header line")
        headers[k.strip().lower()] = v.strip()
    conn_hdr = headers.get("connection", "").lower()
    keep = conn_hdr != "close" if version == "HTTP/1.1" else conn_hdr == "keep-alive"
    return Request(conn, method, target.split("?", 1)[0], headers, keep)


def read_body(headers: dict[str, str], buf: bytearray) -> bytes | None:
    """Take the body off `buf` when it is all there; None while it is still arriving."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return _dechunk(buf)
    try:
        n = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "bad Content-Length") from None
    if n < 0 or n > MAX_BODY:
        raise HttpError(413, f"request body over {MAX_BODY} bytes")
    if len(buf) < n:
        return None
    body = bytes(buf[:n])
    del buf[:n]
    return body


def _dechunk(buf: bytearray) -> bytes | None:
    parts: list[bytes] = []
    i = total = 0
    while True:
        nl = buf.find(b"\r\n", i)
        if nl < 0:
            return None
        try:
            size = int(bytes(buf[i:nl]).split(b";", 1)[0], 16)
        except ValueError:
            raise HttpError(400, "bad chunk size") from None
        if size == 0:
            end = buf.find(b"\r\n\r\n", nl)  # the last chunk: (trailers and) an empty line
            if end < 0:
                return None
            del buf[: end + 4]
            return b"".join(parts)
        if nl + 2 + size + 2 > len(buf):
            return None
        parts.append(bytes(buf[nl + 2 : nl + 2 + size]))
        i = nl + 2 + size + 2
        total += size
        if total > MAX_BODY:
            raise HttpError(413, f"request body over {MAX_BODY} bytes")


def _error(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": REASONS.get(status, "Error").replace(" ", ""), "code": status}}


class Server:
    """Routes (method, path) -> handler, the listening socket and a graceful stop."""

    def __init__(self, routes: dict[str, dict[str, Handler]]) -> None:
        self.routes = routes
        self.loop = asyncio.get_running_loop()
        self.conns: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def dispatch(self, req: Request) -> Reply:
        by_method = self.routes.get(req.path)
        if by_method is None:
            return json_response(_error(404, f"no route {req.path}"), 404)
        handler = by_method.get(req.method)
        if handler is None:
            return json_response(_error(405, f"{req.method} not allowed"), 405, {"Allow": ", ".join(by_method)})
        return await handler(req)

    async def listen(self, host: str, port: int) -> None:
        self._server = await self.loop.create_server(lambda: HttpProtocol(self), host, port, backlog=1024)
        self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close keep-alive connections idle for KEEPALIVE_S (one timer for all, not one per request)."""
        while True:
            await asyncio.sleep(KEEPALIVE_S / 5)
            cutoff = self.loop.time() - KEEPALIVE_S
            for c in [c for c in self.conns if not c.busy and c.idle_since < cutoff]:
                c.close()

    async def shutdown(self, timeout: float) -> None:
        """Stop listening, give open requests `timeout` seconds, then close every connection."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for c in list(self.conns):
            if not c.busy:
                c.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
        for c in list(self.conns):
            c.close()
        for t in list(self.tasks):
            t.cancel()


async def run(
    routes: dict[str, dict[str, Handler]],
    host: str,
    port: int,
    startup: Callable[[], Awaitable[None]],
    cleanup: Callable[[], Awaitable[None]],
    shutdown_timeout: float = 10.0,
) -> None:
    """Start, listen, serve until SIGTERM/SIGINT, then stop gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = Server(routes)
    try:
        await startup()
        await server.listen(host, port)
        await stop.wait()
        await server.shutdown(shutdown_timeout)
    finally:
        with contextlib.suppress(Exception):
            await cleanup()
