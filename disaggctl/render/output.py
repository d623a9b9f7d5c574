"""Write rendered files into a local folder, one subfolder per host (for `disaggctl render`)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from disaggctl.deployment import Rendered, RenderedFile

_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def write_rendered(rendered: Rendered, out: Path) -> list[str]:
    """Write each file at OUT/<host>/<its absolute path on the host>, with its mode; the paths written.

    128 NVL72 racks (2304 hosts) make 5,900 files in 9,200 folders, mostly system time: each
    folder is made once, top-down (`_mkdirs` remembers them); a file not there yet is written in
    place with its mode set at open (os.open/os.write, no file object, a chmod only where the umask
    takes bits the mode has); one that is there already is left alone when its bytes and mode
    are the same (reading is cheaper than writing a copy), else replaced atomically. From
    PARALLEL_FROM files on, WORKERS threads write a share of the hosts each: the kernel's part of
    a mkdir or a create (most of the time) runs without the GIL, on another core.
    """
    root = os.fspath(out)
    os.makedirs(root, exist_ok=True)
    base = root.rstrip("/") + "/"
    dests = [f"{base}{f.host}/{f.path.lstrip('/')}" for f in rendered.files]
    jobs = list(zip(dests, rendered.files, strict=True))
    made = {root, base, base.rstrip("/")}
    umask = _umask()
    workers = min(WORKERS, os.cpu_count() or 1) if len(jobs) >= PARALLEL_FROM else 1
    if workers == 1:
        _write(jobs, made, umask)
        return dests
    by_host: dict[str, list[tuple[str, RenderedFile]]] = {}
    for job in jobs:  # a host's files stay in one thread, in their order
        by_host.setdefault(job[1].host, []).append(job)
    shares: list[list[tuple[str, RenderedFile]]] = [[] for _ in range(workers)]
    for i, host_jobs in enumerate(by_host.values()):
        shares[i * workers // len(by_host)].extend(host_jobs)
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_write_share, args=(share, set(made), umask, errors)) for share in shares[1:]]
    for t in threads:
        t.start()
    _write_share(shares[0], made, umask, errors)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return dests


WORKERS = 4
PARALLEL_FROM = 512


def _write_share(jobs: list[tuple[str, RenderedFile]], made: set[str], umask: int, errors: list[BaseException]) -> None:
    try:
        _write(jobs, made, umask)
    except BaseException as e:  # raised by the caller, after every thread is done
        errors.append(e)


def _write(jobs: list[tuple[str, RenderedFile]], made: set[str], umask: int) -> None:
    for dest, f in jobs:
        folder = dest[: dest.rindex("/")]
        if folder not in made:
            _mkdirs(folder, made)
        data = f.content.encode()
        try:
            fd = os.open(dest, _NEW, f.mode)
        except FileExistsError:
            _update(dest, data, f.mode)
            continue
        try:
            _write_all(fd, data)
            if f.mode & umask:
                os.fchmod(fd, f.mode)
        finally:
            os.close(fd)


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
