"""Secrets (`target.secrets`) on every target: where the values come from, the one file they land in,
who reads it, and what is written instead of a value everywhere else.

- Values come from the operator's environment; a name not set there is read from
  `target.secrets_file` (KEY=VALUE lines on the operator's machine, mode 0600 or stricter).
- They land in exactly one file per deployment and host, mode 0600 (`secrets.env`), in a format that
  both systemd's `EnvironmentFile=` and bash's `.` read the same way (double quotes, `\\ \" \\$ \\``
  escaped; no newlines). systemd attaches it to the engine units, a Slurm launcher sources it, the
  local supervisor reads it when it starts an engine.
- Only engines (prefill/decode and their workers: they download the model) read it, never the router.
- Everything else (argv, the Slurm script, `plan`, `render -o`, saved plans) carries names only;
  `render -o` writes PLACEHOLDER where a value would be. Error messages name the secret, never its value.

Standard library only: the local supervisor imports this module to read the file.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from disaggctl.errors import DisaggError

if TYPE_CHECKING:
    from disaggctl.deployment import Process
    from disaggctl.spec import ClusterSpec

FILE_NAME = "secrets.env"
PLACEHOLDER = "<secret: written from the operator's environment at apply time>"
HEADER = "# disaggctl secrets (mode 0600): read by the prefill/decode processes only"
REDACTED = "<redacted>"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def names(spec: ClusterSpec) -> list[str]:
    """The secret names the spec's target declares (every target kind has `secrets`)."""
    return list(getattr(spec.target, "secrets", []) or [])


def needs(p: Process) -> bool:
    """Whether the process reads the secrets: engines do (model downloads, API keys), the router never."""
    return p.role.value != "router"


def _check_value(name: str, value: str) -> None:
    if any(c in value for c in "\n\r\0"):
        raise DisaggError(
            f"target.secrets: the value of {name} contains a newline or NUL; "
            "an environment file holds one line per variable (the value is not shown)"
        )


def operator_values(spec: ClusterSpec, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The values of the spec's secrets: the operator's environment first, then target.secrets_file.
    A name set in neither is an error that names it (never a value)."""
    want = names(spec)
    if not want:
        return {}
    env = os.environ if environ is None else environ
    values = {k: env[k] for k in want if k in env}
    missing = [k for k in want if k not in values]
    source: str | None = getattr(spec.target, "secrets_file", None)
    if missing and source:
        from_file = read_source_file(source)
        values.update({k: from_file[k] for k in missing if k in from_file})
        missing = [k for k in want if k not in values]
    if missing:
        where = f" nor in target.secrets_file {source}" if source else ""
        raise DisaggError(
            f"target.secrets: {', '.join(missing)} not set in your environment{where}; "
            f"export {missing[0]}=... (or list it in a mode-0600 target.secrets_file) before running this command"
        )
    for k, v in values.items():
        _check_value(k, v)
    return {k: values[k] for k in want}


def read_source_file(path: str) -> dict[str, str]:
    """The operator's secrets file: must be theirs alone (like an SSH key), KEY=VALUE lines."""
    p = Path(os.path.expanduser(path))
    try:
        st = p.stat()
        text = p.read_text()
    except OSError as e:
        raise DisaggError(f"target.secrets_file: cannot read {p}: {e.strerror or e}") from None
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise DisaggError(
            f"target.secrets_file: {p} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 600 {p}`"
        )
    return parse(text, str(p))


def _unquote(raw: str, where: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return re.sub(r'\\([\\"$`])', r"\1", raw[1:-1])
    if raw[:1] in ("'", '"'):
        raise DisaggError(f"{where}: unterminated quote (the value is not shown)")
    return raw


def parse(text: str, where: str = "secrets file") -> dict[str, str]:
    """KEY=VALUE lines (`export` allowed; '...' literal; "..." with \\ escapes; # comments)."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise DisaggError(f"{where}:{n}: expected NAME=VALUE (the line is not shown)")
        out[m.group(1)] = _unquote(m.group(2), f"{where}:{n}")
    return out


def _line(name: str, value: str) -> str:
    if not _NAME.match(name):
        raise DisaggError(f"target.secrets: {name!r} is not an environment variable name")
    _check_value(name, value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    return f'{name}="{escaped}"'


def file_text(secret_names: Iterable[str], values: Mapping[str, str] | None) -> str:
    """The secrets file. values None (render -o, destroy, logs): PLACEHOLDER for every value."""
    lines = [HEADER]
    for name in secret_names:
        if values is not None and name not in values:
            raise DisaggError(
                f"target.secrets: {name} is not set in your environment; export it before `disaggctl apply`"
            )
        lines.append(_line(name, values[name] if values is not None else PLACEHOLDER))
    return "\n".join(lines) + "\n"


def digest(deployment: str, values: Mapping[str, str]) -> str:
    """A short keyed hash of the values: what a process table compares to restart engines on a change."""
    h = hashlib.sha256(f"disaggctl-secrets\0{deployment}\0".encode())
    for k in sorted(values):
        h.update(k.encode() + b"=" + values[k].encode() + b"\0")
    return h.hexdigest()[:16]


def write_private(path: Path, text: str) -> None:
    """Write the file mode 0600 from its first byte (temp file + rename), its folder 0700 if new."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def known_values(spec: ClusterSpec) -> list[str]:
    """The secret values this operator has (for redacting quoted output); none when they are not set."""
    try:
        return list(operator_values(spec).values())
    except DisaggError:
        env = os.environ
        return [env[k] for k in names(spec) if k in env]


def redact(text: str, values: Iterable[str]) -> str:
    """`text` with every secret value replaced (for log lines and error messages that quote output)."""
    for v in sorted((v for v in values if len(v) >= 4), key=len, reverse=True):
        text = text.replace(v, REDACTED)
    return text
