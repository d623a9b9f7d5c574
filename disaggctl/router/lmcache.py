"""LMCache P/D notifications: prefillers PUSH one `ProxyNotif` per decoder TP rank over ZMQ when
the KV of a request has been written into the decoder; the router waits for them before it
sends the request to the decoder (LMCache 0.5.6, `lmcache/v1/storage_backend/pd_backend.py`).

The message is msgspec msgpack of a tagged struct: `{"type": "ProxyNotif", "req_id": "..."}`.
A tiny msgpack reader covers it, so the router needs pyzmq but not msgspec.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from typing import Any

log = logging.getLogger("disaggctl.router.lmcache")


class MsgpackError(ValueError):
    pass


def unpack(data: bytes) -> Any:
    """Decode one msgpack value (maps, strings, ints, nil, bools, arrays: what ProxyNotif uses)."""
    value, end = _unpack(data, 0)
    if end != len(data):
        raise MsgpackError("trailing bytes")
    return value


def _unpack(b: bytes, i: int) -> tuple[Any, int]:
    if i >= len(b):
        raise MsgpackError("truncated")
    t = b[i]
    i += 1
    if t <= 0x7F:
        return t, i
    if 0x80 <= t <= 0x8F:
        return _map(b, i, t & 0x0F)
    if 0x90 <= t <= 0x9F:
        return _array(b, i, t & 0x0F)
    if 0xA0 <= t <= 0xBF:
        n = t & 0x1F
        return b[i : i + n].decode(), i + n
    if t >= 0xE0:
        return t - 0x100, i
    if t == 0xC0:
        return None, i
    if t in (0xC2, 0xC3):
        return t == 0xC3, i
    fixed = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
    if t in fixed:
        fmt = fixed[t]
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, b[i : i + size])[0], i + size
    lens = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}
    if t in lens:
        size = struct.calcsize(lens[t])
        (n,) = struct.unpack(lens[t], b[i : i + size])
        i += size
        return b[i : i + n].decode(), i + n
    if t in (0xDC, 0xDD):
        fmt = ">H" if t == 0xDC else ">I"
        size = struct.calcsize(fmt)
        return _array(b, i + size, struct.unpack(fmt, b[i : i + size])[0])
    if t in (0xDE, 0xDF):
        fmt = ">H" if t == 0xDE else ">I"
        size = struct.calcsize(fmt)
        return _map(b, i + size, struct.unpack(fmt, b[i : i + size])[0])
    raise MsgpackError(f"unsupported msgpack type 0x{t:02x}")


def _map(b: bytes, i: int, n: int) -> tuple[dict[Any, Any], int]:
    out = {}
    for _ in range(n):
        k, i = _unpack(b, i)
        v, i = _unpack(b, i)
        out[k] = v
    return out, i


def _array(b: bytes, i: int, n: int) -> tuple[list[Any], int]:
    out = []
    for _ in range(n):
        v, i = _unpack(b, i)
        out.append(v)
    return out, i


def zmq_bind_endpoint(host: str, port: int) -> tuple[str, bool]:
    """ZMQ binds an IP address (or an interface), not a DNS name: a host name is resolved here.
    Returns the endpoint and whether it is IPv6 (the socket needs ZMQ_IPV6 then)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = ipaddress.ip_address(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0])
    if ip.version == 6:
        return f"tcp://[{ip}]:{port}", True
    return f"tcp://{ip}:{port}", False


class Notifications:
    """Binds the ZMQ PULL socket and resolves waiters when enough notifications arrived."""

    def __init__(self, bind: str, port: int) -> None:
        self.bind = bind
        self.port = port
        self._counts: dict[str, int] = {}
        self._waiters: dict[str, tuple[int, asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._sock: Any = None
        self._ctx: Any = None
        self.received = 0

    async def start(self) -> None:
        try:
            import zmq
            import zmq.asyncio
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError("kv_kind lmcache needs pyzmq in the router's Python (pip install pyzmq)") from e
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        endpoint, v6 = zmq_bind_endpoint(self.bind, self.port)
        if v6:
            self._sock.setsockopt(zmq.IPV6, 1)
        self._sock.bind(endpoint)
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock is not None:
            self._sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()

    def expect(self, req_id: str, count: int) -> asyncio.Future[None]:
        """Register before sending prefill: notifications can arrive before its HTTP answer."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        have = self._counts.pop(req_id, 0)
        if have >= count:
            fut.set_result(None)
        else:
            self._counts[req_id] = have
            self._waiters[req_id] = (count, fut)
        return fut

    def forget(self, req_id: str) -> None:
        self._waiters.pop(req_id, None)
        self._counts.pop(req_id, None)

    def on_message(self, data: bytes) -> None:
        try:
            msg = unpack(data)
            req_id = str(msg["req_id"])
        except (MsgpackError, KeyError, TypeError, UnicodeDecodeError) as e:
            log.warning("ignoring malformed LMCache notification (%s): %r", e, data[:64])
            return
        self.received += 1
        waiter = self._waiters.get(req_id)
        if waiter is None:
            # early or unknown: keep a bounded count so a later expect() sees it
            if len(self._counts) > 100_000:
                self._counts.clear()
            self._counts[req_id] = self._counts.get(req_id, 0) + 1
            return
        n = self._counts.get(req_id, 0) + 1
        self._counts[req_id] = n
        if n >= waiter[0]:
            del self._waiters[req_id]
            self._counts.pop(req_id, None)
            if not waiter[1].done():
                waiter[1].set_result(None)

    async def _loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            self.on_message(frames[-1])
