"""Load a cluster spec: YAML with positions, profiles merged underneath, strict validation.

Errors from any stage (YAML syntax, pydantic, the cross-field rules in `rules`, placement)
are `SpecError`s whose issues carry `file:line:col` of the field they concern.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from disaggctl.errors import Issue, Location, Path_, SpecError
from disaggctl.resources import data_dir
from disaggctl.spec import ClusterSpec

Positions = dict[Path_, Location]


@dataclass
class LoadedSpec:
    """A validated spec plus where each of its fields was written."""

    spec: ClusterSpec
    file: str
    positions: Positions = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return Path(self.file).resolve().parent

    def locate(self, issues: list[Issue]) -> list[Issue]:
        return [locate_issue(i, self.positions) for i in issues]

    def error(self, issues: list[Issue]) -> SpecError:
        return SpecError(self.locate(issues), self.file)


# --------------------------------------------------------------------------- YAML with positions


class _DupKeyError(Exception):
    def __init__(self, key: str, loc: Location, first: Location) -> None:
        self.key, self.loc, self.first = key, loc, first


def _to_data(node: yaml.Node, file: str, path: Path_, pos: Positions) -> Any:
    loc = Location(file, node.start_mark.line + 1, node.start_mark.column + 1)
    pos.setdefault(path, loc)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        seen: dict[Any, Location] = {}
        for knode, vnode in node.value:
            key = (
                yaml.constructor.SafeConstructor().construct_scalar(knode)
                if isinstance(knode, yaml.ScalarNode)
                else str(knode.value)
            )
            kloc = Location(file, knode.start_mark.line + 1, knode.start_mark.column + 1)
            if key in seen:
                raise _DupKeyError(str(key), kloc, seen[key])
            seen[key] = kloc
            pos[(*path, key)] = kloc
            out[key] = _to_data(vnode, file, (*path, key), pos)
            pos[(*path, key)] = kloc  # the key's own position wins over its value's
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_data(n, file, (*path, i), pos) for i, n in enumerate(node.value)]
    # a bare constructor (no reader/scanner/parser to set up: a SafeLoader per scalar cost ~25 us)
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


# libyaml's composer when PyYAML has it (~10x faster on 2000-host specs); its nodes carry the same
# start marks (line, column). On any error the pure-Python composer parses again: it raises at the
# same place with PyYAML's more precise wording ("found character '\\t'", the alias's name).
_FAST_COMPOSER: type[yaml.SafeLoader] | None = getattr(yaml, "CSafeLoader", None)


def _compose(text: str) -> yaml.Node | None:
    if _FAST_COMPOSER is not None:
        try:
            return yaml.compose(text, Loader=_FAST_COMPOSER)
        except yaml.YAMLError:
            pass
    return yaml.compose(text, Loader=yaml.SafeLoader)


def parse_yaml(text: str, file: str) -> tuple[Any, Positions]:
    """Parse YAML text into plain data and a map from each path to its position."""
    pos: Positions = {}
    try:
        node = _compose(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        loc = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file, 1, 1)
        msg = (e.problem or str(e)).strip()
        raise SpecError(
            [Issue((), f"YAML syntax error: {msg}", "check indentation, colons and quoting near this line", loc)],
            file,
        ) from None
    if node is None:
        return {}, pos
    try:
        data = _to_data(node, file, (), pos)
    except _DupKeyError as e:
        raise SpecError(
            [Issue((e.key,), f"duplicate key {e.key!r} (first at line {e.first.line})", "remove one of them", e.loc)],
            file,
        ) from None
    return data, pos


# --------------------------------------------------------------------------- profiles


def profile_names() -> list[str]:
    return sorted(p.stem for p in data_dir("profiles").glob("*.yaml"))


def _profile_file(name: str, base: Path) -> Path | None:
    candidate = data_dir("profiles") / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    as_path = (base / name).expanduser()
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    return None


def merge_under(base: Any, over: Any) -> Any:
    """Deep-merge `over` on top of `base` (dicts merge, everything else is replaced).

    A mapping with a `kind` that differs from the base's replaces it whole: the keys of one
    kind of KV transfer or target mean nothing to another.
    """
    if isinstance(base, dict) and isinstance(over, dict):
        if "kind" in base and "kind" in over and base["kind"] != over["kind"]:
            return over
        out = dict(base)
        for k, v in over.items():
            out[k] = merge_under(base[k], v) if k in base else v
        return out
    return over


def apply_profiles(data: dict[str, Any], pos: Positions, file: str, extra: list[str]) -> dict[str, Any]:
    raw = data.get("profiles", [])
    names = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, list) else []
    names = [*extra, *names]
    if not names:
        return data
    base: dict[str, Any] = {}
    base_pos: Positions = {}
    for i, name in enumerate(names):
        path: Path_ = ("profiles", i - len(extra)) if i >= len(extra) else ("profiles",)
        pfile = _profile_file(str(name), Path(file).resolve().parent)
        if pfile is None:
            close = difflib.get_close_matches(str(name), profile_names(), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known profiles: {', '.join(profile_names())}"
            raise SpecError([locate_issue(Issue(path, f"unknown profile {name!r}", hint), pos)], file)
        pdata, ppos = parse_yaml(pfile.read_text(), str(pfile))
        if not isinstance(pdata, dict):
            raise SpecError([Issue((), "a profile must be a mapping", None, Location(str(pfile), 1, 1))], file)
        base = merge_under(base, pdata)
        base_pos.update(ppos)
    merged = merge_under(base, data)
    merged["profiles"] = names
    # positions: the spec's own win; fields only a profile set point into the profile file
    for k, v in base_pos.items():
        pos.setdefault(k, v)
    return typing.cast(dict[str, Any], merged)


# --------------------------------------------------------------------------- pydantic errors -> issues


def _unwrap(tp: Any) -> list[Any]:
    """The model classes a field annotation can hold (through Optional, list, dict, unions)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(tp) for m in _unwrap(a)]
    if origin in (list, dict):
        return _unwrap(typing.get_args(tp)[-1])
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return []


