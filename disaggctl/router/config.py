"""The builtin router's configuration file (JSON), written by `compile` and read by the router.

Kept dependency-light (pydantic only) so compile can import it without pulling aiohttp in.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Policy = Literal["round_robin", "least_loaded", "cache_aware", "random", "power_of_two"]


class Upstream(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # instance name, e.g. "decode-0"
    url: str  # base URL, e.g. "http://10.0.0.2:8200"
    # LMCache receivers (decode instances): where prefill pushes KV, one port per TP rank
    lmcache_host: str | None = None
    lmcache_init_ports: list[int] = Field(default_factory=list)
    lmcache_alloc_ports: list[int] = Field(default_factory=list)


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "disaggctl"
    bind: str = "0.0.0.0"
    port: int = 8000
    model: str  # served model name clients use
    kv_kind: Literal["nixl", "lmcache", "shared-storage"]
    prefill: list[Upstream]
    decode: list[Upstream]
    prefill_policy: Policy = "least_loaded"
    decode_policy: Policy = "least_loaded"
    local_prefill_threshold: int = 256  # prompts shorter than this (tokens) skip prefill
    max_prefill_queue: int | None = None  # more waiting prefills than this: prefill locally
    request_timeout_s: float = 600
    retries: int = 1
    chars_per_token: float = 4.0  # token estimate (prompt characters / this) when no tokenizer is configured
    # optional exact count for the local-prefill decision: a tokenizer.json (needs the `tokenizers` package)
    tokenizer: str | None = None
    health_interval_s: float = 2.0  # how often each upstream's /health is polled
    connect_timeout_s: float = 5.0  # a connect that takes longer counts as an upstream failure
    # LMCache: the router binds a ZMQ PULL socket here and waits for one message per decoder TP rank
    lmcache_proxy_bind: str | None = None  # "0.0.0.0"
    lmcache_proxy_port: int | None = None
    lmcache_notify_timeout_s: float | None = None  # wait for the KV-written notifications (default: request_timeout_s)


def load_router_config(path: str) -> RouterConfig:
    with open(path) as f:
        return RouterConfig.model_validate_json(f.read())
