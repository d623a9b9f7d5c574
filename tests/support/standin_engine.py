#!/usr/bin/env python3
"""A stand-in for `vllm serve`: an OpenAI-compatible engine that answers instantly.

STANDARD LIBRARY ONLY: it runs with a plain /usr/bin/python3 on test hosts (nspawn containers,
Slurm jobs) where no venv exists. It is invoked like vLLM:

    standin_engine.py serve MODEL --port P [--host H] [--served-model-name N]
                      [--kv-transfer-config JSON] [any other vllm flag, ignored]

(`standin_engine.py install-wrapper DIR` writes DIR/vllm, a shell script that runs this file, so
code that starts `vllm serve ...` starts the stand-in instead.)

What it emulates, enough for routers and deployers to be tested without a GPU:
- /health, /v1/models, /v1/completions, /v1/chat/completions (streaming and not), /tokenize,
  /metrics with vLLM's metric names.
- Generation is deterministic from the prompt's token ids: each next token is a hash of all
  tokens before it, so a disaggregated answer (prefill 1 token, decode the rest, or LMCache's
  "prompt + first token") equals a direct one.
- The KV connector named by --kv-transfer-config, by role:
  * NixlConnector: a producer given `kv_transfer_params.do_remote_decode` answers with
    `{do_remote_prefill: true, remote_engine_id, remote_block_ids, remote_host, remote_port, ...}`;
    a consumer given `do_remote_prefill` counts the prompt as `external_kv_transfer`.
  * ExampleConnector (shared storage): the producer writes a file per prompt under
    `kv_connector_extra_config.shared_storage_path`; a consumer that finds it counts external.
  * LMCacheConnectorV1: a producer given `{ret_first_tok, disagg_spec}` "pushes" the KV to the
    receiver's `receiver_init_port[rank]` (a one-line TCP message to the stand-in decoder, which
    listens on its `pd_peer_init_port`s), returns `kv_transfer_params.first_tok`, and sends one
    LMCache `ProxyNotif` per rank to `pd_proxy_host:pd_proxy_port` over ZMQ PUSH (ZMTP 3.0 spoken
    by hand, msgpack `{"type": "ProxyNotif", "req_id": ...}` as LMCache 0.5.6's msgspec emits it).
- Knobs (flag or environment variable):
  --standin-latency-ms / STANDIN_LATENCY_MS              delay before each generation answer
  --standin-token-latency-ms / STANDIN_TOKEN_LATENCY_MS  delay between streamed tokens
  --standin-fail-after / STANDIN_FAIL_AFTER              answer N generation requests, then exit(3) on the next
  --standin-fail-status / STANDIN_FAIL_STATUS            answer generation requests with this status
  --standin-fail-health / STANDIN_FAIL_HEALTH=1          /health always 503
  --standin-health-delay-s / STANDIN_HEALTH_DELAY_S      /health 503 for this long after start
  --standin-die-mid-stream / STANDIN_DIE_MID_STREAM      abort the connection after N streamed tokens
                                                         (a JSON answer: after half its bytes)
  --standin-error-in-200 / STANDIN_ERROR_IN_200=1       answer generation with 200 and an error (JSON body or SSE event)
  --standin-record / STANDIN_RECORD                      append every request as a JSON line to FILE
  --standin-fail-first-pulls N / STANDIN_FAIL_FIRST_PULLS  fail only the first N pulls that way (vLLM's first pull
                                                         after a restart handshakes; a failed handshake fails it)
  STANDIN_PULL_HANG_S                                    a NIXL consumer given `do_remote_prefill` answers only after
                                                         this long (vLLM's pull from a prefill that died can hang)
  --standin-fail-kv-pull / STANDIN_FAIL_KV_PULL=1       a NIXL consumer given `do_remote_prefill` fails the pull as
                                                         vLLM 0.32 does when the prefill died (kv_load_failure_policy
                                                         "fail"): HTTP 500 "Internal server error" (streamed: a 200
                                                         with an error event); without kv_transfer_params it serves
- Introspection for tests: GET /standin/requests (requests seen), POST /standin/reset.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
import time
import uuid
import zlib
from typing import Any

VOCAB = 32000
CHARS_PER_TOKEN = 4
MAX_RECORDED = 2000


# ---------------------------------------------------------------- tokens and generation


def tokenize_text(text: str) -> list[int]:
    """One token per 4 characters (the router's default estimate is 4 chars/token too)."""
    return [zlib.crc32(text[i : i + CHARS_PER_TOKEN].encode()) % VOCAB for i in range(0, len(text), CHARS_PER_TOKEN)]


def chat_prompt(messages: list[dict[str, Any]]) -> str:
    """A fixed 'chat template': role: content lines, then the generation prompt."""
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{m.get('role', 'user')}: {content or ''}\n")
    return "".join(parts) + "assistant:"


def _seq_hash(ids: list[int]) -> int:
    return zlib.crc32(struct.pack(f"<{len(ids)}I", *ids)) if ids else 0


def generate(ids: list[int], n: int) -> list[int]:
    """Next token = hash of every token before it: the same continuation whatever the split."""
    h = _seq_hash(ids)
    out = []
    for _ in range(n):
        tok = h % VOCAB
        out.append(tok)
        h = zlib.crc32(struct.pack("<I", tok), h)
    return out


def detok(tok: int) -> str:
    return f" w{tok}"


def prompt_key(ids: list[int]) -> str:
    return f"{_seq_hash(ids):08x}-{len(ids)}"


# ---------------------------------------------------------------- minimal ZMTP 3.0 PUSH + msgpack


def msgpack_str(s: str) -> bytes:
    b = s.encode()
    if len(b) < 32:
        return bytes([0xA0 | len(b)]) + b
    if len(b) < 256:
        return bytes([0xD9, len(b)]) + b
    if len(b) < 65536:
        return bytes([0xDA]) + struct.pack(">H", len(b)) + b
    return bytes([0xDB]) + struct.pack(">I", len(b)) + b


def proxy_notif(req_id: str) -> bytes:
    """msgspec.msgpack.encode(ProxyNotif(req_id=...)) for LMCache's tagged struct."""
    return b"\x82" + msgpack_str("type") + msgpack_str("ProxyNotif") + msgpack_str("req_id") + msgpack_str(req_id)


def zmq_push(host: str, port: int, messages: list[bytes], timeout: float = 5.0) -> None:
    """Send single-frame messages to a ZMQ PULL socket (ZMTP 3.0, NULL mechanism)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
        s.sendall(greeting)
        got = b""
        while len(got) < 64:
            chunk = s.recv(64 - len(got))
            if not chunk:
                raise ConnectionError("ZMQ peer closed during greeting")
            got += chunk
        prop = b"\x0bSocket-Type" + struct.pack(">I", 4) + b"PUSH"
        ready = b"\x05READY" + prop
        s.sendall(bytes([0x04, len(ready)]) + ready)
        # read the peer's READY command (flags, size, body)
        head = _recv_exact(s, 2)
        size = head[1]
        if head[0] & 0x02:  # long command
            size = struct.unpack(">Q", head[1:2] + _recv_exact(s, 7))[0]
        _recv_exact(s, size)
        for m in messages:
            if len(m) < 256:
                s.sendall(bytes([0x00, len(m)]) + m)
            else:
                s.sendall(b"\x02" + struct.pack(">Q", len(m)) + m)
        # ZMQ has no ack: linger briefly so the frames leave before the close
        s.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            s.recv(1)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return buf


# ---------------------------------------------------------------- engine state


def _flag_env(value: Any, env: str, cast: Any, default: Any) -> Any:
    if value is not None:
        return value
    raw = os.environ.get(env)
    return cast(raw) if raw not in (None, "") else default


class Engine:
    def __init__(self, args: argparse.Namespace) -> None:
        self.model = args.model
        self.served = args.served_model_name or [args.model]
        self.host = args.host or "0.0.0.0"
        self.port = args.port
        self.started = time.monotonic()
        kv = json.loads(args.kv_transfer_config) if args.kv_transfer_config else {}
        self.kv_connector: str | None = kv.get("kv_connector")
        self.kv_role: str | None = kv.get("kv_role")
        self.extra: dict[str, Any] = kv.get("kv_connector_extra_config") or {}
        self.engine_id = kv.get("engine_id") or uuid.uuid4().hex
        self.prompt_details = bool(getattr(args, "enable_prompt_tokens_details", False))
        self.latency = _flag_env(args.standin_latency_ms, "STANDIN_LATENCY_MS", float, 0.0) / 1000
        self.token_latency = _flag_env(args.standin_token_latency_ms, "STANDIN_TOKEN_LATENCY_MS", float, 0.0) / 1000
        self.fail_after = _flag_env(args.standin_fail_after, "STANDIN_FAIL_AFTER", int, None)
        self.fail_status = _flag_env(args.standin_fail_status, "STANDIN_FAIL_STATUS", int, 0)
        self.fail_health = bool(args.standin_fail_health) or os.environ.get("STANDIN_FAIL_HEALTH", "") not in ("", "0")
        self.health_delay = _flag_env(args.standin_health_delay_s, "STANDIN_HEALTH_DELAY_S", float, 0.0)
        self.die_mid_stream = _flag_env(args.standin_die_mid_stream, "STANDIN_DIE_MID_STREAM", int, 0)
        self.error_in_200 = bool(args.standin_error_in_200) or os.environ.get("STANDIN_ERROR_IN_200", "") not in (
            "",
            "0",
        )
        self.record_path = _flag_env(args.standin_record, "STANDIN_RECORD", str, None)
        fail_pull = os.environ.get("STANDIN_FAIL_KV_PULL", "")
        self.fail_kv_pull = bool(args.standin_fail_kv_pull) or fail_pull not in ("", "0")
        self.fail_first_pulls = _flag_env(args.standin_fail_first_pulls, "STANDIN_FAIL_FIRST_PULLS", int, 0)
        self.pull_hang_s = float(os.environ.get("STANDIN_PULL_HANG_S") or 0)
        self.recorded: list[dict[str, Any]] = []
        self.generation_requests = 0
        self.running = 0
        self.tokens = {"local_compute": 0, "local_cache_hit": 0, "external_kv_transfer": 0}
        self.external_hits = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.nixl_pending: dict[str, str] = {}  # remote request id -> prompt key (producer side)
        self.lmcache_received: dict[str, int] = {}  # prompt key -> tokens "pushed" to this receiver
        self.lmcache = self._lmcache_config() if self.kv_connector == "LMCacheConnectorV1" else {}

    # -- connector helpers

    def _lmcache_config(self) -> dict[str, Any]:
        """LMCache config: LMCACHE_CONFIG_FILE (flat `key: value` YAML), LMCACHE_<KEY> env, extra config."""
        cfg: dict[str, Any] = {}
        path = os.environ.get("LMCACHE_CONFIG_FILE")
        if path and os.path.exists(path):
            with open(path) as f:
                cfg.update(parse_flat_yaml(f.read()))
        for k, v in os.environ.items():
            if k.startswith("LMCACHE_") and k != "LMCACHE_CONFIG_FILE":
                cfg[k[len("LMCACHE_") :].lower()] = _yaml_scalar(v)
        for k, v in self.extra.items():
            if k.startswith("lmcache."):
                cfg[k[len("lmcache.") :]] = v
        return cfg

    @property
    def producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    def shared_path(self, key: str) -> str | None:
        root = self.extra.get("shared_storage_path")
        return os.path.join(str(root), f"standin-{key}.kv") if root else None

    def record(self, method: str, path: str, headers: dict[str, str], body: Any) -> None:
        entry = {"t": time.time(), "method": method, "path": path, "headers": headers, "body": body}
        self.recorded.append(entry)
        if len(self.recorded) > MAX_RECORDED:
            del self.recorded[: MAX_RECORDED // 2]
        if self.record_path:
            with open(self.record_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def metrics(self) -> str:
        lbl = f'model_name="{self.served[0]}",engine="0"'
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{lbl}}} {self.running}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{lbl}}} 0",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{lbl}}} {float(self.prompt_tokens_total)}",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{lbl}}} {float(self.generation_tokens_total)}",
            "# TYPE vllm:prompt_tokens_by_source_total counter",
        ]
        for src, n in self.tokens.items():
            lines.append(f'vllm:prompt_tokens_by_source_total{{{lbl},source="{src}"}} {float(n)}')
        lines += [
            "# TYPE vllm:external_prefix_cache_hits_total counter",
            f"vllm:external_prefix_cache_hits_total{{{lbl}}} {float(self.external_hits)}",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{{lbl},finished_reason="length"}} {float(self.generation_requests)}',
        ]
        return "\n".join(lines) + "\n"


def parse_flat_yaml(text: str) -> dict[str, Any]:
    """The YAML `yaml.safe_dump` writes for a flat mapping: `key: scalar`, `key: [flow, list]`
    and block lists (`key:` then `- item` lines). Enough for LMCache configs, stdlib only."""
    cfg: dict[str, Any] = {}
    last: str | None = None
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if not line or line.lstrip().startswith("#"):
            continue
        stripped = line.lstrip()
        if stripped.startswith("- ") and last is not None:
            if not isinstance(cfg.get(last), list):
                cfg[last] = []
            cfg[last].append(_yaml_scalar(stripped[2:].strip()))
        elif ":" in line and not line.startswith(" "):
            k, v = line.split(":", 1)
            last = k.strip()
            cfg[last] = _yaml_scalar(v.strip()) if v.strip() else None
    return cfg


def _yaml_scalar(v: str) -> Any:
    if v.startswith("[") or v.startswith("{"):
        try:
            return json.loads(v)
        except ValueError:
            if v.startswith("[") and v.endswith("]"):  # a flow list of plain scalars: [UCX, 8300]
                inner = v[1:-1].strip()
                return [_yaml_scalar(x.strip()) for x in inner.split(",")] if inner else []
            return v
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return int(v)
    except ValueError:
        pass
    return v.strip("'\"")


# ---------------------------------------------------------------- HTTP (asyncio, keep-alive)


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}


class Conn:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.w = writer

    async def send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\ncontent-type: {ctype}\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        self.w.write(head.encode() + body)
        await self.w.drain()

    async def start_stream(self) -> None:
        self.w.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )

    async def chunk(self, data: bytes) -> None:
        self.w.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await self.w.drain()

    async def end_stream(self) -> None:
        self.w.write(b"0\r\n\r\n")
        await self.w.drain()


async def read_request(r: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await r.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await r.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await r.readexactly(size + 2)
            if size == 0:
                break
            body += data[:-2]
    return method, path.split("?", 1)[0], headers, body


class Server:
    def __init__(self, engine: Engine) -> None:
        self.e = engine

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(writer)
        try:
            while True:
                req = await read_request(reader)
                if req is None:
                    break
                method, path, headers, raw = req
                keep = await self.dispatch(conn, method, path, headers, raw)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def dispatch(self, conn: Conn, method: str, path: str, headers: dict[str, str], raw: bytes) -> bool:
        e = self.e
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            await conn.send(400, _err(400, "invalid JSON body"))
            return True
        if path.startswith("/v1/") or path == "/tokenize":
            e.record(method, path, headers, body)
        try:
            if path == "/health":
                ok = not e.fail_health and time.monotonic() - e.started >= e.health_delay
                await conn.send(200 if ok else 503, b"" if ok else _err(503, "stand-in health knob"))
            elif path == "/v1/models":
                data = [
                    {
                        "id": n,
                        "object": "model",
                        "created": 0,
                        "owned_by": "standin",
                        "root": e.model,
                        "max_model_len": 4096,
                    }
                    for n in e.served
                ]
                await conn.send(200, json.dumps({"object": "list", "data": data}).encode())
            elif path == "/metrics":
                await conn.send(200, e.metrics().encode(), "text/plain; version=0.0.4")
            elif path == "/tokenize" and method == "POST":
                if "messages" not in (body or {}) and not isinstance((body or {}).get("prompt"), str):
                    raise HttpError(400, "prompt: Input should be a valid string")  # as vLLM's pydantic model
                ids = self.prompt_ids(body or {}, chat="messages" in (body or {}))
                await conn.send(
                    200,
                    json.dumps({"count": len(ids), "max_model_len": 4096, "tokens": ids, "token_strs": None}).encode(),
                )
            elif path in ("/v1/completions", "/v1/chat/completions") and method == "POST":
                return await self.generate(conn, path.endswith("chat/completions"), headers, body or {})
            elif path == "/standin/requests":
                await conn.send(200, json.dumps(e.recorded).encode())
            elif path == "/standin/reset" and method == "POST":
                e.recorded.clear()
                await conn.send(200, b"{}")
            else:
                await conn.send(404, _err(404, f"no route {method} {path}"))
        except HttpError as err:
            await conn.send(err.status, _err(err.status, err.message))
        return True

    def prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list):
                raise HttpError(400, "messages must be a list")
            return tokenize_text(chat_prompt(msgs))
        p = body.get("prompt")
        if isinstance(p, str):
            return tokenize_text(p)
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            return list(p)
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            return tokenize_text(p[0])
        raise HttpError(400, "prompt must be a string or a list of token ids")

    async def generate(self, conn: Conn, chat: bool, headers: dict[str, str], body: dict[str, Any]) -> bool:
        e = self.e
        e.generation_requests += 1
        if e.fail_after is not None and e.generation_requests > e.fail_after:
            os._exit(3)  # emulate a crash: the connection drops with no answer
        if e.fail_status:
            await conn.send(e.fail_status, _err(e.fail_status, "stand-in failure knob"))
            return True
        pull = (body.get("kv_transfer_params") or {}).get("do_remote_prefill")
        if pull and e.consumer and e.pull_hang_s:
            await asyncio.sleep(e.pull_hang_s)
        first_pulls = bool(pull and e.consumer and e.fail_first_pulls > 0)
        if first_pulls:
            e.fail_first_pulls -= 1
        if e.error_in_200 or first_pulls or (e.fail_kv_pull and pull and e.consumer):
            # an error inside a 200 answer, or vLLM's failed KV pull (entrypoints/openai: GenerationError)
            err = _err(500, "Internal server error" if pull else "stand-in error-in-200 knob")
            if not e.error_in_200 and not body.get("stream"):
                await conn.send(500, err)
                return True
            if body.get("stream"):
                await conn.start_stream()
                if chat and pull:  # vLLM's chat stream sends the role chunk before the error event
                    role = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "model": body.get("model"),
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]}  # fmt: skip
                    await conn.chunk(b"data: " + json.dumps(role).encode() + b"\n\n")
                await conn.chunk(b"data: " + err + b"\n\ndata: [DONE]\n\n")
                await conn.end_stream()
            else:
                await conn.send(200, err)
            return True
        if body.get("model") not in e.served:
            raise HttpError(404, f"The model `{body.get('model')}` does not exist.")
        # vLLM: chat takes max_completion_tokens over max_tokens
        n = body.get("max_completion_tokens") if chat else None
        n = int(n if n is not None else body.get("max_tokens") or 16)
        if n < 1:
            raise HttpError(400, "max_tokens must be at least 1")
        ids = self.prompt_ids(body, chat)
        ktp = body.get("kv_transfer_params") or {}
        e.running += 1
        try:
            if e.latency:
                await asyncio.sleep(e.latency)
            out_params, ext = await self.kv_connector(ids, ktp)
            out = generate(ids, n)
            e.prompt_tokens_total += len(ids)
            e.generation_tokens_total += n
            rid = headers.get("x-request-id") or uuid.uuid4().hex
            if body.get("stream"):
                await self.stream(conn, chat, rid, body, ids, out)
                return not e.die_mid_stream
            text = "".join(detok(t) for t in out)
            usage: dict[str, Any] = {"prompt_tokens": len(ids), "total_tokens": len(ids) + n, "completion_tokens": n}
            if e.prompt_details:  # vLLM: the request's cached tokens; NIXL decode: prefill's own hits instead
                remote = ktp.get("remote_prefill_cached_tokens") if ktp.get("do_remote_prefill") else None
                usage["prompt_tokens_details"] = {"cached_tokens": remote if isinstance(remote, int) else ext}
            choice: dict[str, Any]
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
                resp = {"id": f"chatcmpl-{rid}", "object": "chat.completion"}
            else:
                choice = {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                    "prompt_logprobs": None,
                }
                resp = {"id": f"cmpl-{rid}", "object": "text_completion"}
            resp.update(
                created=int(time.time()),
                model=body["model"],
                choices=[choice],
                usage=usage,
                kv_transfer_params=out_params,
            )
            data = json.dumps(resp).encode()
            if e.die_mid_stream:  # emulate a crash while the JSON answer is on the wire
                conn.w.write(
                    f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n".encode()
                    + data[: len(data) // 2]
                )
                await conn.w.drain()
                conn.w.transport.abort()
                return False
            await conn.send(200, data)
            return True
        finally:
            e.running -= 1

    async def kv_connector(self, ids: list[int], ktp: dict[str, Any]) -> tuple[dict[str, Any] | None, int]:
        """Emulate the configured connector; return the response's kv_transfer_params and the
        prompt tokens loaded from elsewhere."""
        e = self.e
        key = prompt_key(ids)
        external = False
        out: dict[str, Any] | None = None
        if e.kv_connector == "NixlConnector":
            if e.consumer and ktp.get("do_remote_prefill") and ktp.get("remote_engine_id"):
                external = True
            if e.producer and ktp.get("do_remote_decode"):
                rid = uuid.uuid4().hex
                e.nixl_pending[rid] = key
                out = {
                    "do_remote_prefill": True,
                    "do_remote_decode": False,
                    "remote_block_ids": list(range(max(1, len(ids) // 16))),
                    "remote_engine_id": e.engine_id,
                    "remote_request_id": rid,
                    "remote_host": os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1"),
                    "remote_port": int(os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", "5600")),
                    "tp_size": 1,
                    "remote_prefill_cached_tokens": 0,
                }
        elif e.kv_connector == "ExampleConnector":
            path = e.shared_path(key)
            if path and e.consumer and os.path.exists(path):
                external = True
            elif path and e.producer:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(str(len(ids)))
        elif e.kv_connector == "LMCacheConnectorV1":
            # a decoder given "prompt + first token": the prompt's KV was pushed to us
            if len(ids) > 1 and prompt_key(ids[:-1]) in e.lmcache_received:
                external = True
            spec = ktp.get("disagg_spec")
            if spec:
                await asyncio.get_running_loop().run_in_executor(None, self.lmcache_push, ids, spec)
            if ktp.get("ret_first_tok"):
                out = {"first_tok": generate(ids, 1)[0]}
        if external:
            # vLLM recomputes the last prompt token locally
            e.tokens["external_kv_transfer"] += len(ids) - 1
            e.tokens["local_compute"] += 1
            e.external_hits += len(ids) - 1
        else:
            e.tokens["local_compute"] += len(ids)
        return out, (len(ids) - 1 if external else 0)

    def lmcache_push(self, ids: list[int], spec: dict[str, Any]) -> None:
        """Sender side: push to each receiver rank, then notify the proxy once per rank."""
        e = self.e
        ranks = list(spec.get("receiver_init_port") or [])
        msg = json.dumps({"key": prompt_key(ids), "n": len(ids)}).encode() + b"\n"
        for port in ranks:
            with socket.create_connection((spec["receiver_host"], int(port)), timeout=5) as s:
                s.sendall(msg)
                s.recv(16)  # ack
        host, port = e.lmcache.get("pd_proxy_host"), e.lmcache.get("pd_proxy_port")
        if host and port:
            try:
                zmq_push(str(host), int(port), [proxy_notif(str(spec["req_id"]))] * len(ranks))
            except OSError as err:  # like LMCache: the request finishes, the proxy never hears of it
                print(f"standin: LMCache proxy notification to {host}:{port} failed: {err}", file=sys.stderr)

    async def stream(
        self, conn: Conn, chat: bool, rid: str, body: dict[str, Any], ids: list[int], out: list[int]
    ) -> None:
        e = self.e
        created = int(time.time())
        base: dict[str, Any] = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": body["model"],
        }
        await conn.start_stream()
        if chat:
            first = dict(
                base,
                choices=[
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ],
            )
            await conn.chunk(b"data: " + json.dumps(first).encode() + b"\n\n")
        for i, tok in enumerate(out):
            if e.die_mid_stream and i == e.die_mid_stream:
                conn.w.transport.abort()  # emulate a crash mid-stream
                return
            if e.token_latency:
                await asyncio.sleep(e.token_latency)
            last = i == len(out) - 1
            fin = "length" if last else None
            if chat:
                ch = {"index": 0, "delta": {"content": detok(tok)}, "logprobs": None, "finish_reason": fin}
            else:
                ch = {"index": 0, "text": detok(tok), "logprobs": None, "finish_reason": fin, "stop_reason": None}
            await conn.chunk(b"data: " + json.dumps(dict(base, choices=[ch])).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": len(ids), "total_tokens": len(ids) + len(out), "completion_tokens": len(out)}
            await conn.chunk(b"data: " + json.dumps(dict(base, choices=[], usage=usage)).encode() + b"\n\n")
        await conn.chunk(b"data: [DONE]\n\n")
        await conn.end_stream()


def _err(status: int, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "StandinError", "code": status}}).encode()


async def lmcache_receiver(engine: Engine) -> list[asyncio.AbstractServer]:
    """Receiver side: listen on pd_peer_host:pd_peer_init_port[*]; remember pushed prompts."""
    cfg = engine.lmcache
    if cfg.get("pd_role") != "receiver":
        return []
    ports = cfg.get("pd_peer_init_port") or []
    if isinstance(ports, int):
        ports = [ports]

    async def on_push(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            msg = json.loads(line)
            engine.lmcache_received[msg["key"]] = int(msg["n"])
            writer.write(b"ok")
            await writer.drain()
        finally:
            writer.close()

    host = str(cfg.get("pd_peer_host") or "0.0.0.0")
    return [await asyncio.start_server(on_push, host, int(p)) for p in ports]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="standin_engine", description="stand-in for `vllm serve`")
    p.add_argument("serve", choices=["serve"])
    p.add_argument("model")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default=None)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--kv-transfer-config", default=None)
    p.add_argument("--standin-latency-ms", type=float, default=None)
    p.add_argument("--standin-token-latency-ms", type=float, default=None)
    p.add_argument("--standin-fail-after", type=int, default=None)
    p.add_argument("--standin-fail-status", type=int, default=None)
    p.add_argument("--standin-fail-health", action="store_true")
    p.add_argument("--standin-health-delay-s", type=float, default=None)
    p.add_argument("--standin-die-mid-stream", type=int, default=None)
    p.add_argument("--standin-error-in-200", action="store_true")
    p.add_argument("--standin-record", default=None)
    p.add_argument("--standin-fail-kv-pull", action="store_true")
    p.add_argument("--standin-fail-first-pulls", type=int, default=None)
    p.add_argument("--enable-prompt-tokens-details", action="store_true")
    args, _ignored = p.parse_known_args(argv)  # every other vLLM flag is accepted and ignored
    return args


WRAPPER = """#!/bin/sh
# stand-in for vLLM: `vllm serve MODEL ...` runs the stand-in engine (tests only)
exec "{python}" "{script}" "$@"
"""


def install_wrapper(folder: str, python: str = "/usr/bin/python3") -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "vllm")
    with open(path, "w") as f:
        f.write(WRAPPER.format(python=python, script=os.path.abspath(__file__)))
    os.chmod(path, 0o755)
    return path


async def amain(args: argparse.Namespace) -> None:
    engine = Engine(args)
    receivers = await lmcache_receiver(engine)
    server = await asyncio.start_server(
        Server(engine).handle, engine.host, engine.port, reuse_address=True, backlog=1024
    )
    print(
        f"standin engine {engine.served[0]} listening on {engine.host}:{engine.port} "
        f"connector={engine.kv_connector} role={engine.kv_role}",
        flush=True,
    )
    async with server:
        await server.serve_forever()
    for r in receivers:
        r.close()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "install-wrapper":
        print(install_wrapper(argv[1], argv[2] if len(argv) > 2 else sys.executable))
        return
    args = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(amain(args))


if __name__ == "__main__":
    main()
