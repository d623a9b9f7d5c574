"""Quoting for the text formats disaggctl writes: shell lines and systemd unit files.

systemd's `ExecStart=` is not a shell: it splits on whitespace, honours double and single
quotes with C-style backslash escapes, expands `$VAR`/`${VAR}` from the environment and `%`
specifiers everywhere. A JSON argument such as `--kv-transfer-config {"kv_role": ...}`
breaks naive quoting, so every word is written as a double-quoted string with `\\`, `"`,
`$` and `%` escaped (`$$`, `%%`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from functools import lru_cache

_SAFE_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")
# What ends a line of a unit file, env file or shell script (the spec's types refuse more: disaggctl.safestr).
_BREAKS = frozenset("\n\r\0")


class QuotingError(ValueError):
    """A value that cannot be represented safely (newline or NUL in a single-line format)."""


def _single_line(value: str, what: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:  # _BREAKS; 3 C scans, not a generator per character
        raise QuotingError(f"{what} must not contain a newline, NUL or other control character: {value!r}")
    return value


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(name: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise QuotingError(f"environment variable name {name!r} must match [A-Za-z_][A-Za-z0-9_]*")
    return name


def shell_word(value: str) -> str:
    """One word for a POSIX shell (newlines are allowed by shlex, but not by our line formats)."""
    return shlex.quote(value)


def shell_line(argv: Iterable[str]) -> str:
    return " ".join(shlex.quote(_single_line(a, "argument")) for a in argv)


@lru_cache(maxsize=8192)  # 128 NVL72 racks: 70,000 words, most of them the same flags and numbers
def systemd_word(value: str) -> str:
    """Quote one argument of `ExecStart=` so systemd passes it through byte for byte."""
    _single_line(value, "argument")
    if value and _SAFE_WORD.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$").replace("%", "%%")
    return f'"{escaped}"'


def systemd_exec(argv: Iterable[str]) -> str:
    return " ".join(systemd_word(a) for a in argv)


@lru_cache(maxsize=8192)
def systemd_env(name: str, value: str) -> str:
    """An `Environment=` assignment: the whole `NAME=value` quoted as one word."""
    _env_name(name)
    _single_line(value, f"environment variable {name}")
    escaped = f"{name}={value}".replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def systemd_value(value: str) -> str:
    """A plain unit setting value (Description=, WorkingDirectory=): only `%` needs escaping."""
    return _single_line(value, "value").replace("%", "%%")


def env_file_line(name: str, value: str) -> str:
    """A line of an `EnvironmentFile=`: systemd accepts double quotes with backslash escapes."""
    _env_name(name)
    _single_line(value, f"environment variable {name}")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    return f'{name}="{escaped}"'
