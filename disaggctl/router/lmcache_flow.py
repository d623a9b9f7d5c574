"""The LMCache P/D hand-off (LMCache 0.5.6's proxy protocol), step by step:

1. choose the decoder first (prefill pushes the KV into it) and check it has receiver ports;
2. the prompt's token ids (the client's, or a prefill's /tokenize);
3. prefill /v1/completions with the ids, max_tokens 1 and {ret_first_tok, disagg_spec naming the
   decoder's receiver ports}, then wait for one ZMQ notification per decoder TP rank;
4. decode prompt + first token on that decoder;
5. answer: the first token joined with the decoder's continuation, in the client's format.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from disaggctl.router import front
from disaggctl.router.bodies import CHAT_ONLY, JSON_CT, dumps, error_body, loads
from disaggctl.router.calls import Upcall, UpstreamUnavailable
from disaggctl.router.decide import DISAGG
from disaggctl.router.handoff import Ctx, Handoff
from disaggctl.router.lmcache import Notifications
from disaggctl.router.lmcache_answer import Completion
from disaggctl.router.policies import Instance
from disaggctl.router.upstream import UpstreamError

log = logging.getLogger("disaggctl.router")


@dataclass(slots=True)
class Prefilled:
    """What the prefill step produced."""

    inst: Instance
    parsed: dict[str, Any]  # the prefill's /v1/completions answer
    first_tok: int
    first_text: str


class LMCacheFlow:
    def __init__(self, handoff: Handoff, notifications: Notifications) -> None:
        self.h = handoff
        self.ups = handoff.ups
        self.metrics = handoff.metrics
        self.cfg = handoff.cfg
        self.notifications = notifications

    async def run(self, ctx: Ctx) -> front.Reply:
        dinst = self.ups.decode.pick()
        if dinst is None:
            raise UpstreamUnavailable("decode", [])
        if not dinst.up.lmcache_init_ports or not dinst.up.lmcache_host:
            log.warning("decode %s has no LMCache receiver ports; prefilling locally", dinst.name)
            return await self.h.local(ctx, "no_receiver")
        tokens = await self.tokens(ctx)
        if isinstance(tokens, front.Response):
            return tokens
        body = ctx.body
        base = {k: v for k, v in body.items() if k not in CHAT_ONLY} if ctx.chat else dict(body)
        got = await self.prefill(ctx, dinst, base, tokens)
        if not isinstance(got, Prefilled):
            return got
        self.metrics.request(ctx.endpoint, DISAGG, "long_prompt")
        want = body.get("max_completion_tokens") if ctx.chat else None
        if want is None:
            want = body.get("max_tokens")
        if want is not None and int(want) <= 1:
            return await self.prefill_only(ctx, got, len(tokens))
        dbody = dict(base, prompt=[*tokens, got.first_tok], stream=bool(body.get("stream")))
        if want is not None:
            dbody["max_tokens"] = int(want) - 1
        if ctx.chat and body.get("stream_options"):
            dbody["stream_options"] = body["stream_options"]
        up = await self.decode(ctx, dinst, dbody)
        if not isinstance(up, Upcall):
            return up
        if up.resp.status != 200:
            return await self.h.relay(ctx, up, DISAGG)
        return await self.answer(ctx, up, got)

    async def tokens(self, ctx: Ctx) -> list[int] | front.Response:
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
                msg = "prompt must be one string or one list of token ids (LMCache P/D)"
                return front.json_response(error_body(400, msg, "BadRequestError"), status=400)
            tok_req = {"prompt": prompt}
        _, tstatus, tdata = await self.h.prefill_call(ctx, "/tokenize", tok_req)
        if tstatus != 200:
            self.metrics.error("prefill_rejected", tstatus)
            return front.Response(status=tstatus, body=tdata, content_type=JSON_CT)
        tokens: list[int] = loads(tdata)["tokens"]
        return tokens

    async def prefill(
        self, ctx: Ctx, dinst: Instance, base: dict[str, Any], tokens: list[int]
    ) -> Prefilled | front.Reply:
        """Prefill into `dinst` and wait until every TP rank's KV arrived there. Returns what the
        prefill produced, or the answer to give the client (a rejection, or local prefill)."""
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
        # registered before the call: notifications can beat the prefill's HTTP answer
        ready = self.notifications.expect(ctx.rid, len(dinst.up.lmcache_init_ports))
        try:
            try:
                pinst, status, parsed, data = await self.h.prefill_json(ctx, "/v1/completions", pbody)
            except UpstreamUnavailable as e:
                log.warning("%s; prefilling on decode instead", e)
                return await self.h.local(ctx, "prefill_failed")
            if status != 200 or parsed is None:
                self.metrics.error("prefill_rejected", status)
                return front.Response(status=status, body=data, content_type=JSON_CT)
            got = self._first_token(pinst, parsed)
            await self._wait_kv(ready, pinst, ctx.rid)
            return got
        finally:
            self.notifications.forget(ctx.rid)

    @staticmethod
    def _first_token(pinst: Instance, parsed: dict[str, Any]) -> Prefilled:
        first_tok = (parsed.get("kv_transfer_params") or {}).get("first_tok")
        if first_tok is None:
            why = "answer has no kv_transfer_params.first_tok (is it an LMCache sender with ret_first_tok support?)"
            raise UpstreamUnavailable("prefill", [(pinst, why)])
        return Prefilled(pinst, parsed, first_tok, parsed["choices"][0].get("text", ""))

    async def _wait_kv(self, ready: asyncio.Future[None], pinst: Instance, rid: str) -> None:
        wait_s = self.cfg.lmcache_notify_timeout_s or self.cfg.request_timeout_s
        try:
            await asyncio.wait_for(ready, wait_s)
        except TimeoutError:
            self.ups.fail(pinst, "no LMCache transfer notification")
            why = f"no LMCache notification for request {rid} within {wait_s} s"
            raise UpstreamUnavailable("prefill", [(pinst, why)]) from None

    async def decode(self, ctx: Ctx, dinst: Instance, dbody: dict[str, Any]) -> Upcall | front.Reply:
        """Decode on the decoder that holds the KV; if it fails, another decoder prefills itself."""
        try:
            return await self.ups.call(self.ups.decode, "/v1/completions", dumps(dbody), ctx.headers, only=dinst)
        except UpstreamUnavailable as e:
            if not [i for i in self.ups.decode.instances if i is not dinst]:
                raise
            log.warning("%s; retrying with local prefill on another decode instance", e)
            return await self.h.local(ctx, "decode_failed", only=self.ups.decode.pick(exclude=[dinst]))

    async def prefill_only(self, ctx: Ctx, got: Prefilled, n_prompt: int) -> front.Reply:
        """A request for one token: the prefill's answer is the whole answer."""
        one = Completion(ctx, got.parsed)
        finish = got.parsed["choices"][0].get("finish_reason")
        usage = {"prompt_tokens": n_prompt, "completion_tokens": 1, "total_tokens": n_prompt + 1}
        if not ctx.body.get("stream"):
            return front.json_response(one.final(got.first_text, finish, usage))
        out = await one.open_stream()
        await out.write(one.chunk(got.first_text, finish))
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    async def answer(self, ctx: Ctx, up: Upcall, got: Prefilled) -> front.Reply:
        """Join the prefill's first token and the decoder's continuation, in the client's format."""
        comp = Completion(ctx, got.parsed)
        try:
            if not ctx.body.get("stream"):
                try:
                    decoded = loads(await up.resp.read())
                except UpstreamError as e:
                    self.ups.fail(up.inst, str(e))
                    raise UpstreamUnavailable("decode", [(up.inst, str(e))]) from None
                self.metrics.observe_ttft(DISAGG, time.perf_counter() - ctx.t0)
                return front.json_response(comp.joined(got.first_text, decoded), headers={"X-Request-Id": ctx.rid})
            out = await comp.open_stream()
            await out.write(comp.chunk(got.first_text, None))
            self.metrics.observe_ttft(DISAGG, time.perf_counter() - ctx.t0)
            convert = comp.to_chat_line if ctx.chat else None
            return await self.h.pump(ctx, out, up, up.resp.iter_lines(), None, convert)
        finally:
            up.close()
