"""A lean HTTP/1.1 client for the router's upstream calls (keep-alive pool per instance).

Why not aiohttp's client: on this path it cost about half of the router's CPU per request
(cookie jar, tracing, redirects, multidicts); the router needs none of that. This speaks just
what vLLM's uvicorn answers: a status line, headers, and a body framed by Content-Length,
chunked encoding (SSE streams) or connection close.

Keep-alive: idle connections are reused; vLLM closes idle ones after ~5 s, so a request whose
reused connection dies before any response byte is resent once on a fresh connection (the
server never saw it). Any other failure raises UpstreamError.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

PAUSE_AT = 1 << 20  # stop reading a socket when this many response bytes wait for the client
MAX_IDLE = 256  # idle connections kept per instance


class UpstreamError(OSError):
    """Connect error, timeout, or a connection lost before the response was complete."""


class UpstreamRefused(UpstreamError):
    """The connection itself failed (refused, unreachable): nothing listens there now."""


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class Response:
    """One response, filled by its connection; the body is read whole or chunk by chunk."""

    def __init__(self, conn: Connection, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.timeout = timeout  # the longest wait for the next bytes of the body
        self.loop = loop
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head: asyncio.Future[None] = loop.create_future()
        self.parts: deque[bytes] = deque()
        self.buffered = 0
        self.done = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.got_bytes = False
        # framing state
        self._buf = bytearray()
        self._mode = ""  # "length" | "chunked" | "close"
        self._left = 0  # bytes left of the body (length) or of the current chunk (chunked)
        self._chunk_state = "size"  # chunked: size | data | crlf | trailer

    # ---- fed by the protocol

    def feed(self, data: bytes) -> None:
        self.got_bytes = True
        if not self.head.done():
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(bytes(self._buf[:end]))
            rest = bytes(self._buf[end + 4 :])
            self._buf = bytearray()
            self.head.set_result(None)
            if rest:
                self._body(rest)
            elif self._mode == "length" and self._left == 0:
                self._finish()
            return
        self._body(data)

    def feed_eof(self, exc: BaseException | None) -> None:
        if self.done:
            return
        if self._mode == "close" and exc is None and self.head.done():
            self._finish()
            return
        err = UpstreamError(f"connection lost before the response was complete{f': {exc}' if exc else ''}")
        self.error = err
        if not self.head.done():
            self.head.set_exception(err)
        self._wake()

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        self.status = int(parts[1])
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            self._mode = "chunked"
        elif "content-length" in self.headers:
            self._mode = "length"
            self._left = int(self.headers["content-length"])
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self._mode, self._left = "length", 0
        else:
            self._mode = "close"

    def _body(self, data: bytes) -> None:
        if self._mode == "length":
            take = data[: self._left]
            self._left -= len(take)
            self._push(take)
            if self._left == 0:
                self._finish()
        elif self._mode == "close":
            self._push(data)
        else:
            self._buf += data
            self._dechunk()

    def _dechunk(self) -> None:
        buf = self._buf
        while True:
            if self._chunk_state == "size":
                nl = buf.find(b"\r\n")
                if nl < 0:
                    return
                size = int(bytes(buf[:nl]).split(b";", 1)[0], 16)
                del buf[: nl + 2]
                self._left = size
                self._chunk_state = "data" if size else "trailer"
            elif self._chunk_state == "data":
                if not buf:
                    return
                take = bytes(buf[: self._left])
                del buf[: len(take)]
                self._left -= len(take)
                self._push(take)
                if self._left == 0:
                    self._chunk_state = "crlf"
            elif self._chunk_state == "crlf":
                if len(buf) < 2:
                    return
                del buf[:2]
                self._chunk_state = "size"
            else:  # trailer: lines until an empty one
                nl = buf.find(b"\r\n")
                if nl < 0:
                    return
                line_empty = nl == 0
                del buf[: nl + 2]
                if line_empty:
                    self._finish()
                    return

    def _push(self, data: bytes) -> None:
        if data:
            self.parts.append(data)
            self.buffered += len(data)
            if self.buffered > PAUSE_AT:
                self.conn.pause()
            self._wake()

    def _finish(self) -> None:
        self.done = True
        self._wake()
        self.conn.response_done(self)

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ---- read by the router

    async def _more(self) -> None:
        # a plain timer, not asyncio.timeout(): this runs per body part of every stream
        waiter = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(self.timeout, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            self.conn.close()
            raise UpstreamError(f"no response bytes for {self.timeout} s") from None
        finally:
            timer.cancel()
            self.waiter = None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        while True:
            while self.parts:
                data = self.parts.popleft()
                self.buffered -= len(data)
                if self.buffered < PAUSE_AT // 2:
                    self.conn.resume()
                yield data
            if self.done:
                return
            if self.error is not None:
                raise self.error
            await self._more()

    async def iter_lines(self) -> AsyncIterator[bytes]:
        pending = b""
        async for chunk in self.iter_chunks():
            pending += chunk
            while True:
                nl = pending.find(b"\n")
                if nl < 0:
                    break
                yield pending[: nl + 1]
                pending = pending[nl + 1 :]
        if pending:
            yield pending

    async def read(self) -> bytes:
        if self.done and len(self.parts) <= 1:
            data = self.parts.popleft() if self.parts else b""
            self.buffered = 0
            return data
        return b"".join([c async for c in self.iter_chunks()])

    def release(self) -> None:
        """Done with the response: an unfinished body means the connection cannot be reused."""
        if not self.done:
            self.conn.close()


class Connection(asyncio.Protocol):
    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self.closed = False
        self.reusable = True
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they have the same methods
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.resp is None:  # bytes nobody asked for: the connection is out of step
            self.close()
            return
        self.resp.feed(data)

    def eof_received(self) -> bool | None:
        self.reusable = False
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.resp is not None:
            self.resp.feed_eof(exc)

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def response_done(self, resp: Response) -> None:
        self.resp = None
        if resp.headers.get("connection", "").lower() == "close":
            self.reusable = False
        if self.reusable and not self.closed:
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HostPool:
    """Idle keep-alive connections to one host:port."""

    def __init__(self, host: str, port: int, connect_timeout: float) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.idle: deque[Connection] = deque()
        self.host_header = f"{host}:{port}"

    def put(self, conn: Connection) -> None:
        if len(self.idle) < MAX_IDLE:
            self.idle.append(conn)
        else:
            conn.close()

    async def get(self) -> tuple[Connection, bool]:
        while self.idle:
            conn = self.idle.pop()  # most recent first: least likely to have been closed by the server
            if not conn.closed:
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, proto = await loop.create_connection(lambda: Connection(self), self.host, self.port)
        except TimeoutError:
            raise UpstreamError(
                f"connect to {self.host}:{self.port} timed out after {self.connect_timeout} s"
            ) from None
        except OSError as e:
            raise UpstreamRefused(f"cannot connect to {self.host}:{self.port}: {e.strerror or e}") from None
        return proto, False

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


class Client:
    """Requests to upstream base URLs (http only), one HostPool per host:port."""

    def __init__(self, connect_timeout: float = 5.0, read_timeout: float = 600.0) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.pools: dict[str, tuple[HostPool, str]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def _pool(self, base: str) -> tuple[HostPool, str]:
        got = self.pools.get(base)
        if got is None:
            u = urlsplit(base)
            if u.scheme != "http" or not u.hostname:
                raise UpstreamError(f"unsupported upstream URL {base!r} (http://host:port expected)")
            got = (HostPool(u.hostname, u.port or 80, self.connect_timeout), u.path.rstrip("/"))
            self.pools[base] = got
        return got

    async def request(
        self,
        method: str,
        base: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send a request; returns once the status line and headers arrived. Call
        `read()`/`iter_chunks()` for the body and `release()` when done."""
        pool, prefix = self._pool(base)
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        lines = "".join([f"{k}: {v}\r\n" for k, v in headers.items()]) if headers else ""
        if body or method == "POST":
            lines += f"Content-Length: {len(body)}\r\n"
        data = f"{method} {prefix}{path} HTTP/1.1\r\nHost: {pool.host_header}\r\n{lines}\r\n".encode() + body
        limit = timeout or self.read_timeout
        for attempt in (0, 1):
            conn, reused = await pool.get()
            resp = Response(conn, limit, loop)
            conn.resp = resp
            assert conn.transport is not None
            conn.transport.write(data)
            # a plain timer, not asyncio.timeout(): cheaper, and this runs for every upstream call
            timer = loop.call_later(limit, _expire, resp.head)
            try:
                await resp.head
            except TimeoutError:
                conn.close()
                raise UpstreamError(f"no answer from {pool.host}:{pool.port} within {limit} s") from None
            except UpstreamError:
                conn.close()
                if reused and not resp.got_bytes and attempt == 0:
                    continue  # the server had closed this idle connection: resend on a new one
                raise
            except BaseException:  # cancelled (the client went away): this connection is mid-request
                conn.close()
                raise
            finally:
                timer.cancel()
            return resp
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for pool, _ in self.pools.values():
            pool.close()
