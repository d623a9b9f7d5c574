"""The local target's layout: everything of a deployment lives in one state folder on this machine.

    <state>/processes.json        the process table the supervisor runs (argv, env, log and pid paths)
    <state>/<config files>        router.json, lmcache-*.yaml (the ConfigFiles of the DesiredState)
    <state>/logs/<process>.log    stdout and stderr of each process (appended across restarts)
    <state>/run/<process>.pid     pid of each running process (its process-group id too)
    <state>/run/supervisor.pid    the supervisor; <state>/run/supervisor.json its view of the processes
    <state>/work/<process>/       TMPDIR and VLLM_CACHE_ROOT of each process: vLLM instances on one
                                  machine must not share compile caches or temp files
    <state>/secrets.env           target.secrets, mode 0600 (disaggctl.secrets): the supervisor reads it
                                  when it starts an engine; the table holds names only, never values

Pure: DesiredState in, RenderedFile list out; the paths and `~` are resolved here so that the
supervisor runs exactly what the table says.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from disaggctl import secrets as secret_files
from disaggctl.deployment import DesiredState, Process, Rendered, RenderedFile
from disaggctl.spec import LocalTarget, Role

TABLE = "processes.json"
TABLE_VERSION = 1


@dataclass(frozen=True)
class ProcSpec:
    """One row of the process table."""

    name: str
    role: str
    instance: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    log: str
    pid_file: str
    http_port: int | None
    health_url: str | None
    start_order: int
    files_sha: str = ""  # hash of the config files it reads: a changed router.json restarts the router
    secrets: bool = False  # reads the deployment's secrets file (engines only)
    secrets_sha: str = ""  # keyed hash of the secret values (disaggctl.secrets.digest): a change restarts it


@dataclass(frozen=True)
class Table:
    """What the supervisor reads: the processes plus the restart policy."""

    name: str
    state_dir: str
    restart_on_crash: bool
    max_restarts: int
    processes: list[ProcSpec] = field(default_factory=list)
    restart_delay_s: float = 1.0  # times the restart number: 1 s, 2 s, 3 s ...
    stop_timeout_s: float = 20.0  # SIGTERM, then SIGKILL after this
    version: int = TABLE_VERSION
    secret_names: list[str] = field(default_factory=list)  # kept out of every process's inherited environment
    secrets_file: str | None = None  # <state>/secrets.env when the target has secrets

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Table:
        raw = json.loads(text)
        procs = [ProcSpec(**p) for p in raw.pop("processes")]
        return cls(processes=procs, **raw)

    def proc(self, name: str) -> ProcSpec:
        for p in self.processes:
            if p.name == name:
                return p
        raise KeyError(name)


def paths(state_dir: str) -> dict[str, Path]:
    s = Path(state_dir)
    return {
        "table": s / TABLE,
        "logs": s / "logs",
        "run": s / "run",
        "work": s / "work",
        "supervisor_pid": s / "run" / "supervisor.pid",
        "supervisor_state": s / "run" / "supervisor.json",
        "supervisor_log": s / "logs" / "supervisor.log",
    }


UNIX_SOCKET_MAX = 107  # bytes of a Unix socket path (sun_path is 108 with the NUL)


def ipc_socket_example(base: str) -> str:
    """The longest ZMQ IPC socket vLLM makes under `base` (vllm.utils.network_utils.get_open_zmq_ipc_path)."""
    return f"{base}/{'0' * 8}-{'0' * 4}-{'0' * 4}-{'0' * 4}-{'0' * 12}"


def short_rpc_dir(state_dir: str) -> str:
    """Where vLLM's IPC sockets go when <state>/work/<process>/tmp is too long for them (docs/local.md)."""
    digest = hashlib.sha256(state_dir.encode()).hexdigest()[:12]
    return f"/tmp/dctl-{os.getuid()}-{digest}"


