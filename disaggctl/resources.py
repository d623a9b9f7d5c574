"""Where the data directories (templates/, profiles/) live, installed or in a checkout, and the
operator's cache folder (compiled templates, unit skeletons, the bundled UCX version)."""

from __future__ import annotations

import contextlib
import json
import os
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


def cache_dir() -> Path:
    """The operator's disaggctl cache folder: `$XDG_CACHE_HOME/disaggctl`, else `~/.cache/disaggctl`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "disaggctl"


def write_cache_json(path: Path, data: object) -> None:
    """Replace the cache file `path` with `data` as JSON, atomically, mode 0600 (its folder 0700 when
    made). A cache is an optimisation only: one that cannot be written is skipped."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
