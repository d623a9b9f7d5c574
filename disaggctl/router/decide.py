"""Per request: disaggregated, or local prefill on a decode instance (and why)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from disaggctl.router.bodies import message_text
from disaggctl.router.config import RouterConfig
from disaggctl.router.policies import Pool

DISAGG = "disaggregated"
LOCAL = "local_prefill"


def load_tokenizer(path: str | None) -> Callable[[str], int] | None:
    """A token counter from a tokenizer.json, or None (the characters estimate is used)."""
    if not path:
        return None
    try:
        from tokenizers import Tokenizer  # optional: exact counts for the local-prefill decision
    except ImportError as e:
        raise RuntimeError(f"router config tokenizer={path!r} needs the `tokenizers` package") from e
    tok = Tokenizer.from_file(path)
    return lambda text: len(tok.encode(text, add_special_tokens=False).ids)


class Decider:
    def __init__(self, cfg: RouterConfig, prefill: Pool) -> None:
        self.cfg = cfg
        self.prefill = prefill
        self.encode = load_tokenizer(cfg.tokenizer)

    def count_tokens(self, body: dict[str, Any], chat: bool) -> int:
        """The prompt's tokens: exact for token ids or with a tokenizer, else characters / chars_per_token."""
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
        if self.encode is not None:
            return self.encode(text)
        return math.ceil(len(text) / self.cfg.chars_per_token)

    def decide(self, body: dict[str, Any], chat: bool) -> tuple[str, str]:
        """(path, reason): see docs/router.md "The path of a request"."""
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
