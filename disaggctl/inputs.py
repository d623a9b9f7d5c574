"""The one reader (and output checker) of every file a user names on the command line or in a spec.

Specs, profiles, topology files, captures, saved plans and model configs are read through
`read_text`/`read_json`; output paths are checked with `output_file`/`output_dir` and written
through `write_text`. Every OS, size, decoding and parse error becomes a `SpecError` with one
issue located at `file:line:col` (exit 2, nothing changed), never a traceback.

Bounds (docs/errors.md "Limits"):
  MAX_SPEC_BYTES  4 MiB   specs and profiles; the 128-rack GB200 NVL72 spec of bench/plan_scale is ~170 KiB
  MAX_DATA_BYTES  64 MiB  JSON inputs (topology, captures, saved plans); a plan of 128 racks is ~10 MiB
Only regular files and pipes are read, and never more than the bound plus one byte, so an endless
device (/dev/zero, /dev/urandom) is refused at once instead of read until memory runs out.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disaggctl.errors import Issue, Location, SpecError, file_error

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

    from disaggctl.topology import TopologyFile

MAX_SPEC_BYTES = 4 * 1024 * 1024
MAX_DATA_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 64


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB"


def read_bytes(path: str | Path, what: str, limit: int) -> bytes:
    """The bytes of a regular file or pipe of at most `limit` bytes."""
    name = str(path)
    try:
        st = os.stat(name)
        if stat.S_ISDIR(st.st_mode):
            raise file_error(name, what, "is a folder, not a file", "name the file itself")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
            raise file_error(name, what, "is not a regular file (a device or socket)", "name a regular file")
        if st.st_size > limit:
            raise file_error(
                name, what, f"is {st.st_size} bytes; the limit is {_mib(limit)}", "is this the right file?"
            )
        with open(name, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise file_error(name, what, f"cannot read: {e.strerror or e}", "check the path and its permissions") from None
    if len(data) > limit:
        raise file_error(name, what, f"is larger than the limit of {_mib(limit)}", "is this the right file?")
    return data


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def decode_text(data: bytes, name: str, what: str) -> str:
    """UTF-8 text without NUL characters (YAML and JSON inputs are text)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        good = data[: e.start].decode("utf-8", errors="replace")
        line, col = _line_col(good, len(good))
        raise file_error(
            name, what, f"is not UTF-8 text (byte 0x{data[e.start]:02x})", "save the file as UTF-8", line, col
        ) from None
    nul = text.find("\0")
    if nul >= 0:
        line, col = _line_col(text, nul)
        raise file_error(name, what, "contains a NUL character (a binary file?)", "save the file as text", line, col)
    return text


