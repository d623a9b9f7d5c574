"""The bundled UCX version (part of a local NIXL instance's compat fingerprint) is read by loading the
NIXL wheel's real libucp once, then from the user's cache, keyed by the library's path, size and mtime."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from disaggctl.compat import transfer


def _real_libucp() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("nixl_cu12")
    assert spec is not None and spec.origin, "nixl_cu12 is installed by scripts/bootstrap.sh"
    libs = sorted(Path(spec.origin).parent.parent.glob("nixl_cu12.libs/libucp-*.so*"))
    assert libs, "the NIXL wheel bundles libucp"
    return libs[0]


@pytest.fixture
def lib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = _real_libucp()
    (tmp_path / "lib").mkdir()
    for sibling in real.parent.iterdir():  # libucp finds its sibling UCX libraries next to it ($ORIGIN)
        (tmp_path / "lib" / sibling.name).symlink_to(sibling)
    copy = tmp_path / "lib" / real.name
    copy.unlink()
    shutil.copy2(real, copy)  # its own file: the test changes its mtime
    return copy


def test_first_call_loads_the_real_library_then_the_cache_answers(lib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    version = transfer._cached_ucx_version(lib)
    assert version and version[0].isdigit() and version.count(".") >= 2, version  # e.g. 1.23.0, from UCX itself
    saved = json.loads(transfer._ucx_cache_file().read_text())
    assert saved["libraries"][str(lib)]["version"] == version

    def no_load(_: Path) -> str | None:
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(transfer, "_load_ucx_version", no_load)
    assert transfer._cached_ucx_version(lib) == version


def test_a_changed_library_is_asked_again(lib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transfer._cached_ucx_version(lib)
    st = lib.stat()
    os.utime(lib, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a reinstalled wheel
    calls: list[Path] = []
    monkeypatch.setattr(transfer, "_load_ucx_version", lambda p: calls.append(p) or "9.9.9")
    assert transfer._cached_ucx_version(lib) == "9.9.9" and calls == [lib]


def test_an_unusable_cache_is_only_slower(lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # the cache folder cannot be made
    first = transfer._cached_ucx_version(lib)
    assert first == transfer._load_ucx_version(lib)
    (tmp_path / "cache2").mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    transfer._ucx_cache_file().parent.mkdir(parents=True)
    transfer._ucx_cache_file().write_text("{not json")
    assert transfer._cached_ucx_version(lib) == first


def test_environments_side_by_side_keep_their_entries(lib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two venvs (two libucp paths) used in turn: each is loaded once, not on every switch."""
    other = lib.with_name("libucp-other.so")
    shutil.copy2(lib, other)
    calls: list[Path] = []
    monkeypatch.setattr(transfer, "_load_ucx_version", lambda p: calls.append(p) or f"1.0.{len(calls)}")
    first, second = transfer._cached_ucx_version(lib), transfer._cached_ucx_version(other)
    assert [transfer._cached_ucx_version(p) for p in (lib, other, lib)] == [first, second, first]
    assert calls == [lib, other] and first != second


def test_the_oldest_libraries_are_dropped(lib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "_load_ucx_version", lambda p: "1.2.3")
    paths = []
    for i in range(transfer.UCX_CACHE_ENTRIES + 2):
        p = lib.with_name(f"libucp-{i}.so")
        p.write_bytes(b"x")
        paths.append(p)
        transfer._cached_ucx_version(p)
    saved = json.loads(transfer._ucx_cache_file().read_text())["libraries"]
    assert list(saved) == [str(p) for p in paths[-transfer.UCX_CACHE_ENTRIES :]]
