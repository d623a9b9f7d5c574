"""Where the data directories (templates/, profiles/) live, installed or in a checkout."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PKG = Path(__file__).resolve().parent


@cache
def data_dir(name: str) -> Path:
    """Return the directory `name` (templates or profiles): wheel copy first, then the checkout."""
    for candidate in (_PKG / "_data" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"disaggctl data directory {name!r} not found next to {_PKG}")
