"""HTTP through an SSH connection: http.client over a `direct-tcpip` channel.

The SSH server opens the TCP connection to host:port, so a request reaches whatever the
host (or, through a jump host, the bastion) can reach: no assumption that the operator's
machine can reach host ports. One channel per request (`Connection: close`), stdlib only:
`Connection.http()` in ssh.py (paramiko's owner) opens the channel and hands it here.
"""

from __future__ import annotations

import http.client
import io
import time
import urllib.parse
from collections.abc import Mapping
from typing import Protocol

from disaggctl.ssh import HttpError, HttpResponse

MAX_BODY = 64 * 1024 * 1024  # a health or canary answer is small; refuse to buffer more


class Channel(Protocol):
    """What is used of a paramiko Channel."""

    def recv(self, nbytes: int) -> bytes: ...
    def sendall(self, s: bytes) -> None: ...
    def settimeout(self, timeout: float | None) -> None: ...
    def close(self) -> None: ...


class _ChannelReader(io.RawIOBase):
    """The channel's stdout as a raw stream (http.client wraps it in a BufferedReader)."""

    def __init__(self, chan: Channel) -> None:
        self._chan = chan

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._chan.recv(len(b))
        n = len(data)
        b[:n] = data
        return n


class _ChannelSocket:
    """The few socket methods http.client uses, on a channel."""

    def __init__(self, chan: Channel) -> None:
        self._chan = chan

    def sendall(self, data: bytes) -> None:
        self._chan.sendall(data)

    def makefile(self, mode: str = "rb", *args: object, **kw: object) -> io.BufferedReader:
        return io.BufferedReader(_ChannelReader(self._chan))

    def settimeout(self, timeout: float | None) -> None:
        self._chan.settimeout(timeout)

    def close(self) -> None:
        # http.client closes its socket right after reading the headers of a `Connection: close`
        # answer and keeps reading the body from makefile()'s reader (a real socket stays open
        # while such a reader exists); the channel is closed by request() once the body is read
        pass


class _ChannelHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, chan: Channel, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._chan = chan

    def connect(self) -> None:
        self.sock = _ChannelSocket(self._chan)


def split_url(url: str) -> tuple[str, int, str]:
    """`http://host:port/path?q` -> (host, port, "/path?q"); only plain http."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"not an http://host[:port]/path URL: {url!r}")
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    return u.hostname, u.port or 80, path


def request(
    chan: Channel,
    name: str,
    method: str,
    host: str,
    port: int,
    path: str = "/",
    body: bytes | None = None,
    timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
) -> HttpResponse:
    """One request on an open channel to host:port (of the SSH connection to host `name`); the
    timeout bounds each read. The channel is closed on return."""
    what = f"{method} http://{host}:{port}{path}"
    start = time.monotonic()
    chan.settimeout(timeout)
    conn = _ChannelHTTPConnection(host, port, chan, timeout)
    try:
        hdrs = {"Connection": "close", **(headers or {})}
        if body is not None and not any(k.lower() == "content-type" for k in hdrs):
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        chunks: list[bytes] = []
        size = 0
        while chunk := resp.read(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BODY:
                raise HttpError(name, f"{what}: answer larger than {MAX_BODY} bytes")
        if resp.length:  # http.client returns a short body without complaint when the peer hangs up
            raise HttpError(name, f"{what}: connection closed {resp.length} bytes before the end of the answer")
        return HttpResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, b"".join(chunks))
    except TimeoutError:
        took = time.monotonic() - start
        raise HttpError(name, f"{what}: timed out after {took:.1f} s (limit {timeout:g} s)") from None
    except (OSError, EOFError, http.client.HTTPException) as e:
        raise HttpError(name, f"{what}: {type(e).__name__}: {e}") from None
    finally:
        conn.close()
        chan.close()
