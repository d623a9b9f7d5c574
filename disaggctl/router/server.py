"""The builtin P/D router: an aiohttp service in front of prefill and decode vLLM instances.

Per request: decide the path (disaggregated, or local prefill on a decode instance for short
prompts / a long prefill queue), run the connector's hand-off (NIXL, shared storage, LMCache),
and pass the decode answer through (SSE bytes are forwarded untouched). One ClientSession with
a keep-alive pool is shared by all requests; request bodies are parsed once and only the
prefill body is re-encoded (the decode body is the client's bytes, spliced for NIXL).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from disaggctl.router.config import RouterConfig
from disaggctl.router.lmcache import Notifications
from disaggctl.router.metrics import RouterMetrics
from disaggctl.router.policies import Instance, Pool
from disaggctl.router.upstream import Client, Response, UpstreamError

log = logging.getLogger("disaggctl.router")

DISAGG = "disaggregated"
LOCAL = "local_prefill"
JSON_CT = "application/json"
# chat-only request fields that /v1/completions rejects (LMCache prefill/decode go through it)
CHAT_ONLY = (
    "messages",
    "max_completion_tokens",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "logprobs",
    "top_logprobs",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "documents",
    "response_format",
    "reasoning_effort",
    "stream_options",
)
NIXL_PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class UpstreamUnavailable(Exception):
    """No instance of a role answered; the message names each one tried and why."""

    def __init__(self, role: str, attempts: list[tuple[Instance, str]]) -> None:
        self.role = role
        self.attempts = attempts
        if attempts:
            tried = "; ".join(f"{i.name} ({i.url}): {err}" for i, err in attempts)
            msg = f"no {role} instance answered: {tried}"
        else:
            msg = f"no {role} instance is configured"
        super().__init__(msg)

    @property
    def status(self) -> int:
        return 502 if self.attempts else 503


@dataclass
class Upcall:
    """An open upstream response; `close()` releases the connection and the in-flight slot."""

    inst: Instance
    resp: Response

    def close(self) -> None:
        self.resp.release()
        self.inst.in_flight -= 1


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}}


def error_response(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(error_body(status, message, kind), status=status)


def with_field(raw: bytes, key: str, value: Any) -> bytes:
    """Append `"key": value` to a JSON object's bytes without re-encoding the rest of it."""
    end = raw.rstrip()
    if not end.endswith(b"}"):
        raise ValueError("not a JSON object")
    head = end[:-1].rstrip()
    sep = b"" if head.endswith(b"{") else b","
    return head + sep + json.dumps(key).encode() + b":" + json.dumps(value, separators=(",", ":")).encode() + b"}"


def message_text(messages: Any) -> str:
    parts: list[str] = []
    if isinstance(messages, list):
        for m in messages:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p.get("text", "") for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)


