"""Errors that carry where in the user's files they come from.

Every error a user can cause ends up as a `SpecError`: a list of issues, each with the spec
path it concerns (`("prefill", "tensor_parallel")`), a message and a hint. The loader knows
the file, line and column of every path and formats them as
`spec.yaml:14:5 prefill.tensor_parallel: must be >= 1 (got 0)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

Path_ = tuple[str | int, ...]


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dotted(path: Path_) -> str:
    """`prefill.env.HF_HOME`, `hosts[0].name`; a key that is not a plain name is quoted (`env['A B']`),
    so a newline in a user's key never splits the one-line message."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not _PLAIN_KEY.fullmatch(str(p)):
            out += f"[{str(p)!r}]"
        else:
            out += f".{p}" if out else str(p)
    return out or "(spec)"


@dataclass(frozen=True)
class Location:
    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Issue:
    """One problem with the spec, at a path inside it."""

    path: Path_
    message: str
    hint: str | None = None
    location: Location | None = None
    subject: str | None = None  # what the issue is about when it is not a spec field ("saved plan")

    def format(self) -> str:
        where = f"{self.location} " if self.location else ""
        text = f"{where}{self.subject or dotted(self.path)}: {self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


class DisaggError(Exception):
    """Base of the errors disaggctl reports to users without a traceback."""

    exit_code = 1


MAX_REPORTED = 50  # more problems than this are counted, not listed (a broken file is not 200,000 errors)


class SpecError(DisaggError):
    """The spec (or a file it names) is invalid. Exit code 2: bad input, nothing was changed."""

    exit_code = 2

    def __init__(self, issues: list[Issue], file: str | None = None) -> None:
        self.issues = issues
        self.file = file
        super().__init__(self.format())

    def format(self) -> str:
        shown = [i.format() for i in self.issues[:MAX_REPORTED]]
        if len(self.issues) > MAX_REPORTED:
            shown.append(
                f"... and {len(self.issues) - MAX_REPORTED} more problems (only the first {MAX_REPORTED} are listed)"
            )
        return "\n".join(shown)


def file_error(
    file: str, subject: str, message: str, hint: str | None = None, line: int = 1, col: int = 1
) -> SpecError:
    """A problem with a whole input file (cannot read it, not UTF-8, not JSON ...), located at line:col."""
    return SpecError([Issue((), message, hint, Location(file, line, col), subject)], file)


@dataclass
class IssueList:
    """Collects issues from the rule checks, then raises them together."""

    issues: list[Issue] = field(default_factory=list)

    def add(self, path: Path_, message: str, hint: str | None = None) -> None:
        self.issues.append(Issue(tuple(path), message, hint))

    def raise_if_any(self) -> None:
        if self.issues:
            raise SpecError(self.issues)
