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

from disaggctl.errors import MAX_REPORTED, Issue, Location, Path_, SpecError, file_error
from disaggctl.inputs import MAX_SPEC_BYTES, read_text
from disaggctl.resources import data_dir
from disaggctl.safestr import unsafe_char
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


MAX_DEPTH = 64  # nesting of mappings and lists; a real spec nests 5 deep
MAX_EVENTS = 50_000  # YAML events (keys, values, starts/ends) before composing; the 128-rack GB200 spec has 18,500
MAX_NODES = 50_000  # values after alias expansion ("billion laughs"); the 128-rack GB200 spec has ~9,300
MAX_PROFILES = 32


class _InputProblem(Exception):
    """A located problem found while turning YAML nodes into data (dup key, bound, bad tag)."""

    def __init__(self, path: Path_, message: str, hint: str | None, loc: Location) -> None:
        self.issue = Issue(path, message, hint, loc)


def _loc(file: str, mark: Any) -> Location:
    return Location(file, mark.line + 1, mark.column + 1) if mark is not None else Location(file, 1, 1)


# libyaml when it is there: about 4x faster on big specs (the 128-rack GB200 spec)
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_STR_TAG = "tag:yaml.org,2002:str"
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def _check_depth(text: str, file: str) -> None:
    """Refuse nesting beyond MAX_DEPTH and more than MAX_EVENTS events from the (fast, C) event stream,
    before composing: composing costs ~25 us per node in Python objects."""
    depth = 0
    for n, ev in enumerate(yaml.parse(text, Loader=_Loader)):
        if n >= MAX_EVENTS:
            raise _InputProblem(
                (),
                f"more than {MAX_EVENTS} YAML keys and values",
                "a spec has a few thousand; is this a spec?",
                _loc(file, ev.start_mark),
            )
        if isinstance(ev, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise _InputProblem(
                    (),
                    f"nesting deeper than {MAX_DEPTH} levels",
                    "a spec nests a few levels; is this a spec?",
                    _loc(file, ev.start_mark),
                )
        elif isinstance(ev, _CLOSE):
            depth -= 1


class _Builder:
    """Plain data from composed YAML nodes, with positions, within the nesting and size bounds."""

    def __init__(self, file: str, pos: Positions) -> None:
        self.file = file
        self.pos = pos
        self.nodes = 0
        self.constructor = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, path: Path_) -> Any:
        loc = _loc(self.file, node.start_mark)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _InputProblem(
                path[:4],
                f"more than {MAX_NODES} values once aliases are expanded",
                "a spec has a few thousand values; remove alias bombs (&a / *a repeated)",
                loc,
            )
        if len(path) > MAX_DEPTH:
            raise _InputProblem(
                path[:4],
                f"nesting deeper than {MAX_DEPTH} levels (a recursive alias?)",
                "an alias (*name) must not refer to a list or mapping that contains it",
                loc,
            )
        self.pos.setdefault(path, loc)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(n, (*path, i)) for i, n in enumerate(node.value)]
        return self._scalar(node, path, loc)

    def _scalar(self, node: yaml.Node, path: Path_, loc: Location) -> Any:
        if node.tag == _STR_TAG:  # most values: what SafeConstructor gives a str scalar, without its lookups
            return node.value
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            raise _InputProblem(
                path,
                f"unsupported YAML value: {problem.strip()}",
                "write a plain value: YAML tags (!name, !!type) other than the standard ones are not supported",
                loc,
            ) from None
        except (ValueError, TypeError, OverflowError) as e:
            raise _InputProblem(
                path,
                f"value {node.value!r} does not match its tag {node.tag}: {e}",
                "remove the tag or fix the value",
                loc,
            ) from None

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        seen: dict[Any, Location] = {}
        for knode, vnode in node.value:
            kloc = _loc(self.file, knode.start_mark)
            if not isinstance(knode, yaml.ScalarNode):
                kind = "a list" if isinstance(knode, yaml.SequenceNode) else "a mapping"
                raise _InputProblem(
                    path,
                    f"a key is {kind}; keys must be plain names",
                    "check the indentation and the `- ` and `? ` markers",
                    kloc,
                )
            key = self._scalar(knode, path, kloc)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key (a tagged scalar that built a list)
                raise _InputProblem(path, "a key must be a plain name", None, kloc) from None
            if first is not None:
                raise _InputProblem(
                    (str(key),), f"duplicate key {str(key)!r} (first at line {first.line})", "remove one of them", kloc
                )
            seen[key] = kloc
            self.pos[(*path, key)] = kloc
            out[key] = self.build(vnode, (*path, key))
            self.pos[(*path, key)] = kloc  # the key's own position wins over its value's
        return out


