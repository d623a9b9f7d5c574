"""Skeletons of rendered texts: units that differ only in their values share one "shape".

A context (dataclasses of str, int, bool, None and lists of them) is flattened into its leaves,
the truthy strings and ints a template prints, and its shape: the dataclass types, every list's
length and every other value (None, False, "", 0). The template is rendered once per shape with
numbered placeholders in place of the leaves, and the text is split at them into literal parts:

    ["[Unit]\\nDescription=", 2, "\\nPartOf=", 3, ...]

Filling a skeleton is a string join of those parts and the leaves (str()), as jinja2 prints them.
No jinja2 import and no template run per unit: 128 NVL72 racks render ~5,900 units from ~10
shapes. The first text of each new shape is also rendered from the real values and compared;
a template that does more with a value than print it or test it (a comparison, a filter such as
`upper`) then keeps being rendered by jinja2 for that shape (and must not be used with it).

The skeletons live in the operator's cache folder (`.../disaggctl/render/SUBDIR.json`, 0600),
keyed by a sha256 of the folder's templates, the environment's options, jinja2's version, the
template's name and the shape: a later run (a re-render, a no-op apply) imports no jinja2. The
file holds no values, only template text and placeholders' numbers. A file that cannot be read,
is damaged or of another format is ignored (rendered by jinja2, then written anew).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from disaggctl.resources import write_cache_json

FORMAT = 2  # of the cache file; 1 (disaggctl before skeletons) held whole texts
KEEP = 256  # skeletons kept per folder, the newest
Parts = list[str | int]  # literal, leaf number, literal, ... (a literal first and last, maybe "")
Shape = tuple[object, ...]

_MARK = re.compile("\x00([0-9]+)\x00")


class Unsupported(Exception):
    """A context value this module does not flatten (a dict, a float, an object): render it whole."""


def flatten(context: dict[str, object]) -> tuple[Shape, list[str]]:
    """The context's shape (hashable, no values but falsy ones) and its leaves, in a fixed order."""
    shape: list[object] = []
    leaves: list[str] = []
    for name in sorted(context):
        shape.append(name)
        _walk(context[name], shape, leaves)
    return tuple(shape), leaves


def _walk(v: object, shape: list[object], leaves: list[str]) -> None:
    t = type(v)
    if t is str or t is int:  # not bool (type(True) is bool)
        if v:
            shape.append(t is str)
            leaves.append(v if t is str else str(v))  # type: ignore[arg-type]
        else:
            shape.append(repr(v))
    elif v is None or t is bool:
        shape.append(repr(v))
    elif isinstance(v, list | tuple) and (t is list or t is tuple):
        shape.append(len(v))
        for item in v:
            if type(item) is str and item:  # the common leaf, without a call
                shape.append(True)
                leaves.append(item)
            else:
                _walk(item, shape, leaves)
    else:
        shape.append(t.__qualname__)
        for name in _fields(t):
            _walk(getattr(v, name), shape, leaves)


_FIELDS: dict[type, tuple[str, ...]] = {}


def _fields(t: type) -> tuple[str, ...]:
    """A dataclass's field names; Unsupported for any other type."""
    names = _FIELDS.get(t)
    if names is None:
        if not dataclasses.is_dataclass(t):
            raise Unsupported(t.__name__)
        names = _FIELDS[t] = tuple(f.name for f in dataclasses.fields(t))
    return names


def placeholders(context: dict[str, object]) -> dict[str, object]:
    """The context with each leaf replaced by its numbered placeholder (the shape's stand-in)."""
    counter = itertools.count()
    return {name: _stand_in(context[name], counter) for name in sorted(context)}


def _stand_in(v: object, counter: Iterator[int]) -> object:
    t = type(v)
    if (t is str or t is int) and v:
        return f"\x00{next(counter)}\x00"
    if isinstance(v, list | tuple) and (t is list or t is tuple):
        return t(_stand_in(item, counter) for item in v)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.replace(v, **{f: _stand_in(getattr(v, f), counter) for f in _fields(t)})
    return v


def split(text: str) -> Parts:
    """A text rendered from placeholders -> its parts."""
    pieces = _MARK.split(text)
    return [int(p) if i % 2 else p for i, p in enumerate(pieces)]


def fill(parts: Parts, leaves: list[str]) -> str:
    out = list(parts)
    for i in range(1, len(out), 2):
        out[i] = leaves[out[i]]  # type: ignore[index]
    return "".join(out)  # type: ignore[arg-type]


def valid(parts: object, n_leaves: int) -> bool:
    """A skeleton read from the file: literals and leaf numbers in turn, each number a leaf's."""
    if not isinstance(parts, list) or len(parts) % 2 != 1:
        return False
    for i, p in enumerate(parts):
        if i % 2 == 0 and type(p) is not str:
            return False
        if i % 2 == 1 and not (type(p) is int and 0 <= p < n_leaves):
            return False
    return True


# --------------------------------------------------------------------------- the cache file


class Skeletons:
    """One template folder's skeletons: in memory for this process, in the cache file across runs."""

    def __init__(self, path: Path, sources: Callable[[], str]) -> None:
        self.path = path
        self._sources = sources  # digest of what a skeleton depends on besides name and shape
        self._stored: dict[str, Parts] | None = None  # the file's, by key
        self._known: dict[tuple[str, Shape], Parts] = {}  # []: this shape is rendered whole
        self._dirty = False

    def get(self, name: str, shape: Shape, n_leaves: int) -> Parts | None:
        """The skeleton of NAME for SHAPE, from memory or the file; None when unknown, [] when this
        process found that the template gives none for it."""
        hit = self._known.get((name, shape))
        if hit is not None:
            return hit
        parts = self._load().get(self.key(name, shape))
        if parts is None or not valid(parts, n_leaves):
            return None
        self._known[(name, shape)] = parts
        return parts

    def put(self, name: str, shape: Shape, parts: Parts) -> None:
        """A new skeleton ([]: the template did not give one that fills correctly)."""
        self._known[(name, shape)] = parts
        if not parts:
            return
        stored = self._load()
        key = self.key(name, shape)
        stored.pop(key, None)
        stored[key] = parts
        if not self._dirty:
            self._dirty = True
            atexit.register(self.flush)

    def key(self, name: str, shape: Shape) -> str:
        return hashlib.sha256(f"{self._sources()}\0{name}\0{shape!r}".encode()).hexdigest()

    def _load(self) -> dict[str, Parts]:
        if self._stored is None:
            self._stored = {}
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(self.path.read_text())
                if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("skeletons"), dict):
                    self._stored = {k: v for k, v in data["skeletons"].items() if isinstance(k, str)}
        return self._stored

    def flush(self) -> None:
        """Write the newest KEEP skeletons (0600, replaced atomically); a cache that cannot be written is skipped."""
        if not self._dirty:
            return
        self._dirty = False
        items = list(self._load().items())[-KEEP:]
        write_cache_json(self.path, {"format": FORMAT, "skeletons": dict(items)})
