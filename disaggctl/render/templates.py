"""The one jinja2 environment factory: strict (StrictUndefined), no autoescape (values are quoted
by disaggctl.quoting before they reach a template), whitespace control for line formats.

Compiled templates are cached in the operator's cache folder (`$XDG_CACHE_HOME/disaggctl/jinja2`,
else `~/.cache/...`): compiling them (jinja2's lexer regexes, parsing, code generation) costs
~0.2 s of CPU per run, loading them ~2 ms. jinja2 keys an entry by the template's file and checks
its source's sha1, jinja2's and Python's versions; the folder's name adds the environment's
options (compiled code depends on them). A cache that cannot be read or written is skipped.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import json
import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disaggctl.resources import data_dir

if TYPE_CHECKING:
    import jinja2


_OPTIONS: dict[str, Any] = {"keep_trailing_newline": True, "trim_blocks": True, "lstrip_blocks": True,
                            "autoescape": False}  # fmt: skip


def _cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "disaggctl"


@cache
def environment(subdir: str, comment_start: str = "{#", comment_end: str = "#}") -> jinja2.Environment:
    """Templates of templates/SUBDIR. Shell templates move jinja comments off `{#` (`${#array[@]}`).
    jinja2 is imported here, on the first render: an apply starts connecting to its hosts before
    (systemd target), and commands that never render do not import it."""
    import jinja2

    options: dict[str, Any] = {**_OPTIONS, "comment_start_string": comment_start, "comment_end_string": comment_end}
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates") / subdir)),
        undefined=jinja2.StrictUndefined,
        auto_reload=False,  # a CLI run never sees templates change: no stat per get_template
        bytecode_cache=_bytecode_cache(repr(sorted(options.items()))),
        **options,
    )


def _bytecode_cache(options: str) -> jinja2.BytecodeCache | None:
    import jinja2

    class _Quiet(jinja2.FileSystemBytecodeCache):
        def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
            try:
                super().load_bytecode(bucket)
            except (OSError, ValueError, EOFError):  # unreadable or damaged: compile from source
                bucket.reset()

        def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
            with contextlib.suppress(OSError):  # a read-only or full cache folder: next run compiles again
                super().dump_bytecode(bucket)

    folder = _cache_home() / "jinja2" / hashlib.sha256(options.encode()).hexdigest()[:16]
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return None
    return _Quiet(str(folder))


# --------------------------------------------------------------------------- rendered-text cache


def render(subdir: str, name: str, **context: object) -> str:
    """environment(subdir).get_template(name).render(**context), remembered in the operator's cache
    folder (`.../disaggctl/render/SUBDIR.json`) under a sha256 of everything the text depends on:
    every template of the folder, the environment's options, jinja2's version, and the context's
    repr (dataclasses of plain values). An apply that renders what it rendered before (a no-op,
    a re-plan) does not import jinja2 (~50 ms of CPU). Contexts whose repr is not plain data
    (`<... at 0x...>`) are rendered every time. For templates without secret values only."""
    text = repr(sorted(context.items()))
    if " at 0x" in text:
        return environment(subdir).get_template(name).render(**context)
    key = hashlib.sha256(f"{_sources(subdir)}\0{name}\0{text}".encode()).hexdigest()
    cache = _rendered(subdir)
    hit = cache.get(key)
    if hit is not None:
        return hit
    out = environment(subdir).get_template(name).render(**context)
    cache[key] = out
    if not _dirty:
        atexit.register(_flush)
    _dirty.add(subdir)
    return out


_KEEP = 1024  # texts kept per folder (the newest; ~1.5 KB each for a unit)
_dirty: set[str] = set()


@cache
def _sources(subdir: str) -> str:
    """A digest of the folder's templates, the environment's options and jinja2's version."""
    h = hashlib.sha256(repr(_OPTIONS).encode())
    spec = importlib.util.find_spec("jinja2")
    jinja = [Path(spec.origin)] if spec and spec.origin else []
    for path in [*sorted((data_dir("templates") / subdir).iterdir()), *jinja]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _render_file(subdir: str) -> Path:
    return _cache_home() / "render" / f"{subdir}.json"


@cache
def _rendered(subdir: str) -> dict[str, str]:
    try:
        data = json.loads(_render_file(subdir).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _flush() -> None:
    for subdir in sorted(_dirty):
        items = list(_rendered(subdir).items())[-_KEEP:]
        path = _render_file(subdir)
        with contextlib.suppress(OSError):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(dict(items), f)
            os.replace(tmp, path)
    _dirty.clear()