def parse_yaml(text: str, file: str) -> tuple[Any, Positions]:
    """Parse YAML text into plain data and a map from each path to its position (bounded)."""
    pos: Positions = {}
    if len(text) > MAX_SPEC_BYTES:
        raise file_error(file, "spec", f"is larger than the limit of {MAX_SPEC_BYTES // (1024 * 1024)} MiB")
    try:
        _check_depth(text, file)
        node = yaml.compose(text, Loader=_Loader)
        if node is None:
            return {}, pos
        data = _Builder(file, pos).build(node, ())
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        char = chr(e.character) if isinstance(e.character, int) else str(e.character)
        raise file_error(
            file, "spec", f"has a control character {char!r} YAML does not allow", "remove it", line, col
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        msg = (e.problem or str(e)).strip()
        raise SpecError(
            [
                Issue(
                    (),
                    f"YAML syntax error: {msg}",
                    "check indentation, colons and quoting near this line",
                    _loc(file, mark),
                )
            ],
            file,
        ) from None
    except yaml.YAMLError as e:  # a reader error (a control character) without a mark
        raise file_error(
            file, "spec", f"is not valid YAML: {str(e).splitlines()[0]}", "save the file as plain text"
        ) from None
    except _InputProblem as e:
        raise SpecError([e.issue], file) from None
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
    if not isinstance(raw, (str, list)) or (isinstance(raw, list) and not all(isinstance(n, str) for n in raw)):
        raise SpecError(
            [locate_issue(Issue(("profiles",), "must be a list of profile names", "e.g. profiles: [h100, chat]"), pos)],
            file,
        )
    names = [*extra, *([raw] if isinstance(raw, str) else raw)]
    if not names:
        return data
    if len(names) > MAX_PROFILES:
        raise SpecError([locate_issue(Issue(("profiles",), f"more than {MAX_PROFILES} profiles"), pos)], file)
    base: dict[str, Any] = {}
    base_pos: Positions = {}
    for i, name in enumerate(names):
        path: Path_ = ("profiles", i - len(extra)) if i >= len(extra) else ("profiles",)
        bad = unsafe_char(str(name))
        if bad is not None:
            raise SpecError([locate_issue(Issue(path, f"profile name has a control character {bad!r}"), pos)], file)
        pfile = _profile_file(str(name), Path(file).resolve().parent)
        if pfile is None:
            close = difflib.get_close_matches(str(name), profile_names(), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known profiles: {', '.join(profile_names())}"
            raise SpecError([locate_issue(Issue(path, f"unknown profile {name!r}", hint), pos)], file)
        pdata, ppos = parse_yaml(read_text(pfile, "profile"), str(pfile))
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


def _kinds_at(path: Path_, data: Any) -> list[str]:
    """The `kind:` values the union at `path` accepts."""
    parent = model_at(path[:-1], data) if path else None
    f = parent.model_fields.get(str(path[-1])) if parent is not None and path else None
    if f is None:
        return []
    return [str(k) for k in (_kind_of(c) for c in _unwrap(f.annotation)) if k is not None]


def issues_from_validation(err: ValidationError, data: Any) -> list[Issue]:
    issues: list[Issue] = []
    errors = err.errors(include_url=False)
    shown = errors if len(errors) <= MAX_REPORTED else errors[: MAX_REPORTED - 1]
    for e in shown:
        path = _data_path(tuple(x for x in e["loc"] if x != "[key]"), data)
        typ = e["type"]
        msg = e["msg"].removeprefix("Value error, ")
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
            kinds = ", ".join(_kinds_at(path, data)) or str(ctx.get("expected_tags", ""))
            msg = (
                f"kind must be one of {kinds} (got {ctx.get('tag')!r})"
                if ctx.get("tag")
                else f"`kind:` is missing; it must be one of {kinds}"
            )
            path = (*path, "kind")
            hint = "set `kind:` to one of the listed values"
        else:
            already = "input" in e and ("(got " in msg or repr(e["input"]) in msg)
            if "input" in e and not isinstance(e["input"], (dict, list)) and not already:
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
    if len(errors) > len(shown):
        issues.append(Issue((), f"{len(errors) - len(shown)} more problems not listed", "fix the ones above first"))
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
    from disaggctl.input_checks import input_checks
    from disaggctl.rules import check_spec

    data, pos = parse_yaml(text, file)
    if data == {} and not pos:
        raise file_error(file, "spec", "is empty", "start from one of the examples/ (name:, model:, hosts: ...)")
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
    issues = check_spec(spec) + input_checks(spec)
    if issues:
        raise loaded.error(issues)
    return loaded


def load_spec(path: str | Path, profiles: list[str] | None = None) -> LoadedSpec:
    from disaggctl.gcpause import no_cyclic_gc

    with no_cyclic_gc():  # a million objects at 9216 GPUs, all kept (disaggctl/gcpause.py)
        return load_text(read_text(path, "spec"), str(path), profiles)
