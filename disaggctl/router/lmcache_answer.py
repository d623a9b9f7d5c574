"""LMCache answers in the client's format: the prefill's first token joined with the decoder's
continuation (both come from /v1/completions; chat clients get chat objects and chunks)."""

from __future__ import annotations

import time
from typing import Any

from disaggctl.router import front
from disaggctl.router.bodies import JSONError, dumps, loads
from disaggctl.router.handoff import Ctx


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

    def joined(self, first_text: str, decoded: dict[str, Any]) -> dict[str, Any]:
        """The final answer from the prefill's first token and the decoder's JSON answer."""
        ch = decoded["choices"][0]
        u = decoded.get("usage") or {}
        usage = {
            "prompt_tokens": int(u.get("prompt_tokens", 1)) - 1,
            "completion_tokens": int(u.get("completion_tokens", 0)) + 1,
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return self.final(first_text + ch.get("text", ""), ch.get("finish_reason"), usage)

    async def open_stream(self) -> front.StreamResponse:
        out = front.StreamResponse(
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
        return b"data: " + dumps(data) + b"\n\n"

    def to_chat_line(self, line: bytes) -> bytes:
        """Rewrite one SSE line of a completions stream as a chat.completion.chunk line."""
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            return line
        try:
            d = loads(line[6:])
        except JSONError:
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