def model_at(loc: Path_, data: Any) -> type[BaseModel] | None:
    """The model class that validates the mapping at `loc` (data-path, union tags stripped)."""
    cls: type[BaseModel] = ClusterSpec
    node = data
    for part in loc:
        if isinstance(part, int) or (isinstance(node, dict) and part not in cls.model_fields):
            node = _child(node, part)
            continue
        f = cls.model_fields.get(str(part))
        if f is None:
            return None
        node = node.get(part) if isinstance(node, dict) else None
        candidates = _unwrap(f.annotation)
        if not candidates:
            return None
        if len(candidates) > 1 and isinstance(node, dict):
            kind = node.get("kind")
            match = [c for c in candidates if _kind_of(c) == kind]
            candidates = match or candidates
        cls = candidates[0]
    return cls


def _has(node: Any, part: Any) -> bool:
    if isinstance(node, list):
        return isinstance(part, int) and 0 <= part < len(node)
    return part in node


def _child(node: Any, part: Any) -> Any:
    if isinstance(node, (dict, list)) and _has(node, part):
        return node[part]
    return None


def _kind_of(cls: type[BaseModel]) -> Any:
    f = cls.model_fields.get("kind")
    if f is None:
        return None
    args = typing.get_args(f.annotation)
    return args[0] if args else None


def _data_path(loc: tuple[Any, ...], data: Any) -> Path_:
    """Drop the discriminator tags pydantic puts in locs (`kv_transfer.nixl.port`)."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue
        node = _child(node, part)
        out.append(part)
    return tuple(out)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def issues_from_validation(err: ValidationError, data: Any) -> list[Issue]:
    issues: list[Issue] = []
    for e in err.errors(include_url=False):
        path = _data_path(tuple(e["loc"]), data)
        typ = e["type"]
        msg = e["msg"]
        hint: str | None = None
        if typ == "extra_forbidden":
            key = str(path[-1])
            model = model_at(path[:-1], data)
            allowed = sorted(model.model_fields) if model else []
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            msg = f"unknown key {key!r}"
            hint = (
                f"did you mean {close[0]!r}?" if close else (f"allowed keys: {', '.join(allowed)}" if allowed else None)
            )
        elif typ == "missing":
            msg = f"required field {str(path[-1])!r} is missing"
            hint = "see `disaggctl schema` or docs/spec-reference.md"
        elif typ == "union_tag_invalid" or typ == "union_tag_not_found":
            ctx = e.get("ctx", {})
            msg = f"kind must be one of {ctx.get('expected_tags', '')}" + (
                f" (got {ctx.get('tag')!r})" if ctx.get("tag") else ""
            )
            path = (*path, "kind")
            hint = "set `kind:` to one of the listed values"
        else:
            if "input" in e and not isinstance(e["input"], (dict, list)):
                msg = f"{msg} (got {_short(e['input'])})"
            if typ.endswith("_type") or typ.endswith("_parsing"):
                hint = "check the value's type"
            elif typ in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
                hint = "use a value inside the allowed range"
            elif typ == "literal_error" or typ == "enum":
                hint = "use one of the listed values"
            elif typ == "string_pattern_mismatch":
                hint = "use lowercase letters, digits and dashes" if path and path[-1] == "name" else None
        issues.append(Issue(path, msg, hint))
    return issues


def locate_issue(issue: Issue, pos: Positions) -> Issue:
    if issue.location is not None:
        return issue
    path = issue.path
    while path not in pos and path:
        path = path[:-1]
    loc = pos.get(path)
    return Issue(issue.path, issue.message, issue.hint, loc)


# --------------------------------------------------------------------------- entry points


def load_text(text: str, file: str = "<spec>", profiles: list[str] | None = None) -> LoadedSpec:
    """Parse, merge profiles, validate and check the cross-field rules."""
    from disaggctl.rules import check_spec

    data, pos = parse_yaml(text, file)
    if not isinstance(data, dict):
        raise SpecError(
            [Issue((), "the spec must be a YAML mapping (name:, model:, hosts: ...)", None, Location(file, 1, 1))], file
        )
    data = apply_profiles(data, pos, file, profiles or [])
    try:
        spec = ClusterSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError([locate_issue(i, pos) for i in issues_from_validation(e, data)], file) from None
    loaded = LoadedSpec(spec, file, pos)
    issues = check_spec(spec)
    if issues:
        raise loaded.error(issues)
    return loaded


def load_spec(path: str | Path, profiles: list[str] | None = None) -> LoadedSpec:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SpecError(
            [Issue((), f"cannot read spec: {e.strerror}", "check the path", Location(str(p), 1, 1))], str(p)
        ) from None
    return load_text(text, str(p), profiles)
