"""The builtin P/D router: an HTTP service (`front.py`) in front of prefill and decode vLLM instances.

Per request: decide the path (`decide.py`: disaggregated, or local prefill on a decode
instance), run the connector's hand-off (`handoff.py`: NIXL, shared storage; `lmcache_flow.py`)
and pass the decode answer through (SSE bytes are forwarded untouched). Upstream calls,
retries and health live in `calls.py`. Request bodies are parsed once and only the prefill body
is re-encoded (the decode body is the client's bytes, spliced for NIXL).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import time
from typing import Any

from disaggctl.router import front
from disaggctl.router.admin import Admin
from disaggctl.router.bodies import JSON_CT, NIXL_PREFILL_PARAMS, JSONError, dumps, error_body, loads, with_field
from disaggctl.router.calls import Upstreams, UpstreamUnavailable
from disaggctl.router.config import RouterConfig
from disaggctl.router.decide import LOCAL, Decider
from disaggctl.router.handoff import Ctx, Handoff
from disaggctl.router.lmcache import Notifications
from disaggctl.router.lmcache_flow import LMCacheFlow
from disaggctl.router.metrics import RouterMetrics
from disaggctl.router.policies import STATES, Instance, Pool

__all__ = ["NIXL_PREFILL_PARAMS", "Router", "routes", "serve", "with_field"]

log = logging.getLogger("disaggctl.router")


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> front.Response:
    return front.Response(status=status, body=dumps(body), headers={"Content-Type": JSON_CT, **(headers or {})})


def error_response(status: int, message: str, kind: str) -> front.Response:
    return json_response(error_body(status, message, kind), status=status)


class Router:
    """The service: owns the pools, metrics and hand-offs; the handlers are its methods."""

    def __init__(self, cfg: RouterConfig) -> None:
        self.cfg = cfg
        self.metrics = RouterMetrics()
        self.ups = Upstreams(cfg, self.metrics)
        self.prefill: Pool = self.ups.prefill
        self.decode: Pool = self.ups.decode
        self.decider = Decider(cfg, self.prefill)
        self.handoff = Handoff(cfg, self.ups, self.metrics)
        self.notifications: Notifications | None = None
        self.lmcache: LMCacheFlow | None = None
        self.admin = Admin(cfg.admin, self.ups.all(), self.ups.check) if cfg.admin is not None else None
        # request ids made here: a random per-process prefix and a counter (no syscall per request)
        self._rid_prefix = os.urandom(6).hex()
        self._rid_counter = itertools.count(1)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.cfg.kv_kind == "lmcache":
            assert self.cfg.lmcache_proxy_port is not None  # the config requires it for lmcache
            # no separate address given: the router's own (never every interface unless bind says so)
            bind = self.cfg.lmcache_proxy_bind or self.cfg.bind
            self.notifications = Notifications(bind, self.cfg.lmcache_proxy_port)
            await self.notifications.start()
            self.lmcache = LMCacheFlow(self.handoff, self.notifications)
        if self.admin is not None:
            await self.admin.start()
        await self.ups.poll_health()
        self.ups.start_health()
        # what exists now lives as long as the process: keep it out of every future collection
        gc.collect()
        gc.freeze()

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        await self.ups.close()
        if self.notifications:
            await self.notifications.close()

    async def poll_health(self) -> None:
        await self.ups.poll_health()

    # ------------------------------------------------------------------ decisions

    def count_tokens(self, body: dict[str, Any], chat: bool) -> int:
        return self.decider.count_tokens(body, chat)

    def decide(self, body: dict[str, Any], chat: bool) -> tuple[str, str]:
        return self.decider.decide(body, chat)

    # ------------------------------------------------------------------ HTTP handlers

    async def handle_health(self, request: front.Request) -> front.Response:
        def detail(pool: Pool) -> list[dict[str, Any]]:
            return [instance_detail(i) for i in pool.instances]

        ok = self.decode.any_healthy()
        # no decode left but a prefill instance serves whole requests: degraded, not down
        degraded = not ok and self.prefill.any_healthy()
        body = {
            "status": "ok" if ok else "degraded" if degraded else "unavailable",
            "kv_kind": self.cfg.kv_kind,
            "prefill": detail(self.prefill),
            "decode": detail(self.decode),
        }
        if not ok:
            body["message"] = "no healthy decode instance" + (": prefill instances serve alone" if degraded else "")
        return json_response(body, status=200 if ok or degraded else 503)

    async def handle_models(self, request: front.Request) -> front.Response:
        inst = self.decode.pick()
        if inst is not None:
            try:
                r = await self.ups.client.request("GET", inst.url, "/v1/models", timeout=10)
                raw = await r.read()
                if r.status == 200:
                    return front.Response(body=raw, content_type=JSON_CT)
            except OSError:
                pass
        data = [{"id": self.cfg.model, "object": "model", "created": 0, "owned_by": "disaggctl"}]
        return json_response({"object": "list", "data": data})

    async def handle_metrics(self, request: front.Request) -> front.Response:
        m = self.metrics
        m.gauges["upstream_healthy"] = {}
        m.gauges["upstream_in_flight"] = {}
        m.gauges["upstream_kv_held"] = {}
        m.gauges["upstream_state"] = {}
        for i in self.ups.all():
            key = (("upstream", i.name), ("role", i.role))
            m.gauges["upstream_healthy"][key] = 1.0 if i.healthy else 0.0
            m.gauges["upstream_in_flight"][key] = float(i.in_flight)
            m.gauges["upstream_kv_held"][key] = float(i.kv_held)
            state = i.state
            for s in STATES:
                m.gauges["upstream_state"][(*key, ("state", s))] = 1.0 if s == state else 0.0
        if self.notifications is not None:
            m.gauges["lmcache_notifications_received"] = {(): float(self.notifications.received)}
        return front.Response(text=m.render(), content_type="text/plain", charset="utf-8")

    async def handle_completions(self, request: front.Request) -> front.Reply:
        return await self.generate(request, chat=False)

    async def handle_chat(self, request: front.Request) -> front.Reply:
        return await self.generate(request, chat=True)

    async def generate(self, request: front.Request, chat: bool) -> front.Reply:
        t0 = time.perf_counter()
        raw = await request.read()
        try:
            body = loads(raw)
        except JSONError:
            body = None
        if not isinstance(body, dict):
            self.metrics.error("bad_request", 400)
            return error_response(400, "request body must be a JSON object", "BadRequestError")
        hdrs = request.headers  # lower-case names
        rid = hdrs.get("x-request-id") or f"{self._rid_prefix}{next(self._rid_counter):010x}"
        headers = {"Content-Type": JSON_CT, "X-Request-Id": rid}
        auth = hdrs.get("authorization")
        if auth:
            headers["Authorization"] = auth
        ctx = Ctx(request, chat, "chat" if chat else "completions", raw, body, rid, headers, t0)
        try:
            return await self.route(ctx)
        except UpstreamUnavailable as e:
            self.metrics.error(f"{e.role}_unavailable", e.status)
            return error_response(e.status, str(e), "UpstreamUnavailable")
        except TimeoutError:
            self.metrics.error("timeout", 504)
            return error_response(504, f"upstream timed out after {self.cfg.request_timeout_s} s", "UpstreamTimeout")

    async def route(self, ctx: Ctx) -> front.Reply:
        if self.decode.out(self.cfg.health_interval_s) and self.prefill_left():
            # every decode instance is out: a prefill instance serves the request alone (degraded)
            return await self.alone_on_prefill(ctx, "no_decode")
        try:
            path, reason = self.decider.decide(ctx.body, ctx.chat)
            if path == LOCAL:
                return await self.handoff.local(ctx, reason)
            if self.lmcache is not None:
                return await self.lmcache.run(ctx)
            return await self.handoff.two_step(ctx)
        except UpstreamUnavailable as e:
            # no decode answered and nothing reached the client yet: a prefill instance serves it alone
            if e.role != "decode" or not self.prefill_left():
                raise
            log.warning("%s; serving on a prefill instance instead", e)
            return await self.alone_on_prefill(ctx, "decode_failed")

    async def alone_on_prefill(self, ctx: Ctx, reason: str) -> front.Reply:
        """Decode is out: a prefill instance serves the request alone. When no prefill answers either
        (both roles failed a call just now, e.g. a prefill died and a decode leg pulling from it timed
        out), decode is tried once more, prefilling locally: its failure may be stale."""
        try:
            return await self.handoff.prefill_only(ctx, reason)
        except UpstreamUnavailable as e:
            if e.role != "prefill" or not self.decode.instances:
                raise
            log.warning("%s; trying decode again", e)
            return await self.handoff.local(ctx, "prefill_failed")

    def prefill_left(self) -> bool:
        """A prefill instance is in rotation (it can serve whole requests when decode is out)."""
        return any(not i.draining for i in self.prefill.instances)


def instance_detail(i: Instance) -> dict[str, Any]:
    return {
        "name": i.name,
        "url": i.url,
        "healthy": i.healthy,
        "state": i.state,
        "in_flight": i.in_flight,
        "last_error": i.last_error,
    }


def routes(router: Router) -> dict[str, dict[str, front.Handler]]:
    return {
        "/health": {"GET": router.handle_health},
        "/v1/models": {"GET": router.handle_models},
        "/metrics": {"GET": router.handle_metrics},
        "/v1/completions": {"POST": router.handle_completions},
        "/v1/chat/completions": {"POST": router.handle_chat},
    }


def serve(cfg: RouterConfig) -> None:
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop  # faster event loop where installed

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    router = Router(cfg)
    log.info(
        "router %s on %s:%d (%s; %d prefill, %d decode)",
        cfg.name,
        cfg.bind,
        cfg.port,
        cfg.kv_kind,
        len(cfg.prefill),
        len(cfg.decode),
    )
    # on SIGTERM, open requests get 10 s to finish (supervisors kill sooner than aiohttp's 60 s default)
    try:
        loop.run_until_complete(front.run(routes(router), cfg.bind, cfg.port, router.start, router.stop, 10.0))
    finally:
        loop.close()
