"""The router's lean upstream HTTP client against hand-made servers: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from disaggctl.router.upstream import Client, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await r.readexactly(length)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def test_chunked_body_split_at_every_byte_and_keep_alive_reuse() -> None:
    connections = 0
    body = b"data: one\n\ndata: two\n\n"
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:5], body[5:])) + b"0\r\n\r\n"
    wire = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + chunked

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                await read_request(r)
                for i in range(len(wire)):  # one byte per write: every parser state boundary
                    w.write(wire[i : i + 1])
                    await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()

    async def main() -> None:
        server, url = await serve(handler)
        c = Client()
        for _ in range(3):
            resp = await c.request("POST", url, "/v1/completions", b"{}", {"Content-Type": "application/json"})
            assert resp.status == 200 and resp.headers["content-type"] == "text/event-stream"
            lines = [ln async for ln in resp.iter_lines()]
            assert b"".join(lines) == body and lines[0] == b"data: one\n"
            resp.release()
        assert connections == 1  # one keep-alive connection served all three
        await c.close()
        server.close()

    run(main())


def test_content_length_and_close_delimited_bodies() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            req = await read_request(r)
            if b"/close" in req:
                w.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil-the-end")
                await w.drain()
                w.close()
                return
            w.write(b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhello")
            await w.drain()

    async def main() -> None:
        server, url = await serve(handler)
        c = Client()
        resp = await c.request("GET", url, "/len")
        assert (resp.status, await resp.read()) == (201, b"hello")
        resp = await c.request("GET", url, "/close")
        assert await resp.read() == b"until-the-end"
        await c.close()
        server.close()

    run(main())


def test_idle_connection_closed_by_server_is_resent_on_a_new_one() -> None:
    seen = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal seen
        await read_request(r)
        seen += 1
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()
        # like uvicorn's keep-alive timeout, but abrupt: the client still holds it as idle
        w.transport.abort()

    async def main() -> None:
        server, url = await serve(handler)
        c = Client()
        for _ in range(3):
            resp = await c.request("POST", url, "/x", b"{}")
            assert await resp.read() == b"ok"
        assert seen == 3
        await c.close()
        server.close()

    run(main())


def test_connection_lost_mid_body_raises() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        w.transport.abort()

    async def main() -> None:
        server, url = await serve(handler)
        c = Client()
        resp = await c.request("POST", url, "/x", b"{}")
        got = []
        with pytest.raises(UpstreamError, match="connection lost"):
            async for chunk in resp.iter_chunks():
                got.append(chunk)
        assert got == [b"hello"]
        server.close()

    run(main())


def test_connect_refused_and_timeouts_are_upstream_errors() -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await asyncio.sleep(5)

    async def main() -> None:
        server, url = await serve(silent)
        port = int(url.rsplit(":", 1)[1])
        server.close()
        await server.wait_closed()
        c = Client(connect_timeout=1)
        with pytest.raises(UpstreamError, match="cannot connect"):
            await c.request("GET", url, "/health")
        server, url = await serve(silent)
        with pytest.raises(UpstreamError, match="no answer"):
            await c.request("POST", url, "/x", b"{}", timeout=0.3)
        with pytest.raises(UpstreamError, match="unsupported upstream URL"):
            await c.request("GET", "https://example.invalid", "/x")
        server.close()
        assert port

    run(main())


def test_slow_reader_pauses_the_socket_without_losing_bytes() -> None:
    big = b"x" * (3 << 20)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(big))
        for i in range(0, len(big), 65536):
            w.write(big[i : i + 65536])
            await w.drain()

    async def main() -> None:
        server, url = await serve(handler)
        c = Client()
        resp = await c.request("GET", url, "/big")
        total = 0
        async for chunk in resp.iter_chunks():
            total += len(chunk)
            await asyncio.sleep(0)  # a consumer slower than loopback
        assert total == len(big)
        server.close()

    run(main())