class Router:
    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.prefill = Pool("prefill", cfg.prefill, cfg.prefill_policy)
        self.decode = Pool("decode", cfg.decode, cfg.decode_policy)
        for inst in (*self.prefill.instances, *self.decode.instances):
            inst.healthy = False  # until the first health poll answers
        self.metrics = RouterMetrics()
        self.client = Client(cfg.connect_timeout_s, cfg.request_timeout_s)
        self.notifications: Notifications | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._encode: Callable[[str], int] | None = self._load_tokenizer(cfg.tokenizer)
        self._warned_no_params = False

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def _load_tokenizer(path: str | None) -> Callable[[str], int] | None:
        if not path:
            return None
        try:
            from tokenizers import Tokenizer  # optional: exact counts for the local-prefill decision
        except ImportError as e:
            raise RuntimeError(f"router config tokenizer={path!r} needs the `tokenizers` package") from e
        tok = Tokenizer.from_file(path)
        return lambda text: len(tok.encode(text, add_special_tokens=False).ids)

    async def start(self, app: web.Application | None = None) -> None:
        if self.cfg.kv_kind == "lmcache":
            if self.cfg.lmcache_proxy_port is None:
                raise RuntimeError("kv_kind lmcache needs lmcache_proxy_port in the router config")
            self.notifications = Notifications(self.cfg.lmcache_proxy_bind or "0.0.0.0", self.cfg.lmcache_proxy_port)
            await self.notifications.start()
        await self.poll_health()
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self, app: web.Application | None = None) -> None:
        if self._health_task:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.notifications:
            await self.notifications.close()
        await self.client.close()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            try:
                await self.poll_health()
            except Exception:  # never let the poller die
                log.exception("health poll failed")

    async def poll_health(self) -> None:
        insts = [*self.prefill.instances, *self.decode.instances]
        await asyncio.gather(*(self._check(i) for i in insts))

    async def _check(self, inst: Instance) -> None:
        t = max(1.0, min(5.0, self.cfg.health_interval_s * 2))
        try:
            async with asyncio.timeout(t):
                r = await self.client.request("GET", inst.url, "/health", timeout=t)
                await r.read()
            ok = r.status == 200
            err = None if ok else f"/health answered HTTP {r.status}"
        except (TimeoutError, OSError) as e:
            ok, err = False, f"/health: {e}"
        if ok != inst.healthy:
            log.info(
                "%s %s is now %s%s", inst.role, inst.name, "healthy" if ok else "unhealthy", "" if ok else f" ({err})"
            )
        inst.healthy = ok
        if err:
            inst.last_error = err

    # ------------------------------------------------------------------ upstream calls

    def _fail(self, inst: Instance, err: str) -> None:
        inst.healthy = False  # the health poll brings it back
        inst.last_error = err
        inst.failed_at = time.monotonic()
        inst.failures += 1
        self.metrics.upstream_failure(inst.name, inst.role)
        log.warning("%s %s failed: %s", inst.role, inst.name, err)

    async def call(
        self, pool: Pool, path: str, data: bytes, headers: dict[str, str], only: Instance | None = None
    ) -> Upcall:
        """POST to one instance of the pool; on connect errors, timeouts and 5xx try another
        (config.retries more). 4xx answers are returned: they are the client's fault."""
        tried: list[Instance] = []
        attempts: list[tuple[Instance, str]] = []
        for attempt in range(self.cfg.retries + 1):
            inst = only if only is not None and attempt == 0 else (None if only else pool.pick(tried))
            if inst is None:
                break
            tried.append(inst)
            if attempt:
                self.metrics.retry(pool.role)
            inst.in_flight += 1
            try:
                resp = await self.client.request("POST", inst.url, path, data, headers)
            except UpstreamError as e:
                inst.in_flight -= 1
                err = str(e) or type(e).__name__
                self._fail(inst, err)
                attempts.append((inst, err))
                continue
            except BaseException:  # cancelled: the client went away
                inst.in_flight -= 1
                raise
            if resp.status >= 500:
                try:
                    text = (await resp.read())[:300].decode(errors="replace")
                except UpstreamError:
                    text = ""
                finally:
                    resp.release()
                    inst.in_flight -= 1
                err = f"HTTP {resp.status} {text}".strip()
                self._fail(inst, err)
                attempts.append((inst, err))
                continue
            return Upcall(inst, resp)
        raise UpstreamUnavailable(pool.role, attempts)

    # ------------------------------------------------------------------ decisions

    def count_tokens(self, body: dict[str, Any], chat: bool) -> int:
        if chat:
            text = message_text(body.get("messages"))
        else:
            p = body.get("prompt")
            if isinstance(p, list):
                if not p:
                    return 0
                if all(isinstance(x, int) for x in p):
                    return len(p)  # already token ids
                if isinstance(p[0], list):
                    return max(len(x) for x in p)
                text = max((x for x in p if isinstance(x, str)), key=len, default="")
            else:
                text = p if isinstance(p, str) else ""
        if self._encode is not None:
            return self._encode(text)
        return math.ceil(len(text) / self.cfg.chars_per_token)

    def decide(self, body: dict[str, Any], chat: bool) -> tuple[str, str]:
        cfg = self.cfg
        if not self.prefill.instances:
            return LOCAL, "no_prefill"
        if cfg.local_prefill_threshold > 0 and self.count_tokens(body, chat) < cfg.local_prefill_threshold:
            return LOCAL, "short_prompt"
        if not self.prefill.any_healthy():
            # every prefill failed a real call within the last poll interval: don't pay a failed call
            # per request (after that, one is tried again: a half-open circuit breaker). A failed
            # health poll alone does not count: the poll lags an instance that just came up, and
            # deploy canaries sent right after the instances turned healthy must reach prefill.
            now = time.monotonic()
            if all(now - i.failed_at < cfg.health_interval_s for i in self.prefill.instances):
                return LOCAL, "no_healthy_prefill"
        if cfg.max_prefill_queue is not None and self.prefill.min_in_flight() >= cfg.max_prefill_queue:
            return LOCAL, "prefill_queue"
        return DISAGG, "long_prompt"

    # ------------------------------------------------------------------ HTTP handlers

    async def handle_health(self, request: web.Request) -> web.Response:
        def detail(pool: Pool) -> list[dict[str, Any]]:
            return [
                {
                    "name": i.name,
                    "url": i.url,
                    "healthy": i.healthy,
                    "in_flight": i.in_flight,
                    "last_error": i.last_error,
                }
                for i in pool.instances
            ]

        ok = self.decode.any_healthy()
        body = {
            "status": "ok" if ok else "unavailable",
            "kv_kind": self.cfg.kv_kind,
            "prefill": detail(self.prefill),
            "decode": detail(self.decode),
        }
        if not ok:
            body["message"] = "no healthy decode instance"
        return web.json_response(body, status=200 if ok else 503)

    async def handle_models(self, request: web.Request) -> web.Response:
        inst = self.decode.pick()
        if inst is not None:
            try:
                r = await self.client.request("GET", inst.url, "/v1/models", timeout=10)
                raw = await r.read()
                if r.status == 200:
                    return web.Response(body=raw, content_type=JSON_CT)
            except OSError:
                pass
        data = [{"id": self.cfg.model, "object": "model", "created": 0, "owned_by": "disaggctl"}]
        return web.json_response({"object": "list", "data": data})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        m = self.metrics
        m.gauges["upstream_healthy"] = {}
        m.gauges["upstream_in_flight"] = {}
        for i in (*self.prefill.instances, *self.decode.instances):
            key = (("upstream", i.name), ("role", i.role))
            m.gauges["upstream_healthy"][key] = 1.0 if i.healthy else 0.0
            m.gauges["upstream_in_flight"][key] = float(i.in_flight)
        if self.notifications is not None:
            m.gauges["lmcache_notifications_received"] = {(): float(self.notifications.received)}
        return web.Response(text=m.render(), content_type="text/plain", charset="utf-8")

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, chat=False)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self.generate(request, chat=True)

    async def generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        t0 = time.perf_counter()
        endpoint = "chat" if chat else "completions"
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.metrics.error("bad_request", 400)
            return error_response(400, "request body must be a JSON object", "BadRequestError")
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        headers = {"Content-Type": JSON_CT, "X-Request-Id": rid}
        auth = request.headers.get("Authorization")
        if auth:
            headers["Authorization"] = auth
        ctx = Ctx(request, chat, endpoint, raw, body, rid, headers, t0)
        path, reason = self.decide(body, chat)
        try:
            if path == LOCAL:
                return await self.local(ctx, reason)
            if self.cfg.kv_kind == "lmcache":
                return await self.lmcache_flow(ctx)
            return await self.two_step(ctx)
        except UpstreamUnavailable as e:
            self.metrics.error(f"{e.role}_unavailable", e.status)
            return error_response(e.status, str(e), "UpstreamUnavailable")
        except TimeoutError:
            self.metrics.error("timeout", 504)
            return error_response(504, f"upstream timed out after {self.cfg.request_timeout_s} s", "UpstreamTimeout")

    # ------------------------------------------------------------------ paths

    async def local(self, ctx: Ctx, reason: str, only: Instance | None = None) -> web.StreamResponse:
        """Send the client's body unchanged to a decode instance (it prefills locally)."""
        self.metrics.request(ctx.endpoint, LOCAL, reason)
        up = await self.call(self.decode, ctx.path, ctx.raw, ctx.headers, only=only)
        return await self.relay(ctx, up, LOCAL)

    async def _prefill_call(self, ctx: Ctx, path: str, body: dict[str, Any]) -> tuple[Instance, int, bytes]:
        """POST `body` to a prefill instance and read the whole answer; (instance, status, bytes)."""
        up = await self.call(self.prefill, path, json.dumps(body).encode(), ctx.headers)
        try:
            return up.inst, up.resp.status, await up.resp.read()
        except UpstreamError as e:
            self._fail(up.inst, str(e))
            raise UpstreamUnavailable("prefill", [(up.inst, str(e))]) from None
        finally:
            up.close()

    async def prefill_json(self, ctx: Ctx, path: str, pbody: dict[str, Any]) -> tuple[Instance, int, Any, bytes]:
        """Run a prefill call; returns (instance, status, parsed JSON or None, raw bytes)."""
        inst, status, data = await self._prefill_call(ctx, path, pbody)
        parsed = None
        if status == 200:
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                err = f"answered 200 with a body that is not a JSON object: {data[:100]!r}"
                self._fail(inst, err)
                raise UpstreamUnavailable("prefill", [(inst, err)])
        return inst, status, parsed, data

    def prefill_body(self, body: dict[str, Any]) -> dict[str, Any]:
        pbody = dict(body)
        pbody["max_tokens"] = 1
        if "max_completion_tokens" in pbody:
            pbody["max_completion_tokens"] = 1
        pbody["stream"] = False
        for k in ("stream_options", "min_tokens"):
            pbody.pop(k, None)
        return pbody

    async def two_step(self, ctx: Ctx) -> web.StreamResponse:
        """NIXL and shared storage: prefill with max_tokens 1, then decode with the original body
        (plus the prefill's kv_transfer_params for NIXL), same X-Request-Id."""
        pbody = self.prefill_body(ctx.body)
        nixl = self.cfg.kv_kind == "nixl"
        if nixl:
            pbody["kv_transfer_params"] = dict(NIXL_PREFILL_PARAMS)
        try:
            pinst, status, parsed, data = await self.prefill_json(ctx, ctx.path, pbody)
        except UpstreamUnavailable as e:
            if not self.decode.instances:
                raise
            log.warning("%s; prefilling on decode instead", e)
            return await self.local(ctx, "prefill_failed")
        if status != 200 or parsed is None:
            # the prefill refused the request (4xx): the client's request is at fault; pass it on
            self.metrics.error("prefill_rejected", status)
            return web.Response(status=status, body=data, content_type=JSON_CT)
        self.metrics.request(ctx.endpoint, DISAGG, "long_prompt")
        dbody = ctx.raw
        if nixl:
            ktp = parsed.get("kv_transfer_params")
            if not ktp:
                if not self._warned_no_params:
                    log.warning(
                        "prefill %s returned no kv_transfer_params: is it a kv_producer? decode will "
                        "recompute the prompt",
                        pinst.name,
                    )
                    self._warned_no_params = True
            elif "kv_transfer_params" in ctx.body:
                dbody = json.dumps(dict(ctx.body, kv_transfer_params=ktp)).encode()
            else:
                dbody = with_field(ctx.raw, "kv_transfer_params", ktp)
        up = await self.call(self.decode, ctx.path, dbody, ctx.headers)
        return await self.relay(ctx, up, DISAGG)

    async def relay(self, ctx: Ctx, up: Upcall, path: str) -> web.StreamResponse:
        """Forward the decode answer: JSON as is, SSE chunk by chunk; a mid-stream failure ends
        the stream with an error event (the status line is already sent)."""
        resp = up.resp
        try:
            ctype = resp.headers.get("content-type", JSON_CT)
            if not ctype.startswith("text/event-stream"):
                try:
                    data = await resp.read()
                except UpstreamError as e:
                    self._fail(up.inst, str(e))
                    raise UpstreamUnavailable(up.inst.role, [(up.inst, str(e))]) from None
                self.metrics.observe_ttft(path, time.perf_counter() - ctx.t0)
                if resp.status >= 400:
                    self.metrics.error("decode_rejected", resp.status)
                return web.Response(
                    status=resp.status, body=data, headers={"Content-Type": ctype, "X-Request-Id": ctx.rid}
                )
            out = web.StreamResponse(
                status=resp.status,
                headers={"Content-Type": ctype, "Cache-Control": "no-cache", "X-Request-Id": ctx.rid},
            )
            await out.prepare(ctx.request)
            ttft = [path]
            return await self.pump(ctx, out, up, resp.iter_chunks(), ttft)
        finally:
            up.close()

    async def pump(
        self,
        ctx: Ctx,
        out: web.StreamResponse,
        up: Upcall,
        parts: AsyncIterator[bytes],
        ttft: list[str],
        convert: Callable[[bytes], bytes] | None = None,
    ) -> web.StreamResponse:
        """Copy an upstream SSE body to the client. An upstream failure ends the stream with an
        error event; a client that went away just ends it (the upstream is not to blame)."""
        try:
            async for chunk in parts:
                if ttft:
                    self.metrics.observe_ttft(ttft.pop(), time.perf_counter() - ctx.t0)
                if convert is not None:
                    chunk = convert(chunk)
                if chunk:
                    await out.write(chunk)
        except UpstreamError as e:
            await self.stream_failed(out, up.inst, e)
            return out
        except ConnectionError:  # the client disconnected; closing the upstream aborts generation
            self.metrics.error("client_disconnected", 499)
            return out
        with contextlib.suppress(ConnectionError):
            await out.write_eof()
        return out

    async def stream_failed(self, out: web.StreamResponse, inst: Instance, e: BaseException) -> None:
        err = str(e) or type(e).__name__
        self._fail(inst, err)
        self.metrics.error("stream_interrupted", 502)
        msg = f"{inst.role} instance {inst.name} ({inst.url}) failed mid-stream: {err}"
        event = error_body(502, msg, "UpstreamStreamError")
        with contextlib.suppress(ConnectionError):
            await out.write(b"data: " + json.dumps(event).encode() + b"\n\ndata: [DONE]\n\n")
            await out.write_eof()

    # ------------------------------------------------------------------ LMCache

    async def lmcache_flow(self, ctx: Ctx) -> web.StreamResponse:
        """LMCache P/D (0.5.6 proxy protocol): tokenize; prefill /v1/completions with token ids,
        max_tokens 1 and {ret_first_tok, disagg_spec naming the decoder's receiver ports}; wait
        for one ZMQ notification per decoder TP rank; then decode prompt + first token."""
        assert self.notifications is not None
        dinst = self.decode.pick()
        if dinst is None:
            raise UpstreamUnavailable("decode", [])
        ranks = len(dinst.up.lmcache_init_ports)
        if not ranks or not dinst.up.lmcache_host:
            log.warning("decode %s has no LMCache receiver ports; prefilling locally", dinst.name)
            return await self.local(ctx, "no_receiver")
        body = ctx.body
        tokens = await self.lmcache_tokens(ctx)
        if isinstance(tokens, web.Response):
            return tokens

        base = {k: v for k, v in body.items() if k not in CHAT_ONLY} if ctx.chat else dict(body)
        want = body.get("max_completion_tokens") if ctx.chat else None
        if want is None:
            want = body.get("max_tokens")
        pbody = dict(base, prompt=tokens, max_tokens=1, stream=False)
        pbody.pop("stream_options", None)
        pbody.pop("min_tokens", None)
        spec = {
            "req_id": ctx.rid,
            "receiver_host": dinst.up.lmcache_host,
            "receiver_init_port": list(dinst.up.lmcache_init_ports),
            "receiver_alloc_port": list(dinst.up.lmcache_alloc_ports),
        }
        pbody["kv_transfer_params"] = {"ret_first_tok": True, "disagg_spec": spec}
        ready = self.notifications.expect(ctx.rid, ranks)
        try:
            try:
                pinst, status, parsed, data = await self.prefill_json(ctx, "/v1/completions", pbody)
            except UpstreamUnavailable as e:
                log.warning("%s; prefilling on decode instead", e)
                return await self.local(ctx, "prefill_failed")
            if status != 200 or parsed is None:
                self.metrics.error("prefill_rejected", status)
                return web.Response(status=status, body=data, content_type=JSON_CT)
            first_tok = (parsed.get("kv_transfer_params") or {}).get("first_tok")
            if first_tok is None:
                raise UpstreamUnavailable(
                    "prefill",
                    [
                        (
                            pinst,
                            "answer has no kv_transfer_params.first_tok "
                            "(is it an LMCache sender with ret_first_tok support?)",
                        )
                    ],
                )
            wait_s = self.cfg.lmcache_notify_timeout_s or self.cfg.request_timeout_s
            try:
                await asyncio.wait_for(ready, wait_s)
            except TimeoutError:
                self._fail(pinst, "no LMCache transfer notification")
                raise UpstreamUnavailable(
                    "prefill",
                    [(pinst, f"no LMCache notification for request {ctx.rid} within {wait_s} s")],
                ) from None
        finally:
            self.notifications.forget(ctx.rid)
        self.metrics.request(ctx.endpoint, DISAGG, "long_prompt")
        first_text = parsed["choices"][0].get("text", "")
        if want is not None and int(want) <= 1:
            return await self.lmcache_prefill_only(ctx, parsed, first_text, len(tokens))
        dbody = dict(base, prompt=[*tokens, first_tok], stream=bool(body.get("stream")))
        if want is not None:
            dbody["max_tokens"] = int(want) - 1
        if ctx.chat and body.get("stream_options"):
            dbody["stream_options"] = body["stream_options"]
        try:
            up = await self.call(self.decode, "/v1/completions", json.dumps(dbody).encode(), ctx.headers, only=dinst)
        except UpstreamUnavailable as e:
            # the KV sits in that decoder; another one must prefill itself
            others = [i for i in self.decode.instances if i is not dinst]
            if not others:
                raise
            log.warning("%s; retrying with local prefill on another decode instance", e)
            return await self.local(ctx, "decode_failed", only=self.decode.pick(exclude=[dinst]))
        if up.resp.status != 200:
            return await self.relay(ctx, up, DISAGG)
        return await self.lmcache_answer(ctx, up, parsed, first_text)

    async def lmcache_tokens(self, ctx: Ctx) -> list[int] | web.Response:
        """The prompt's token ids: given by the client, or from a prefill's /tokenize (vLLM's
        TokenizeCompletionRequest takes one string; the chat form applies the chat template)."""
        body = ctx.body
        if ctx.chat:
            tok_req: dict[str, Any] = {
                "messages": body.get("messages"),
                "add_generation_prompt": body.get("add_generation_prompt", True),
            }
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
                return list(prompt)
            if not isinstance(prompt, str):
                self.metrics.error("bad_request", 400)
                return error_response(
                    400, "prompt must be one string or one list of token ids (LMCache P/D)", "BadRequestError"
                )
            tok_req = {"prompt": prompt}
        _, tstatus, tdata = await self._prefill_call(ctx, "/tokenize", tok_req)
        if tstatus != 200:
            self.metrics.error("prefill_rejected", tstatus)
            return web.Response(status=tstatus, body=tdata, content_type=JSON_CT)
        tokens: list[int] = json.loads(tdata)["tokens"]
        return tokens

    async def lmcache_prefill_only(
        self, ctx: Ctx, parsed: dict[str, Any], text: str, n_prompt: int
    ) -> web.StreamResponse:
        one = Completion(ctx, parsed)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": 1, "total_tokens": n_prompt + 1}
        if not ctx.body.get("stream"):
            return web.json_response(one.final(text, parsed["choices"][0].get("finish_reason"), usage))
        out = await one.open_stream()
        await out.write(one.chunk(text, parsed["choices"][0].get("finish_reason")))
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def lmcache_answer(self, ctx: Ctx, up: Upcall, parsed: dict[str, Any], first_text: str) -> web.StreamResponse:
        """Join the prefill's first token and the decoder's continuation, in the client's format."""
        comp = Completion(ctx, parsed)
        try:
            if not ctx.body.get("stream"):
                try:
                    d = json.loads(await up.resp.read())
                except UpstreamError as e:
                    self._fail(up.inst, str(e))
                    raise UpstreamUnavailable("decode", [(up.inst, str(e))]) from None
                self.metrics.observe_ttft(DISAGG, time.perf_counter() - ctx.t0)
                ch = d["choices"][0]
                u = d.get("usage") or {}
                usage = {
                    "prompt_tokens": int(u.get("prompt_tokens", 1)) - 1,
                    "completion_tokens": int(u.get("completion_tokens", 0)) + 1,
                }
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                return web.json_response(
                    comp.final(first_text + ch.get("text", ""), ch.get("finish_reason"), usage),
                    headers={"X-Request-Id": ctx.rid},
                )
            out = await comp.open_stream()
            await out.write(comp.chunk(first_text, None))
            self.metrics.observe_ttft(DISAGG, time.perf_counter() - ctx.t0)
            return await self.pump(ctx, out, up, up.resp.iter_lines(), [], comp.to_chat_line if ctx.chat else None)
        finally:
            up.close()


