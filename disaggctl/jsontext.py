"""`json.dumps(value, indent=2)`, the same text, faster for large documents when orjson is installed.

The standard library encodes with indent in pure Python (0.2-0.3 s for the 5 MB plan of 9216
GPUs); orjson's OPT_INDENT_2 writes the same text for what plans and router.json hold. Where
the two could differ, the standard library writes it: non-ASCII text and DEL (escaped by json),
integers beyond 64 bits (orjson refuses them), floats below 1e-4 (json: `1e-05`, orjson:
`0.00001`) - found by a scan of orjson's output, which may send a string that merely looks
like such a float the slow way too. One difference remains: NaN and Infinity, which are not
JSON, come out as `null` from orjson (json: `NaN`).
Standard library only when orjson is missing (the router reads and writes with this module).
"""

from __future__ import annotations

import json
import re
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - optional dependency (the router-fast extra)
    orjson = None  # type: ignore[assignment]

# a 1-digit negative exponent (orjson `1e-7`, json `1e-07`); the digit before the `e` is checked apart
# (a regex starting with a class scans 5 MB 20x slower than one starting with a literal)
_EXPONENT = re.compile(rb"e-[0-9](?![0-9])")


def _float_differs(data: bytes) -> bool:
    """Whether orjson's DATA may hold a float json writes otherwise (below 1e-4)."""
    if b"0.0000" in data:  # orjson `0.00001`, json `1e-05`
        return True
    return any(48 <= data[m.start() - 1] <= 57 for m in _EXPONENT.finditer(data, 1))


def dumps_indent2(value: Any) -> str:
    """Exactly `json.dumps(value, indent=2)` (see the module note on NaN)."""
    if orjson is not None:
        try:
            data = orjson.dumps(value, option=orjson.OPT_INDENT_2)
        except TypeError:  # JSONEncodeError: a type or an int orjson does not write
            data = b""
        if data and data.isascii() and b"\x7f" not in data and not _float_differs(data):
            return data.decode("ascii")
    return json.dumps(value, indent=2)