def read_text(path: str | Path, what: str, limit: int = MAX_SPEC_BYTES) -> str:
    return decode_text(read_bytes(path, what, limit), str(path), what)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any, limit: int) -> bool:
    """True when `value` nests deeper than `limit` (iterative: no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return False


def parse_json(text: str, name: str, what: str) -> Any:
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise file_error(
            name, what, f"is not valid JSON: {e.msg}", "was it written by disaggctl?", e.lineno, e.colno
        ) from None
    except (ValueError, RecursionError) as e:
        msg = str(e) if isinstance(e, ValueError) else f"nests deeper than {MAX_JSON_DEPTH} levels"
        raise file_error(name, what, f"is not valid JSON: {msg}", "was it written by disaggctl?") from None
    if _depth(data, MAX_JSON_DEPTH):
        raise file_error(name, what, f"nests deeper than {MAX_JSON_DEPTH} levels", "was it written by disaggctl?")
    return data


def read_json(path: str | Path, what: str, limit: int = MAX_DATA_BYTES) -> Any:
    return parse_json(read_text(path, what, limit), str(path), what)


def read_json_object(path: str | Path, what: str, limit: int = MAX_DATA_BYTES) -> dict[str, Any]:
    data = read_json(path, what, limit)
    if not isinstance(data, dict):
        raise file_error(
            str(path), what, f"must be a JSON object, not {type(data).__name__}", "was it written by disaggctl?"
        )
    return data


def model_issues(err: ValidationError, name: str, what: str) -> SpecError:
    """A pydantic error on a JSON input: one issue per field (`file:1:1 topology file hosts.a.gpus: ...`)."""
    issues = []
    for e in err.errors(include_url=False)[:20]:
        field = ".".join(str(x) for x in e["loc"]) or "(top level)"
        issues.append(Issue((), e["msg"], "was it written by disaggctl?", Location(name, 1, 1), f"{what} {field}"))
    return SpecError(issues, name)


def read_model(path: str | Path, what: str, model: type[BaseModel]) -> Any:
    """A JSON input validated by a pydantic model; every error located at the file."""
    from pydantic import ValidationError

    data = read_json_object(path, what)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise model_issues(e, str(path), what) from None


def read_topology(path: str | Path) -> TopologyFile:
    from disaggctl.topology import TopologyFile

    topo: TopologyFile = read_model(path, "topology file", TopologyFile)
    return topo


def read_saved_plan_data(path: str | Path) -> dict[str, Any]:
    """A plan saved by `plan -o FILE`, read with the bounds of every JSON input; its shape is the target
    contract's (`targets.base.read_saved_plan` validates it against `SavedPlan`)."""
    name, what = str(path), "saved plan"
    data = read_json_object(path, what)
    if data.get("format") != "disaggctl-plan":
        raise file_error(
            name, what, "is not a saved plan (no \"format\": \"disaggctl-plan\")",
            "create one with `disaggctl plan SPEC -o FILE`",
        )
    return data


class OutputFormat(StrEnum):
    """`--output` of every command that prints a result."""

    text = "text"
    json = "json"


class RoleName(StrEnum):
    """`--role` of `logs`."""

    prefill = "prefill"
    decode = "decode"
    router = "router"


# --------------------------------------------------------------------------- outputs


def output_file(path: str | Path, what: str) -> Path:
    """A file about to be written: its folder exists and is writable, and it is not a folder."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise file_error(str(p), what, "is a folder; name a file to write", "add a file name")
    if not parent.is_dir():
        raise file_error(str(p), what, f"cannot write: the folder {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise file_error(str(p), what, "cannot write: permission denied", "choose a place you can write to")
    return p


def output_dir(path: str | Path, what: str) -> Path:
    """A folder about to be filled (created when missing): not an existing file, inside a writable folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise file_error(str(p), what, "exists and is not a folder", "name a new or existing folder")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise file_error(str(p), what, f"cannot create it: {probe} is not a folder", "name a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise file_error(str(p), what, f"cannot write: permission denied in {probe}", "choose a place you can write to")
    return p


@contextmanager
def writing(path: str | Path, what: str) -> Iterator[None]:
    """Turn an OS error while writing `path` into a located input error."""
    try:
        yield
    except OSError as e:
        where = e.filename or path
        raise file_error(
            str(where), what, f"cannot write: {e.strerror or e}", "choose a place you can write to"
        ) from None


def write_text(path: str | Path, text: str, what: str) -> Path:
    """Atomic write (temp file + rename) of an output the user named."""
    p = output_file(path, what)
    tmp = p.with_name(f".{p.name}.tmp.{os.getpid()}")
    with writing(p, what):
        try:
            tmp.write_text(text)
            tmp.replace(p)
        finally:
            if tmp.exists():
                tmp.unlink()
    return p


__all__ = [
    "MAX_DATA_BYTES",
    "MAX_SPEC_BYTES",
    "OutputFormat",
    "RoleName",
    "SpecError",
    "decode_text",
    "output_dir",
    "output_file",
    "parse_json",
    "read_bytes",
    "read_json",
    "read_json_object",
    "read_model",
    "read_saved_plan_data",
    "read_text",
    "read_topology",
    "write_text",
    "writing",
]
