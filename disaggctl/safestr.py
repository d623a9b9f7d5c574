"""Constrained string types for every spec field whose value lands in a generated file.

A value reaches systemd units, Slurm batch scripts (`#SBATCH` lines and bash), launcher
scripts, the local process table, LMCache YAML or router JSON. Quoting (disaggctl.quoting)
makes a word safe inside one line; these types make sure a value *is* one line and, where a
format has no quoting at all (`#SBATCH` lines, Slurm node lists, unit names), that it only
holds characters that format passes through unchanged.

Every pattern is matched with `fullmatch` (never `re.match("^...$")`: `$` also matches before
a trailing newline, which let `partition: "gpu\\n"` split an `#SBATCH` line). Every type refuses
the characters a line-based format cannot carry: C0 controls (newline, CR, NUL, ESC ...), DEL
and the Unicode line breaks U+0085, U+2028, U+2029. Free text additionally allows a tab.

The types (docs/errors.md lists them with the fields that use them):
  Name         deployment names, unit prefixes: lowercase letters, digits, dashes (48 chars)
  HostName     names of hosts in the spec
  Address      an IPv4 or IPv6 address or a DNS name (validated: 10.10.0.300 is refused)
  BindAddress  an address to listen on (an IP address, `0.0.0.0`, `::`)
  UserName     a Unix user name
  EnvName      an environment variable name
  AbsPath      an absolute path on a host (one line, no control characters)
  ExecPath     an absolute executable path for systemd's ExecStart= (no quotes or backslashes either)
  PathText     a path or command that may be relative (one line)
  SlurmName    a partition, account or qos (a comma list of names)
  SlurmWord    a feature expression on an `#SBATCH` line (constraint: `&`, `|`, `*`, `[]` allowed)
  SlurmNodes   a Slurm node list (exclude)
  SlurmPath    the job folder: also on `#SBATCH --output=`, so no spaces or shell characters
  SlurmMount   a pyxis mount SRC:DST[:FLAGS] (joined with commas, so none inside)
  CpuList      a Linux cpulist (topology files: it goes into CPUAffinity=)
  Text         free text (model ids, extra arguments, environment values, labels)
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator

# Characters no line-based format can carry: C0 controls, DEL, NEL and the Unicode line/paragraph separators.
_LINE_BREAKERS = frozenset([chr(c) for c in range(0x20)] + ["\x7f", "\x85", "\u2028", "\u2029"])
_TEXT_BREAKERS = _LINE_BREAKERS - {"\t"}

NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?")
HOST_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
DNS_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
SLURM_NAME_RE = re.compile(r"[A-Za-z0-9_.,:@+=-]+")
SLURM_WORD_RE = re.compile(r"[A-Za-z0-9_.,:/@+=*&|\[\]-]+")
SLURM_NODES_RE = re.compile(r"[A-Za-z0-9_.,\[\]-]+")
SLURM_PATH_RE = re.compile(r"/[A-Za-z0-9_./+-]*")
SLURM_MOUNT_RE = re.compile(r"[A-Za-z0-9_./:+@-]+")
CPU_LIST_RE = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*")
IMAGE_RE = re.compile(r"[A-Za-z0-9_.:/@+#-]+")


def unsafe_char(value: str, allowed_tab: bool = False) -> str | None:
    """The first character of `value` that a line-based format cannot carry, or None."""
    bad = _TEXT_BREAKERS if allowed_tab else _LINE_BREAKERS
    for c in value:
        if c in bad:
            return c
    return None


def _one_line(value: str, allow_tab: bool = False) -> str:
    c = unsafe_char(value, allow_tab)
    if c is not None:
        raise ValueError(
            f"must be one line: no newline, CR, NUL or other control character (found {c!r} at offset {value.index(c)})"
        )
    return value


def _pattern(regex: re.Pattern[str], what: str) -> AfterValidator:
    def check(value: str) -> str:
        _one_line(value)
        if not regex.fullmatch(value):
            raise ValueError(f"{what} (got {value!r})")
        return value

    return AfterValidator(check)


def check_address(value: str) -> str:
    """An IPv4/IPv6 address (IPv6 optionally in brackets) or a DNS name of valid labels."""
    _one_line(value)
    inner = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if ":" in inner or value.startswith("["):
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"{value!r} is not a valid IPv6 address") from None
        return value
    if re.fullmatch(r"[0-9.]+", value):
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a valid IPv4 address (four numbers 0-255)") from None
        return value
    labels = value[:-1].split(".") if value.endswith(".") else value.split(".")
    if len(value) > 253 or not all(DNS_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"{value!r} is neither an IP address nor a DNS name (letters, digits, dashes, dots)")
    return value


def check_bind(value: str) -> str:
    _one_line(value)
    try:
        ipaddress.ip_address(value[1:-1] if value.startswith("[") and value.endswith("]") else value)
    except ValueError:
        return check_address(value)
    return value


def check_abs_path(value: str) -> str:
    _one_line(value)
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path (got {value!r})")
    return value


def check_exec_path(value: str) -> str:
    """An absolute executable path systemd's ExecStart= accepts (it refuses quotes and backslashes there)."""
    check_abs_path(value)
    bad = next((c for c in value if c in "'\"\\"), None)
    if bad is not None:
        raise ValueError(f"an executable path must not contain quotes or backslashes (found {bad!r}): {value!r}")
    return value


Name = Annotated[str, _pattern(NAME_RE, "use lowercase letters, digits and dashes (at most 48)")]
HostName = Annotated[str, _pattern(HOST_NAME_RE, "use letters, digits, '.', '_' and '-' (at most 63)")]
Address = Annotated[str, AfterValidator(check_address)]
BindAddress = Annotated[str, AfterValidator(check_bind)]
UserName = Annotated[str, _pattern(USER_RE, "a Unix user name: lowercase letters, digits, '_', '.', '-'")]
EnvName = Annotated[str, _pattern(ENV_NAME_RE, "an environment variable name: [A-Za-z_][A-Za-z0-9_]*")]
AbsPath = Annotated[str, AfterValidator(check_abs_path)]
ExecPath = Annotated[str, AfterValidator(check_exec_path)]
PathText = Annotated[str, AfterValidator(_one_line)]
SlurmName = Annotated[str, _pattern(SLURM_NAME_RE, "a Slurm name (list): letters, digits and _ . , : @ + = -")]
SlurmWord = Annotated[str, _pattern(SLURM_WORD_RE, "has characters Slurm does not accept here")]
SlurmNodes = Annotated[str, _pattern(SLURM_NODES_RE, "a Slurm node list: names, ranges [1-4] and commas")]
SlurmPath = Annotated[
    str,
    _pattern(
        SLURM_PATH_RE, "goes on an #SBATCH line (no quoting there): an absolute path of letters, digits, _ . / + -"
    ),
]
SlurmMount = Annotated[str, _pattern(SLURM_MOUNT_RE, "a mount SRC:DST[:FLAGS] without spaces or commas")]
ImageRef = Annotated[str, _pattern(IMAGE_RE, "a container image reference (registry#image:tag or a path)")]
CpuList = Annotated[str, _pattern(CPU_LIST_RE, "a CPU list such as 0-15,32-47")]
Text = Annotated[str, AfterValidator(lambda v: _one_line(v, allow_tab=True))]
