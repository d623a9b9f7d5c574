"""The one jinja2 environment factory: strict (StrictUndefined), no autoescape (values are quoted
by disaggctl.quoting before they reach a template), whitespace control for line formats."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from disaggctl.resources import data_dir

if TYPE_CHECKING:
    import jinja2


@cache
def environment(subdir: str, comment_start: str = "{#", comment_end: str = "#}") -> jinja2.Environment:
    """Templates of templates/SUBDIR. Shell templates move jinja comments off `{#` (`${#array[@]}`).
    jinja2 is imported here, on the first render: an apply starts connecting to its hosts before
    (systemd target), and commands that never render do not import it."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates") / subdir)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        auto_reload=False,  # a CLI run never sees templates change: no stat per get_template
        comment_start_string=comment_start,
        comment_end_string=comment_end,
    )
