"""Request and answer bodies: JSON in and out (orjson when installed), and the few edits the
hand-offs make. The decode body is the client's own bytes wherever possible (`with_field`
appends a field without re-encoding the rest)."""

from __future__ import annotations

import json
from typing import Any

try:  # optional: about 3-5x faster encode/decode of request bodies
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    def loads(data: bytes | str) -> Any:
        return orjson.loads(data)

    JSONError: tuple[type[Exception], ...] = (orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - exercised where orjson is missing

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(data: bytes | str) -> Any:
        return json.loads(data)

    JSONError = (ValueError,)


JSON_CT = "application/json"
# chat-only request fields that /v1/completions rejects (LMCache prefill/decode go through it)
CHAT_ONLY = frozenset(
    (
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
)
NIXL_PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}}


def with_field(raw: bytes, key: str, value: Any) -> bytes:
    """Append `"key": value` to a JSON object's bytes without re-encoding the rest of it."""
    end = raw.rstrip()
    if not end.endswith(b"}"):
        raise ValueError("not a JSON object")
    head = end[:-1].rstrip()
    sep = b"" if head.endswith(b"{") else b","
    return head + sep + dumps(key) + b":" + dumps(value) + b"}"


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The client's request as a prefill-only call: one token, not streamed."""
    pbody = dict(body)
    pbody["max_tokens"] = 1
    if "max_completion_tokens" in pbody:
        pbody["max_completion_tokens"] = 1
    pbody["stream"] = False
    pbody.pop("stream_options", None)
    pbody.pop("min_tokens", None)
    return pbody


def message_text(messages: Any) -> str:
    """The text of chat messages (string contents and `text` parts), joined by newlines."""
    parts: list[str] = []
    if isinstance(messages, list):
        for m in messages:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p.get("text", "") for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)


# ---------------------------------------------------------------------- errors inside 200 answers

_ERROR_KEY = b'"error"'


def json_has_error(data: bytes) -> bool:
    """A JSON object with a non-null top-level "error" (a byte search first: nearly free when absent)."""
    if _ERROR_KEY not in data:
        return False
    try:
        obj = loads(data)
    except JSONError:
        return False
    return isinstance(obj, dict) and obj.get("error") is not None


def sse_has_error(chunk: bytes) -> bool:
    """An SSE `data:` event in this chunk whose JSON object carries an "error"."""
    if _ERROR_KEY not in chunk:
        return False
    return any(line.startswith(b"data:") and json_has_error(line[5:].strip()) for line in chunk.split(b"\n"))


def sse_opening(chunk: bytes) -> str:
    """What a leading chunk of an SSE answer says, before any generated text: "error" (an error
    event), "empty" (only events without generated text or finish: a chat stream's role chunk),
    else "content" (text, a finish, a split or unknown event: stop judging, pass it on)."""
    if not chunk.endswith(b"\n\n"):
        return "content"
    for line in chunk.split(b"\n"):
        if not line.strip() or line.startswith(b":"):
            continue
        payload = line[5:].strip() if line.startswith(b"data:") else b""
        try:
            obj = loads(payload) if payload and payload != b"[DONE]" else None
        except JSONError:
            obj = None
        if not isinstance(obj, dict):
            return "content"
        if obj.get("error") is not None:
            return "error"
        if not _no_text(obj.get("choices")):
            return "content"
    return "empty"


def _no_text(choices: object) -> bool:
    if not isinstance(choices, list):
        return False
    for c in choices:
        if not isinstance(c, dict) or c.get("finish_reason") is not None or c.get("text"):
            return False
        delta = c.get("delta")
        if isinstance(delta, dict) and any(v for k, v in delta.items() if k != "role"):
            return False
    return True