@dataclass
class Ctx:
    """One client request as the paths need it."""

    request: web.Request
    chat: bool
    endpoint: str
    raw: bytes
    body: dict[str, Any]
    rid: str
    headers: dict[str, str]
    t0: float

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


class Completion:
    """Builds client-format answers from LMCache's /v1/completions results (chat or not)."""

    def __init__(self, ctx: Ctx, prefill: dict[str, Any]) -> None:
        self.ctx = ctx
        self.id = str(prefill.get("id", ctx.rid))
        if ctx.chat and self.id.startswith("cmpl-"):
            self.id = "chat" + self.id
        self.created = prefill.get("created", int(time.time()))
        self.model = prefill.get("model", ctx.body.get("model"))

    def final(self, text: str, finish: Any, usage: dict[str, int]) -> dict[str, Any]:
        if self.ctx.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        }

    async def open_stream(self) -> web.StreamResponse:
        out = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": self.ctx.rid}
        )
        await out.prepare(self.ctx.request)
        if self.ctx.chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            await out.write(self._event("chat.completion.chunk", [role]))
        return out

    def chunk(self, text: str, finish: Any) -> bytes:
        if self.ctx.chat:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
            return self._event("chat.completion.chunk", [choice])
        return self._event("text_completion", [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])

    def _event(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    def to_chat_line(self, line: bytes) -> bytes:
        """Rewrite one SSE line of a completions stream as a chat.completion.chunk line."""
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            return line
        try:
            d = json.loads(line[6:])
        except ValueError:
            return line
        choices = [
            {
                "index": c.get("index", 0),
                "delta": {"content": c.get("text", "")},
                "logprobs": None,
                "finish_reason": c.get("finish_reason"),
            }
            for c in d.get("choices", [])
        ]
        extra = {"usage": d["usage"]} if d.get("usage") else {}
        return self._event("chat.completion.chunk", choices, **extra)[:-1]  # the line's own "\n" ends it


def build_app(cfg: RouterConfig) -> web.Application:
    router = Router(cfg)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["router"] = router
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
        ("GET", "/health", router.handle_health),
        ("GET", "/v1/models", router.handle_models),
        ("GET", "/metrics", router.handle_metrics),
        ("POST", "/v1/completions", router.handle_completions),
        ("POST", "/v1/chat/completions", router.handle_chat),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    return app


def serve(cfg: RouterConfig) -> None:
    loop: asyncio.AbstractEventLoop | None = None
    try:
        import uvloop  # faster event loop where installed

        loop = uvloop.new_event_loop()
    except ImportError:
        pass
    app = build_app(cfg)
    log.info(
        "router %s on %s:%d (%s; %d prefill, %d decode)",
        cfg.name,
        cfg.bind,
        cfg.port,
        cfg.kv_kind,
        len(cfg.prefill),
        len(cfg.decode),
    )
    # on SIGTERM, open requests get 10 s to finish (aiohttp's default is 60 s; supervisors kill sooner)
    web.run_app(app, host=cfg.bind, port=cfg.port, access_log=None, print=None, loop=loop, shutdown_timeout=10)
