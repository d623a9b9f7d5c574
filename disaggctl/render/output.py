"""Write rendered files into a local folder, one subfolder per host (for `disaggctl render`)."""

from __future__ import annotations

import os
from pathlib import Path

from disaggctl.deployment import Rendered

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def write_rendered(rendered: Rendered, out: Path) -> list[str]:
    """Write each file at OUT/<host>/<its absolute path on the host>, with its mode; the paths written.

    128 NVL72 racks (2304 hosts) make 5,900 files in 9,200 folders, mostly system time: each
    folder is made once, top-down (`_mkdirs` remembers them); a file not there yet is written in
    place with its mode set at open (os.open/os.write, no file object, a chmod only where the umask
    takes bits the mode has); one that is there already is left alone when its bytes and mode
    are the same (reading is cheaper than writing a copy), else replaced atomically.
    """
    root = os.fspath(out)
    os.makedirs(root, exist_ok=True)
    base = root.rstrip("/") + "/"
    made = {root, base, base.rstrip("/")}
    umask = _umask()
    written = []
    for f in rendered.files:
        dest = f"{base}{f.host}/{f.path.lstrip('/')}"
        folder = dest[: dest.rindex("/")]
        if folder not in made:
            _mkdirs(folder, made)
        data = f.content.encode()
        try:
            fd = os.open(dest, _NEW, f.mode)
        except FileExistsError:
            _update(dest, data, f.mode)
        else:
            try:
                _write_all(fd, data)
                if f.mode & umask:
                    os.fchmod(fd, f.mode)
            finally:
                os.close(fd)
        written.append(dest)
    return written


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mkdirs(folder: str, made: set[str]) -> None:
    """`folder` and the parents not made yet (one mkdir each, instead of failing ones first)."""
    missing = []
    while folder not in made:
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for m in reversed(missing):
        try:
            os.mkdir(m)
        except FileExistsError:
            if not os.path.isdir(m):
                raise
        made.add(m)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _update(dest: str, data: bytes, mode: int) -> None:
    """A file that is there: kept when it holds these bytes with this mode, else replaced atomically."""
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:  # a link, a folder, unreadable: replaced
        fd = -1
    if fd >= 0:
        try:
            st = os.fstat(fd)
            same = (st.st_mode & 0o7777) == mode and st.st_size == len(data) and os.read(fd, len(data) + 1) == data
        finally:
            os.close(fd)
        if same:
            return
    tmp = f"{dest}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, dest)
