"""The one jinja2 environment factory: strict (StrictUndefined), no autoescape (values are quoted
by disaggctl.quoting before they reach a template), whitespace control for line formats.

Compiled templates are cached in the operator's cache folder (`$XDG_CACHE_HOME/disaggctl/jinja2`,
else `~/.cache/...`): compiling them (jinja2's lexer regexes, parsing, code generation) costs
~0.2 s of CPU per run, loading them ~2 ms. jinja2 keys an entry by the template's file and checks
its source's sha1, jinja2's and Python's versions; the folder's name adds the environment's
options (compiled code depends on them). A cache that cannot be read or written is skipped.

`render()` (the systemd units) goes through skeletons (render/shapes.py): one jinja2 render per
shape of context, kept in the same cache folder (`render/SUBDIR.json`); filling one is a join.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disaggctl.render import shapes
from disaggctl.resources import cache_dir, data_dir

if TYPE_CHECKING:
    import jinja2


_OPTIONS: dict[str, Any] = {"keep_trailing_newline": True, "trim_blocks": True, "lstrip_blocks": True,
                            "autoescape": False}  # fmt: skip


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

    folder = cache_dir() / "jinja2" / hashlib.sha256(options.encode()).hexdigest()[:16]
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return None
    return _Quiet(str(folder))


# --------------------------------------------------------------------------- skeletons


def render(subdir: str, name: str, **context: object) -> str:
    """environment(subdir).get_template(name).render(**context), filled into the skeleton of the
    context's shape (disaggctl/render/shapes.py) when there is one: in memory, or in the operator's
    cache folder (`.../disaggctl/render/SUBDIR.json`). jinja2 is imported and run only for a shape
    not seen before (then once with placeholders, once with the values, compared) or a context
    shapes.py does not flatten. For templates without secret values only."""
    try:
        shape, leaves = shapes.flatten(context)
    except shapes.Unsupported:
        return environment(subdir).get_template(name).render(**context)
    known = _skeletons(subdir)
    parts = known.get(name, shape, len(leaves))
    if parts:
        return shapes.fill(parts, leaves)
    template = environment(subdir).get_template(name)
    text = template.render(**context)
    if parts is None:
        known.put(name, shape, _skeleton(template, context, leaves, text))
    return text


def _skeleton(template: jinja2.Template, context: dict[str, object], leaves: list[str], text: str) -> shapes.Parts:
    """The shape's skeleton when it fills into exactly `text`, else [] (rendered whole from now on)."""
    try:
        parts = shapes.split(template.render(**shapes.placeholders(context)))
    except Exception:  # a template doing arithmetic or calls on a value: not a skeleton template
        return []
    if not shapes.valid(parts, len(leaves)) or shapes.fill(parts, leaves) != text:
        return []
    return parts


@cache
def _sources(subdir: str) -> str:
    """A digest of the folder's templates, the environment's options and jinja2's version."""
    h = hashlib.sha256(repr(_OPTIONS).encode())
    spec = importlib.util.find_spec("jinja2")
    jinja = [Path(spec.origin)] if spec and spec.origin else []
    for path in [*sorted((data_dir("templates") / subdir).iterdir()), *jinja]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@cache
def _skeletons(subdir: str) -> shapes.Skeletons:
    return shapes.Skeletons(cache_dir() / "render" / f"{subdir}.json", lambda: _sources(subdir))
