"""dumps_indent2 writes json.dumps(indent=2)'s text (orjson when installed, json where they differ);
the router's trusted Upstream constructor keeps the rules; fingerprint option parsing matches a scan."""

from __future__ import annotations

import json
from typing import Any

import pytest

from disaggctl.compat.fingerprint import options
from disaggctl.jsontext import dumps_indent2
from disaggctl.router.config import ConfigError, Upstream

CASES: list[Any] = [
    {"a": [], "b": {}, "c": [1, {"x": None, "y": True}], "d": '</script>"\\\n\t\x00\b\f\r\x1f\x7f'},
    [1e-7, 1.5e-5, 9.99e-5, 1e-4, 1e16, 5e22, 0.1 + 0.2, -0.0, 600.0, 2**63 - 1],
    2**70,  # beyond orjson's 64 bits
    {"name": "caf\u00e9", "sep": "\u2028"},  # non-ASCII: json escapes it
    {1: 2},  # a non-string key: json converts it
    ("tuple", [[]]),
]


@pytest.mark.parametrize("value", CASES)
def test_dumps_indent2_is_json_dumps_indent2(value: Any) -> None:
    assert dumps_indent2(value) == json.dumps(value, indent=2)


def test_trusted_upstream_keeps_rules() -> None:
    u = Upstream.trusted("decode-0", "http://10.0.0.2:8200", None, [], [])
    assert u == Upstream(name="decode-0", url="http://10.0.0.2:8200")
    with pytest.raises(ConfigError, match="url"):
        Upstream.trusted("decode-0", "10.0.0.2:8200", None, [], [])
    with pytest.raises(ConfigError, match="lmcache_alloc_ports"):
        Upstream.trusted("decode-0", "http://h:1", "h", [1, 2], [3])


def _scan(argv: list[str], flag: str) -> str | None:  # the per-flag scan options() replaced
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def test_options_match_a_scan_per_flag() -> None:
    argv = ["vllm", "serve", "m", "--dtype", "half", "--dtype=bfloat16", "--x", "--dtype", "--q=a=b", "--q"]
    got = options(argv)
    for flag in ("--dtype", "--x", "--q", "serve", "--missing"):
        assert got.get(flag) == _scan(argv, flag), flag