def _resolve_bin(argv0: str) -> str:
    """A relative executable: the one next to this Python first (the venv disaggctl runs from), then PATH."""
    if "/" in argv0:
        return os.path.abspath(os.path.expanduser(argv0))
    beside = Path(sys.executable).parent / argv0
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(argv0)
    return found or argv0


def _expand(arg: str) -> str:
    # A shell would expand these; the supervisor runs argv without one. Only a leading "~/".
    return os.path.expanduser(arg) if arg.startswith("~/") or arg == "~" else arg


def proc_spec(
    p: Process, state_dir: str, file_contents: dict[str, str] | None = None, secrets_sha: str | None = None
) -> ProcSpec:
    """secrets_sha: None when the deployment has no secrets, else the digest of their values."""
    pth = paths(state_dir)
    work = pth["work"] / p.name
    argv = [_resolve_bin(p.argv[0]), *(_expand(a) for a in p.argv[1:])]
    env = dict(p.env)
    if p.role is not Role.ROUTER:
        env.setdefault("TMPDIR", str(work / "tmp"))
        env.setdefault("VLLM_CACHE_ROOT", str(work / "cache"))
        if len(ipc_socket_example(env["TMPDIR"]).encode()) > UNIX_SOCKET_MAX:
            env.setdefault("VLLM_RPC_BASE_PATH", short_rpc_dir(state_dir))
    h = hashlib.sha256()
    for fname in sorted(p.files):
        h.update(fname.encode() + b"\0" + (file_contents or {}).get(fname, "").encode() + b"\0")
    return ProcSpec(
        name=p.name,
        role=p.role.value,
        instance=p.instance,
        argv=argv,
        env=env,
        cwd=str(work),
        log=str(pth["logs"] / f"{p.name}.log"),
        pid_file=str(pth["run"] / f"{p.name}.pid"),
        http_port=p.http_port,
        health_url=p.health_url,
        start_order=p.start_order,
        files_sha=h.hexdigest()[:16] if p.files else "",
        secrets=secrets_sha is not None and secret_files.needs(p),
        secrets_sha=(secrets_sha or "") if secret_files.needs(p) else "",
    )


def table(desired: DesiredState, target: LocalTarget, secrets: Mapping[str, str] | None = None) -> Table:
    """secrets: the values (plan/apply: their digest goes into the engines' rows), None when not known."""
    state_dir = desired.config_dir
    contents = {cf.name: cf.content for cfs in desired.files.values() for cf in cfs}
    names = list(target.secrets)
    sha = (secret_files.digest(desired.name, secrets) if secrets else "") if names else None
    procs = [proc_spec(p, state_dir, contents, sha) for p in sorted(desired.processes, key=lambda p: p.start_order)]
    return Table(
        name=desired.name,
        state_dir=state_dir,
        restart_on_crash=target.restart_on_crash,
        max_restarts=target.max_restarts,
        processes=procs,
        secret_names=names,
        secrets_file=str(Path(state_dir) / secret_files.FILE_NAME) if names else None,
    )


def render(desired: DesiredState, target: LocalTarget, secrets: Mapping[str, str] | None = None) -> Rendered:
    """The files of the state folder: config files, the secrets file (placeholders without values) and
    the process table."""
    state_dir = desired.config_dir
    files: list[RenderedFile] = []
    host = desired.hosts[0] if desired.hosts else "localhost"
    for cfs in desired.files.values():
        for cf in cfs:
            path = str(Path(state_dir) / cf.name)
            if any(f.path == path for f in files):
                continue
            files.append(RenderedFile(host=host, path=path, content=cf.content, mode=cf.mode))
    tbl = table(desired, target, secrets)
    if tbl.secrets_file:
        files.append(RenderedFile(host=host, path=tbl.secrets_file, mode=0o600, secret=True,
                                  content=secret_files.file_text(tbl.secret_names, secrets)))
    files.append(RenderedFile(host=host, path=str(paths(state_dir)["table"]), content=tbl.to_json()))
    return Rendered(target="local", files=files, units={host: [p.name for p in tbl.processes]})
