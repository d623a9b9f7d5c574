"""The per-deployment manifest disaggctl keeps on each host: what it owns there.

    <state_dir>/<deployment>/manifest.json   files (sha256, mode), units, processes, spec hash
    <state_dir>/<deployment>/owned           one owned path per line (read by the observe script)

The manifest is how a plan finds what the spec dropped (delete), how `destroy` removes exactly
what disaggctl created, and how `status` tells a hand edit (drift) from a pending change.
`owned` duplicates the paths in a line format a POSIX shell can read without a JSON parser.

Apply writes a *pending* manifest (old owned paths plus every path it is about to write) before
it touches anything, and the final one at the end: a host that drops mid-apply never holds a
file that no manifest names.

Every manifest also remembers every host of the deployment with its SSH details (`hosts`):
a host removed from the spec is still reached through what the other hosts remember
(targets/systemd/access.py).
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

from disaggctl.deployment import Rendered

MANIFEST_VERSION = 1


class OwnedFile(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    sha256: str
    mode: int
    secret: bool = False


class OwnedProcess(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    unit: str
    role: str
    instance: str
    http_port: int | None = None
    gpus: list[int] = Field(default_factory=list)
    start_order: int = 0
    argv: list[str] = Field(default_factory=list)


class HostAddress(BaseModel):
    """How to reach a host, as the spec said when files were placed there (ssh.SshTarget's fields):
    a host the spec no longer declares is still found, to clean it up."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    address: str
    port: int = 22
    user: str = "root"
    key: str | None = None
    known_hosts: str | None = None
    strict: bool = False
    connect_timeout: float = 10.0
    jump: HostAddress | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    version: int = MANIFEST_VERSION
    deployment: str
    host: str
    spec_hash: str = ""
    # no time of writing (was `applied_at`, still read from older manifests): the same spec on the
    # same hosts gives the same bytes, so observe can compare the host's manifest by its sha256
    applied_at: str = ""
    pending: bool = False  # True between the start and the end of an apply
    target_unit: str | None = None
    files: dict[str, OwnedFile] = Field(default_factory=dict)  # absolute path -> what was written
    units: list[str] = Field(default_factory=list)  # services in start order
    processes: dict[str, OwnedProcess] = Field(default_factory=dict)
    # every host of the deployment (this one included) and how to reach it: the registry that finds
    # a host the spec dropped (written to every host that holds files)
    hosts: dict[str, HostAddress] = Field(default_factory=dict)

    def owned_paths(self) -> list[str]:
        return sorted(self.files)

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=2) + "\n").encode()


def state_path(state_dir: str, deployment: str) -> str:
    return f"{state_dir.rstrip('/')}/{deployment}"


def manifest_path(state_dir: str, deployment: str) -> str:
    return f"{state_path(state_dir, deployment)}/manifest.json"


def owned_list_path(state_dir: str, deployment: str) -> str:
    return f"{state_path(state_dir, deployment)}/owned"


def owned_list(paths: list[str]) -> bytes:
    return "".join(p + "\n" for p in sorted(set(paths))).encode()


def parse_manifest(data: bytes | str | None) -> Manifest | None:
    """The manifest, or None when absent or unreadable (a hand-mangled manifest is treated as absent)."""
    if not data:
        return None
    try:
        raw = json.loads(data)
        return Manifest.model_validate(raw)
    except ValueError:
        return None


def spec_hash(rendered: Rendered) -> str:
    """A digest of everything rendered for all hosts (file paths, modes and contents)."""
    h = hashlib.sha256()
    for f in sorted(rendered.files, key=lambda f: (f.host, f.path)):
        h.update(f"{f.host}\0{f.path}\0{f.mode}\0{f.sha256}\n".encode())
    return h.hexdigest()


def build_manifest(
    rendered: Rendered,
    host: str,
    deployment: str,
    target_unit: str | None,
    processes: dict[str, OwnedProcess],
    digest: str,
    pending_extra: dict[str, OwnedFile] | None = None,
    hosts: dict[str, HostAddress] | None = None,
) -> Manifest:
    """The manifest of one host for a rendered deployment (pending: plus the old owned files)."""
    files = {f.path: OwnedFile(sha256=f.sha256, mode=f.mode, secret=f.secret) for f in rendered.for_host(host)}
    if pending_extra:
        files = {**pending_extra, **files}
    return Manifest(
        deployment=deployment,
        host=host,
        spec_hash=digest,
        pending=pending_extra is not None,
        target_unit=target_unit,
        files=files,
        units=list(rendered.units.get(host, [])),
        processes=processes,
        hosts=hosts or {},
    )
