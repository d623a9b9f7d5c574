"""The builtin router's configuration file (JSON), written by `compile` and read by the router.

Standard library only: the router runs on hosts that have none of disaggctl's CLI
dependencies (pydantic, typer, ...). The dataclasses validate themselves strictly on
construction (types, ranges, cross-field rules); `parse_router_config` also rejects unknown
and missing keys of a JSON document and reports every problem with its field path.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Policy = Literal["round_robin", "least_loaded", "cache_aware", "random", "power_of_two"]
KvKind = Literal["nixl", "lmcache", "shared-storage"]


class ConfigError(ValueError):
    """A router config that cannot be used; `problems` are `field.path: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Upstream:
    name: str  # instance name, e.g. "decode-0"
    url: str  # base URL, e.g. "http://10.0.0.2:8200"
    # LMCache receivers (decode instances): where prefill pushes KV, one port per TP rank
    lmcache_host: str | None = None
    lmcache_init_ports: list[int] = field(default_factory=list)
    lmcache_alloc_ports: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _raise(_check_fields(self, "") + _upstream_rules(self, ""))

    @classmethod
    def trusted(
        cls,
        name: str,
        url: str,
        lmcache_host: str | None,
        lmcache_init_ports: list[int],
        lmcache_alloc_ports: list[int],
    ) -> Upstream:
        """An upstream from already-typed data (compile, 3,000 of them at 9216 GPUs): the field checks
        a router.json needs are skipped; the url and port-count rules still hold (cheap)."""
        u = object.__new__(cls)
        for k, v in (
            ("name", name),
            ("url", url),
            ("lmcache_host", lmcache_host),
            ("lmcache_init_ports", lmcache_init_ports),
            ("lmcache_alloc_ports", lmcache_alloc_ports),
        ):
            object.__setattr__(u, k, v)
        _raise(_upstream_rules(u, ""))
        return u


@dataclass(frozen=True)
class AdminConfig:
    """The admin listener (drain/undrain): separate from the client port, token-protected."""

    port: int
    host: str = "127.0.0.1"
    # a file holding the bearer token (mode 0600); none: every admin call is refused
    token_file: str | None = None

    def __post_init__(self) -> None:
        problems = _check_fields(self, "")
        if isinstance(self.port, int) and not isinstance(self.port, bool) and not 0 <= self.port <= 65535:
            problems.append(f"port: {self.port} is not a TCP port (0-65535)")
        _raise(problems)


@dataclass(frozen=True)
class RouterConfig:
    model: str  # served model name clients use
    kv_kind: KvKind
    prefill: list[Upstream]
    decode: list[Upstream]
    name: str = "disaggctl"
    bind: str = "0.0.0.0"
    port: int = 8000
    prefill_policy: Policy = "least_loaded"
    decode_policy: Policy = "least_loaded"
    local_prefill_threshold: int = 256  # prompts shorter than this (tokens) skip prefill
    max_prefill_queue: int | None = None  # more waiting prefills than this: prefill locally
    request_timeout_s: float = 600.0
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
    admin: AdminConfig | None = None  # the admin listener (drain); none: no admin API

    def __post_init__(self) -> None:
        _raise(_check_fields(self, "") + _config_rules(self))

    def to_json(self) -> str:
        """The file `compile` writes (every field, in declaration order of the JSON format)."""
        ordered = {k: _plain(getattr(self, k)) for k in JSON_ORDER}
        if self.admin is not None:
            admin = _plain(self.admin)
            ordered["admin"] = {k: admin[k] for k in ("host", "port", "token_file")}
        from disaggctl.jsontext import dumps_indent2  # json.dumps(indent=2)'s text, faster with orjson

        return dumps_indent2(ordered) + "\n"


# the key order of router.json as compile has always written it (golden files)
JSON_ORDER = (
    "name",
    "bind",
    "port",
    "model",
    "kv_kind",
    "prefill",
    "decode",
    "prefill_policy",
    "decode_policy",
    "local_prefill_threshold",
    "max_prefill_queue",
    "request_timeout_s",
    "retries",
    "chars_per_token",
    "tokenizer",
    "health_interval_s",
    "connect_timeout_s",
    "lmcache_proxy_bind",
    "lmcache_proxy_port",
    "lmcache_notify_timeout_s",
    "admin",
)


def load_router_config(path: str) -> RouterConfig:
    """Read and validate a router.json. OSError when unreadable, ConfigError when invalid."""
    with open(path, "rb") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConfigError([f"(file): not JSON: {e}"]) from None
    return parse_router_config(data)


def parse_router_config(data: object) -> RouterConfig:
    """Build a RouterConfig from parsed JSON, reporting every unknown, missing or bad field."""
    problems = _check_keys(data, RouterConfig, "")
    if problems or not isinstance(data, dict):
        raise ConfigError(problems)
    ups: dict[str, list[Upstream]] = {}
    for role in ("prefill", "decode"):
        items = data[role]
        if not isinstance(items, list):
            continue  # the field check below names it
        built: list[Upstream] = []
        for n, item in enumerate(items):
            where = f"{role}[{n}]"
            got = _check_keys(item, Upstream, where)
            if got or not isinstance(item, dict):
                problems += got
                continue
            try:
                built.append(Upstream(**item))
            except ConfigError as e:
                problems += [f"{where}.{p}" for p in e.problems]
        ups[role] = built
    admin = _parse_admin(data.get("admin"), problems)
    if problems:  # also name what is wrong with the other fields
        hints = _hints(RouterConfig)
        for key, value in data.items():
            if key not in ("prefill", "decode", "admin"):
                problems += _check_value(value, hints[key], key)
        raise ConfigError(problems)
    return RouterConfig(**{**data, **ups, "admin": admin})


def _parse_admin(item: object, problems: list[str]) -> AdminConfig | None:
    if item is None:
        return None
    got = _check_keys(item, AdminConfig, "admin")
    if got or not isinstance(item, dict):
        problems += got
        return None
    try:
        return AdminConfig(**item)
    except ConfigError as e:
        problems += [f"admin.{p}" for p in e.problems]
        return None


def _plain(value: Any) -> Any:
    """dataclasses.asdict's result for one field value (lists and nested dataclasses copied), 5x faster."""
    if type(value) in _SCALARS:  # most values: returned as they are, without the three checks below
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in _fields(type(value))}
    return value


def _fields(cls: type[Any]) -> tuple[dataclasses.Field[Any], ...]:
    cached = _FIELDS.get(cls)
    if cached is None:
        cached = _FIELDS[cls] = dataclasses.fields(cls)
    return cached


_FIELDS: dict[type[Any], tuple[dataclasses.Field[Any], ...]] = {}
_SCALARS = frozenset({str, int, float, bool, type(None)})


# ---------------------------------------------------------------------- checks


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def _check_keys(data: object, cls: type[Any], where: str) -> list[str]:
    """Unknown keys (with the closest known name as a hint) and missing required keys."""
    label = where or "(file)"
    if not isinstance(data, dict):
        return [f"{label}: expected a JSON object, got {_kind(data)}"]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = []
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(fields)})"
            problems.append(f"{_join(where, str(key))}: unknown field{hint}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            problems.append(f"{_join(where, name)}: required field missing")
    return problems


def _check_fields(obj: Any, where: str) -> list[str]:
    """Check each field's value against its annotation; ints given for floats become floats."""
    hints = _hints(type(obj))
    problems: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = _join(where, f.name)
        problems += _check_value(value, hints[f.name], path)
        if _is_float(hints[f.name]) and type(value) is int:
            object.__setattr__(obj, f.name, float(value))
    return problems


def _check_value(value: Any, tp: Any, path: str) -> list[str]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return []
        (inner,) = [a for a in args if a is not type(None)]
        return _check_value(value, inner, path)
    if origin is Literal:
        if value in args and isinstance(value, str):
            return []
        return [f"{path}: {value!r} is not one of {', '.join(map(repr, args))}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {_kind(value)}"]
        return [p for n, v in enumerate(value) for p in _check_value(v, args[0], f"{path}[{n}]")]
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    return [] if ok else [f"{path}: expected {_name(tp)}, got {_kind(value)}"]


def _upstream_rules(u: Upstream, where: str) -> list[str]:
    problems = []
    if isinstance(u.url, str) and not (u.url.startswith("http://") and len(u.url) > 7):
        problems.append(f"{_join(where, 'url')}: {u.url!r} is not an http://host:port URL")
    ports = (u.lmcache_init_ports, u.lmcache_alloc_ports)
    if all(isinstance(x, list) for x in ports) and len(ports[0]) != len(ports[1]):
        problems.append(f"{_join(where, 'lmcache_alloc_ports')}: needs one port per lmcache_init_ports entry")
    return problems


_POSITIVE = ("request_timeout_s", "chars_per_token", "health_interval_s", "connect_timeout_s")
_NOT_NEGATIVE = ("local_prefill_threshold", "retries", "max_prefill_queue", "lmcache_notify_timeout_s")


def _config_rules(c: RouterConfig) -> list[str]:
    problems = []
    for name in _POSITIVE:
        v = getattr(c, name)
        if isinstance(v, (int, float)) and v <= 0:
            problems.append(f"{name}: must be greater than 0, got {v}")
    for name in _NOT_NEGATIVE:
        v = getattr(c, name)
        if isinstance(v, (int, float)) and v < 0:
            problems.append(f"{name}: must not be negative, got {v}")
    for name in ("port", "lmcache_proxy_port"):
        v = getattr(c, name)
        if isinstance(v, int) and not 0 <= v <= 65535:
            problems.append(f"{name}: {v} is not a TCP port (0-65535)")
    if isinstance(c.decode, list) and not c.decode:
        problems.append("decode: needs at least one decode instance")
    if c.kv_kind == "lmcache" and c.lmcache_proxy_port is None:
        problems.append("lmcache_proxy_port: kv_kind lmcache needs the port the prefillers notify (pd_proxy_port)")
    return problems


def _hints(cls: type[Any]) -> dict[str, Any]:
    cached = _HINTS.get(cls)
    if cached is None:
        cached = _HINTS[cls] = typing.get_type_hints(cls)
    return cached


_HINTS: dict[type[Any], dict[str, Any]] = {}


def _is_float(tp: Any) -> bool:
    return tp is float or float in typing.get_args(tp)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _name(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), f"a {type(value).__name__}"
    ) + (f" ({value!r})" if isinstance(value, (bool, int, float, str)) else "")
