"""Write rendered files into a local folder, one subfolder per host (for `disaggctl render`)."""

from __future__ import annotations

import os
from pathlib import Path

from disaggctl.deployment import Rendered


def write_rendered(rendered: Rendered, out: Path) -> list[Path]:
    """Write each file at OUT/<host>/<its absolute path on the host>, with its mode."""
    written = []
    for f in rendered.files:
        dest = out / f.host / f.path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_text(f.content)
        os.chmod(tmp, f.mode)
        tmp.replace(dest)
        written.append(dest)
    return written
