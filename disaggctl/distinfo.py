"""What the installed distributions declare, read from the `*.dist-info` / `*.egg-info` folders on
sys.path without importing importlib.metadata (with email, zipfile and csv, ~15 ms of a start).

Both answers follow importlib.metadata's rules for folders on sys.path (the first match in path
order wins; names compare lower-case with runs of `-_.` as one `_`). Where this reader cannot
see what importlib.metadata would (a zip file on sys.path, a meta-path finder of its own that
lists distributions), it says so (None) and the callers ask importlib.metadata instead.

`no_pydantic_plugins()`: pydantic calls its plugin loader (`pydantic.plugin._loader.get_plugins`)
on every model and TypeAdapter it builds; the loader imports importlib.metadata and scans every
distribution's entry points once. When no distribution declares a `pydantic` entry point group,
its answer is no plugins, so the `disaggctl` process (cli.main) puts a stand-in module that answers
`()` in its place before pydantic is imported. Any declared group (or a path this reader cannot
see) keeps pydantic's own loader.
"""

from __future__ import annotations

import importlib.machinery
import os
import re
import sys
import types

LOADER = "pydantic.plugin._loader"
_SUFFIXES = (".dist-info", ".egg-info")


def normalize(name: str) -> str:
    """importlib.metadata's form of a distribution name (Prepared.normalize)."""
    return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")


def _others_list_distributions() -> bool:
    """Whether a meta-path finder besides the path finder lists distributions of its own."""
    return any(
        hasattr(finder, "find_distributions") and finder is not importlib.machinery.PathFinder
        for finder in sys.meta_path
    )


def _folders(paths: list[str]) -> list[str] | None:
    """Every metadata folder on paths, in path order; None when a path entry is a file (a zip) or a
    finder lists distributions of its own: not readable here."""
    if _others_list_distributions():
        return None
    out: list[str] = []
    for entry in paths:
        root = entry or "."
        try:
            children = os.listdir(root)
        except NotADirectoryError:
            return None
        except OSError:
            continue
        out += [os.path.join(root, c) for c in children if c.lower().endswith(_SUFFIXES)]
    return out


def _dist_name(folder: str) -> str:
    return normalize(os.path.basename(folder).rpartition(".")[0].partition("-")[0])


def version(name: str, paths: list[str] | None = None) -> str | None:
    """The installed version of distribution `name` (importlib.metadata.version), "" when it is not
    installed; None when this reader cannot tell (ask importlib.metadata)."""
    folders = _folders(sys.path if paths is None else paths)
    if folders is None:
        return None
    want = normalize(name)
    for folder in folders:
        if _dist_name(folder) != want:
            continue
        meta = "METADATA" if folder.lower().endswith(".dist-info") else "PKG-INFO"
        try:
            with open(os.path.join(folder, meta), encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        break
                    key, sep, value = line.partition(":")
                    if sep and key.strip().lower() == "version":
                        return value.strip()
        except OSError:
            pass
        return None  # a folder without a readable version: importlib.metadata decides
    return ""


def installed_version(name: str) -> str | None:
    """importlib.metadata.version(name), None when not installed: from the folders on sys.path
    (`version`), importlib.metadata only where that reader cannot tell."""
    found = version(name)
    if found is not None:
        return found or None
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def declares_entry_point_group(group: str, paths: list[str] | None = None) -> bool | None:
    """Whether any distribution on paths declares entry points of `group`; None: cannot tell."""
    folders = _folders(sys.path if paths is None else paths)
    if folders is None:
        return None
    header = re.compile(rb"^[ \t]*\[" + re.escape(group.encode()) + rb"\][ \t]*\r?$", re.MULTILINE)
    for folder in folders:
        try:
            with open(os.path.join(folder, "entry_points.txt"), "rb") as f:
                if header.search(f.read()):
                    return True
        except OSError:
            continue
    return False


def _no_plugins() -> tuple[()]:
    return ()


def no_pydantic_plugins() -> bool:
    """Put the stand-in loader in place when no distribution declares pydantic plugins (see the module
    docstring); True when it is in place. Only before pydantic's own loader is imported."""
    if LOADER in sys.modules:
        return getattr(sys.modules[LOADER], "STAND_IN", False) is True
    if declares_entry_point_group("pydantic") is not False:
        return False
    loader = types.ModuleType(LOADER, "disaggctl.distinfo: no distribution declares pydantic plugins")
    loader.get_plugins = _no_plugins  # type: ignore[attr-defined]
    loader.STAND_IN = True  # type: ignore[attr-defined]
    sys.modules[LOADER] = loader
    return True
