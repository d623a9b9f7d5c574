"""The one jinja2 environment factory: strict (StrictUndefined), no autoescape (values are quoted
by disaggctl.quoting before they reach a template), whitespace control for line formats.

Compiled templates are cached in the operator's cache folder (`$XDG_CACHE_HOME/disaggctl/jinja2`,
else `~/.cache/...`): compiling them (jinja2's lexer regexes, parsing, code generation) costs
~0.2 s of CPU per run, loading them ~2 ms. jinja2 keys an entry by the template's file and checks
its source's sha1, jinja2's and Python's versions; the folder's name adds the environment's
options (compiled code depends on them). A cache that cannot be read or written is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disaggctl.resources import data_dir

if TYPE_CHECKING:
    import jinja2


@cache
def environment(subdir: str, comment_start: str = "{#", comment_end: str = "#}") -> jinja2.Environment:
    """Templates of templates/SUBDIR. Shell templates move jinja comments off `{#` (`${#array[@]}`).
    jinja2 is imported here, on the first render: an apply starts connecting to its hosts before
    (systemd target), and commands that never render do not import it."""
    import jinja2

    options: dict[str, Any] = {
        "keep_trailing_newline": True,
        "trim_blocks": True,
        "lstrip_blocks": True,
        "autoescape": False,
        "comment_start_string": comment_start,
        "comment_end_string": comment_end,
    }
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

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "disaggctl" / "jinja2" / hashlib.sha256(options.encode()).hexdigest()[:16]
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return None
    return _Quiet(str(folder))
