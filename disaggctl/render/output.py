"""Write rendered files into a local folder, one subfolder per host (for `disaggctl render`)."""

from __future__ import annotations

import os
from pathlib import Path

from disaggctl.deployment import Rendered


def write_rendered(rendered: Rendered, out: Path) -> list[Path]:
    """Write each file at OUT/<host>/<its absolute path on the host>, with its mode.

    2304 hosts make 4600 files in 9200 folders: each folder is made once, and a file that is not
    there yet is written in place (no temporary file to rename); one that is is replaced atomically.
    """
    written = []
    made: set[Path] = set()
    for f in rendered.files:
        dest = out / f.host / f.path.lstrip("/")
        if dest.parent not in made:
            dest.parent.mkdir(parents=True, exist_ok=True)
            made.add(dest.parent)
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            _replace(dest, f.content, f.mode)
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(f.content)
                os.fchmod(fh.fileno(), f.mode)
        written.append(dest)
    return written


def _replace(dest: Path, content: str, mode: int) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(content)
    os.chmod(tmp, mode)
    tmp.replace(dest)
