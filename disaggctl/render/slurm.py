"""Render a DesiredState into one Slurm batch script: a heterogeneous job. Pure and deterministic.

Layout of the job (docs/slurm.md has the full story):
  - one het component per logical node slot (spec host) that runs a process, in the order the
    hosts first appear in the DesiredState (decode slots first: compile sorts decode, prefill, router);
    each asks `--nodes=1 --ntasks=<processes there> --gres=gpu:<highest GPU index used + 1>`;
  - one `srun --het-group=K` step per process, running a small launcher script
    (<config_dir>/run/<process>.sh) that maps placement's GPU indices onto the GPUs Slurm bound,
    exports the process's environment and execs its argv;
  - node addresses are found at run time (`scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_K"`,
    then Slurm's NodeAddr or DNS) into `DCTL_ADDR_K`; every place compile wrote a slot's address
    (URLs, `--master-addr`, NIXL side-channel host, LMCache peer/proxy host, router upstreams)
    becomes that variable.

Quoting: every literal goes through `disaggctl.quoting.shell_word`; a word that contains an
address is written as the concatenation `'http://'"${DCTL_ADDR_1}"':8200'` (single-quoted
literals around a double-quoted variable), so no other character is ever interpreted by bash.
Config files (LMCache YAML, router JSON) are written by the script itself with `printf '%s'`
into the job's folder, which must be on a filesystem shared by the nodes (as on every Slurm site).

Secrets (target.secrets) never pass through the script: `disaggctl apply` writes them to
<config_dir>/private/secrets.env (folder 0700, file 0600) before sbatch; each engine's launcher
sources that file, the router's does not; the batch shell removes it when the job ends (unless
a successor job took over, which removes it at its own end). The rendered output carries a
placeholder file at that path.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from disaggctl import secrets as secret_files
from disaggctl.deployment import DesiredState, Process, Rendered, RenderedFile
from disaggctl.errors import DisaggError
from disaggctl.quoting import shell_word
from disaggctl.render.templates import environment
from disaggctl.slurmtime import HANDOVER_S, grace_s, successor_after_s, time_limit_s
from disaggctl.spec import ClusterSpec, Role, SlurmTarget
from disaggctl.versions import VLLM_VERSION

if TYPE_CHECKING:
    import jinja2  # only the annotations; templates.environment imports it when rendering

SCRIPT_NAME = "job.sbatch"
STOP_TIMEOUT_S = 30  # per step: SIGTERM, then SIGKILL after this long
SAFE_PATH = re.compile(r"/[A-Za-z0-9_./+-]+")  # #SBATCH lines are not shell: no quoting possible there
SAFE_MOUNT = re.compile(r"[A-Za-z0-9_./:+@-]+")
ADDR_FLAGS = frozenset({"--master-addr", "--data-parallel-address", "--host", "--prometheus-host"})


# --------------------------------------------------------------------------- addresses -> variables


@dataclass(frozen=True)
class Var:
    """A shell variable expanded at run time (a node's address)."""

    name: str


Piece = str | Var


class SlotAddresses(Mapping[str, str]):
    """Slot address -> the variable that holds it at run time, with the regex that finds them in
    text compiled once (render_slurm looks through every argv word, env value and file)."""

    def __init__(self, addrs: Mapping[str, str]) -> None:
        self._vars = dict(addrs)
        self.pattern = _address_pattern(self._vars) if self._vars else None

    def __getitem__(self, addr: str) -> str:
        return self._vars[addr]

    def __contains__(self, addr: object) -> bool:
        return addr in self._vars

    def __iter__(self) -> Iterator[str]:
        return iter(self._vars)

    def __len__(self) -> int:
        return len(self._vars)


def _address_pattern(addrs: Mapping[str, str]) -> re.Pattern[str]:
    alt = "|".join(re.escape(a) for a in sorted(addrs, key=len, reverse=True))
    return re.compile(
        rf"(?<=://)(?:{alt})(?=[:/]|$)"
        rf'|(?<=")(?:{alt})(?=")'
        rf"|(?<=: )(?:{alt})$"
        rf"|(?<=: ')(?:{alt})(?=')",
        re.MULTILINE,
    )


def split_text(text: str, addrs: Mapping[str, str]) -> list[Piece]:
    """Split `text` where a slot address appears as a host: a URL host (`://ADDR` then `:`, `/` or end),
    a whole JSON string (`"ADDR"`) or a whole YAML value (`key: ADDR` at the end of a line).

    Only these contexts are replaced, never a bare substring: a host called `models` must not
    turn the model path `/models/x` into a variable.
    """
    slots = addrs if isinstance(addrs, SlotAddresses) else SlotAddresses(addrs)
    if slots.pattern is None:
        return [text] if text else []
    pieces: list[Piece] = []
    pos = 0
    for m in slots.pattern.finditer(text):
        if m.start() > pos:
            pieces.append(text[pos : m.start()])
        pieces.append(Var(slots[m.group(0)]))
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces


def split_value(value: str, addrs: Mapping[str, str]) -> list[Piece]:
    """An environment value or an argv word: the whole value is an address, or URL hosts inside it."""
    if value in addrs:
        return [Var(addrs[value])]
    return split_text(value, addrs)


def shell_concat(pieces: list[Piece]) -> str:
    """One shell word: literals single-quoted by shell_word, variables as "${NAME}"."""
    if not pieces:
        return "''"
    return "".join(f'"${{{p.name}}}"' if isinstance(p, Var) else shell_word(p) for p in pieces)


def shell_args(pieces: list[Piece]) -> str:
    """Several shell words whose printf '%s' concatenation is the text (for file contents)."""
    if not pieces:
        return "''"
    return " ".join(f'"${{{p.name}}}"' if isinstance(p, Var) else shell_word(p) for p in pieces)


def _check_line(value: str, what: str) -> str:
    if any(c in value for c in "\n\r\0"):
        raise DisaggError(f"{what} must not contain a newline or NUL: {value!r}")
    return value


def argv_words(argv: list[str], addrs: Mapping[str, str]) -> str:
    """The argv as shell words; the word after an address flag (ADDR_FLAGS: --master-addr, --host ...) is one."""
    words: list[str] = []
    for i, a in enumerate(argv):
        _check_line(a, "an argument")
        if i > 0 and argv[i - 1] in ADDR_FLAGS and a in addrs:
            words.append(shell_concat([Var(addrs[a])]))
        else:
            words.append(shell_concat(split_text(a, addrs)))
    return " ".join(words)


# --------------------------------------------------------------------------- typed template context


@dataclass(frozen=True)
class Component:
    """One het component: one logical node slot."""

    index: int
    host: str
    var: str  # DCTL_ADDR_K
    node_var: str  # DCTL_NODE_K
    nodelist: str  # the Slurm variable holding its node list
    directives: str  # one #SBATCH line's options
    summary: str


@dataclass(frozen=True)
class Step:
    name: str
    role: str
    component: int
    node_var: str
    srun: str  # srun options (already shell words)
    launcher: str  # path, shell word
    health_host: str | None  # shell word (a variable)
    health_port: int | None


@dataclass(frozen=True)
class FileWrite:
    path: str  # shell word
    mode: str  # octal
    args: str  # printf '%s' arguments


@dataclass(frozen=True)
class JobContext:
    version: str
    name: str
    job_name: str
    hash: str
    dir: str  # shell word
    output: str  # plain path (#SBATCH)
    grace_s: int
    stop_timeout_s: int
    startup_timeout_s: int
    interval_s: float
    components: list[Component]
    files: list[FileWrite]
    launchers: list[FileWrite]
    steps: list[Step]  # start order
    engines: list[Step]  # waited for before the router starts
    routers: list[Step]
    stop_order: list[str]
    endpoint: str  # shell word with variables
    urls: list[str]  # "name=url" shell words
    successor: bool
    successor_after_s: int
    handover_s: int
    exclude: str  # the spec's exclude list, for the successor ("" or ",list")
    multi: bool  # more than one component (a heterogeneous job)
    secrets: str | None = None  # shell word: the secrets file the batch shell removes at the end


@dataclass(frozen=True)
class LaunchContext:
    name: str
    role: str
    host: str
    gpus: str  # "0,1" placement indices, "" for none
    env: list[str]  # NAME=shell-word
    argv: str
    secrets: str | None = None  # shell word: the secrets file this launcher sources (engines only)


def _env() -> jinja2.Environment:
    # bash's ${#array[@]} is not a jinja comment
    return environment("slurm", comment_start="<%#", comment_end="#%>")


# --------------------------------------------------------------------------- helpers


def slurm_target(spec: ClusterSpec) -> SlurmTarget:
    t = spec.target
    if not isinstance(t, SlurmTarget):
        raise DisaggError(f"target.kind is {t.kind!r}; the Slurm renderer needs kind: slurm")
    return t


def job_name(spec: ClusterSpec) -> str:
    return f"disaggctl-{spec.name}"


def _check_paths(spec: ClusterSpec, t: SlurmTarget) -> None:
    if not SAFE_PATH.fullmatch(t.workdir):
        raise DisaggError(
            f"target.workdir: {t.workdir!r} cannot go on an #SBATCH line (no quoting there); "
            "use an absolute path of letters, digits and _ . / + -"
        )
    for m in t.container_mounts:
        if not SAFE_MOUNT.fullmatch(m):
            raise DisaggError(f"target.container_mounts: {m!r} must be SRC:DST[:FLAGS] without spaces or commas")


def _directives(spec: ClusterSpec, t: SlurmTarget, ntasks: int, gpus: int) -> str:
    opts = ["--nodes=1", f"--ntasks={ntasks}", f"--time={t.time_limit}"]
    if gpus:
        opts.append(f"--gres=gpu:{gpus}")
    for flag, value in (("partition", t.partition), ("account", t.account), ("qos", t.qos),
                        ("constraint", t.constraint), ("exclude", t.exclude)):
        if value:
            opts.append(f"--{flag}={value}")
    return " ".join(opts)


def _container(t: SlurmTarget, cfg_dir: str) -> list[str]:
    if not t.container_image:
        return []
    # the job folder (config files, launchers, logs) must be visible inside the container too
    mounts = [f"{d}:{d}" for d in dict.fromkeys([t.workdir.rstrip("/") or "/", cfg_dir])
              if d == t.workdir.rstrip("/") or not d.startswith(t.workdir.rstrip("/") + "/")]
    mounts += list(t.container_mounts)
    return [f"--container-image={t.container_image}", f"--container-mounts={','.join(mounts)}"]


def secrets_path(cfg_dir: str) -> str:
    """Where `disaggctl apply` puts the job's secrets (its private folder in the job folder)."""
    return f"{cfg_dir}/private/{secret_files.FILE_NAME}"


def _secrets_word(desired: DesiredState, t: SlurmTarget) -> str | None:
    return shell_word(secrets_path(desired.config_dir)) if t.secrets else None


def _launcher(p: Process, addrs: Mapping[str, str], secrets: str | None = None) -> str:
    env = []
    for k, v in p.env.items():
        if k == "CUDA_VISIBLE_DEVICES":
            continue  # mapped at run time onto the GPUs Slurm bound (see launch.sh.j2)
        _check_line(v, f"environment variable {k}")
        env.append(f"{k}={shell_concat(split_value(v, addrs))}")
    ctx = LaunchContext(
        name=p.name, role=p.role.value, host=p.host, gpus=",".join(str(g) for g in p.gpus),
        env=env, argv=argv_words(p.argv, addrs),
        secrets=secrets if secrets and secret_files.needs(p) else None,
    )
    return _env().get_template("launch.sh.j2").render(c=ctx)


# --------------------------------------------------------------------------- entry point


def render_slurm(desired: DesiredState, spec: ClusterSpec) -> Rendered:
    """The batch script (submitted with sbatch) plus, for reading, the launchers it writes."""
    t = slurm_target(spec)
    _check_paths(spec, t)
    hosts = desired.hosts
    comp_of = {h: i for i, h in enumerate(hosts)}
    addrs = _slot_addresses(desired, hosts, comp_of)
    multi = len(hosts) > 1
    components = _components(desired, spec, t, hosts, multi)
    files = _file_writes(desired, hosts, addrs)
    steps, launchers, launcher_texts = _steps(desired, t, addrs, comp_of, multi)
    endpoint, urls = _endpoints(desired, addrs)
    job = _Job(desired, spec, t, multi, components, files, launchers, steps, endpoint, urls)
    # The hash names the rendered script (without itself): `plan` compares it with the running job's comment.
    digest = hashlib.sha256(job.script("").encode()).hexdigest()[:16]
    cfg_dir = desired.config_dir
    out = [RenderedFile(host="slurm", path=f"{cfg_dir}/{SCRIPT_NAME}", content=job.script(digest), mode=0o755)]
    if t.secrets:  # a placeholder: apply writes the values there, on the submit host, before sbatch
        out.append(RenderedFile(host="slurm", path=secrets_path(cfg_dir), content=secret_files.file_text(
            t.secrets, None), mode=0o600, secret=True))
    out += [RenderedFile(host=p.host, path=f"{cfg_dir}/run/{p.name}.sh", content=text, mode=0o755)
            for p, text in launcher_texts]
    return Rendered(target="slurm", files=out, units={"slurm": [s.name for s in steps]})


def _slot_addresses(desired: DesiredState, hosts: list[str], comp_of: dict[str, int]) -> SlotAddresses:
    """Each host's address -> DCTL_ADDR_<its component>: plain names or IPv4, one host per address."""
    addrs: dict[str, str] = {}
    for p in desired.processes:
        if ":" in p.address or "[" in p.address:
            raise DisaggError(f"hosts.{p.host}.address: {p.address!r}: under Slurm a host is a node slot whose address "
                              "is found at run time (IPv4); leave address out or give a plain name")
        prev = addrs.setdefault(p.address, f"DCTL_ADDR_{comp_of[p.host]}")
        if prev != f"DCTL_ADDR_{comp_of[p.host]}":
            raise DisaggError(f"hosts {p.host!r} and {hosts[int(prev.rsplit('_', 1)[1])]!r} share the address "
                              f"{p.address!r}; under Slurm every host is its own node slot")
    return SlotAddresses(addrs)


def _components(desired: DesiredState, spec: ClusterSpec, t: SlurmTarget, hosts: list[str],
                multi: bool) -> list[Component]:
    components = []
    for i, h in enumerate(hosts):
        procs = desired.on_host(h)
        gpus = max((g + 1 for p in procs for g in p.gpus), default=0)
        roles = sorted({p.role.value for p in procs})
        components.append(Component(
            index=i, host=h, var=f"DCTL_ADDR_{i}", node_var=f"DCTL_NODE_{i}",
            nodelist=f"SLURM_JOB_NODELIST_HET_GROUP_{i}" if multi else "SLURM_JOB_NODELIST",
            directives=_directives(spec, t, len(procs), gpus),
            summary=f"{', '.join(roles)}: {', '.join(p.name for p in procs)}; {gpus} GPU(s)",
        ))
    return components


def _file_writes(desired: DesiredState, hosts: list[str], addrs: SlotAddresses) -> list[FileWrite]:
    """The config files, written once into the shared job folder (the same name must mean the same file)."""
    cfg_dir = desired.config_dir
    files: list[FileWrite] = []
    seen: dict[str, str] = {}
    written: set[str] = set()
    for h in hosts:
        for f in desired.files.get(h, []):
            if seen.setdefault(f.name, f.content) != f.content:
                raise DisaggError(f"two hosts need different files named {f.name!r}; under Slurm "
                                  f"{cfg_dir} is shared by every node")
            path = shell_word(f"{cfg_dir}/{f.name}")
            if path in written:
                continue
            written.add(path)
            files.append(FileWrite(path, f"{f.mode:o}", shell_args(split_text(f.content, addrs))))
    return files


def _steps(desired: DesiredState, t: SlurmTarget, addrs: SlotAddresses, comp_of: dict[str, int],
           multi: bool) -> tuple[list[Step], list[FileWrite], list[tuple[Process, str]]]:
    """One srun step per process in start order, with the launcher script each one runs."""
    cfg_dir = desired.config_dir
    container = _container(t, cfg_dir)
    launchers: list[FileWrite] = []
    launcher_texts: list[tuple[Process, str]] = []
    steps: list[Step] = []
    for p in sorted(desired.processes, key=lambda p: p.start_order):
        text = _launcher(p, addrs, _secrets_word(desired, t))
        launcher_texts.append((p, text))
        path = f"{cfg_dir}/run/{p.name}.sh"
        launchers.append(FileWrite(shell_word(path), "755", shell_args([text])))
        k = comp_of[p.host]
        srun = ([f"--het-group={k}"] if multi else []) + [
            "--nodes=1", "--ntasks=1", "--overlap", "--kill-on-bad-exit=1", f"--job-name={p.name}",
        ] + container
        steps.append(Step(
            name=p.name, role=p.role.value, component=k, node_var=f"DCTL_NODE_{k}",
            srun=" ".join(shell_word(o) for o in srun) + f' --output="$DCTL_LOGS"/{shell_word(p.name + ".log")}',
            launcher=shell_word(path),
            health_host=f'"${{DCTL_ADDR_{k}}}"' if p.http_port is not None else None,
            health_port=p.http_port,
        ))
    return steps, launchers, launcher_texts


def _endpoints(desired: DesiredState, addrs: SlotAddresses) -> tuple[str, list[str]]:
    """The router's URL (the job's endpoint) and every `url.<process>=<url>` (shell words)."""
    router = next((p for p in desired.processes if p.role is Role.ROUTER), None)
    if router is None or router.http_port is None:
        raise DisaggError("the deployment has no router process; Slurm jobs publish the router as the endpoint")
    endpoint = shell_concat([*split_text(f"http://{router.address}", addrs), f":{router.http_port}"])
    urls = [shell_concat([f"url.{p.name}=", *split_text(f"http://{p.address}", addrs), f":{p.http_port}"])
            for p in desired.processes if p.http_port is not None]
    return endpoint, urls


@dataclass(frozen=True)
class _Job:
    """What the batch script is made of; `script(hash)` lays it out."""

    desired: DesiredState
    spec: ClusterSpec
    t: SlurmTarget
    multi: bool
    components: list[Component]
    files: list[FileWrite]
    launchers: list[FileWrite]
    steps: list[Step]
    endpoint: str  # shell word with variables
    urls: list[str]

    def script(self, hash_: str) -> str:
        desired, spec, t, steps = self.desired, self.spec, self.t, self.steps
        # Stop: router first (no new requests), then prefill, then decode (they hold the KV in flight).
        rank = {Role.ROUTER.value: 0, Role.PREFILL.value: 1, Role.DECODE.value: 2}
        limit_s = time_limit_s(t.time_limit)
        ctx = JobContext(
            version=VLLM_VERSION, name=spec.name, job_name=job_name(spec), hash=hash_,
            dir=shell_word(desired.config_dir), output=f"{desired.config_dir}/slurm-%j.out", grace_s=grace_s(limit_s),
            stop_timeout_s=STOP_TIMEOUT_S, startup_timeout_s=int(spec.health.startup_timeout_s),
            interval_s=spec.health.interval_s, components=self.components, files=self.files,
            launchers=self.launchers, steps=steps, engines=[s for s in steps if s.role != Role.ROUTER.value],
            routers=[s for s in steps if s.role == Role.ROUTER.value],
            stop_order=[s.name for s in sorted(steps, key=lambda s: rank[s.role])],
            endpoint=self.endpoint, urls=self.urls, successor=t.successor.enabled,
            successor_after_s=successor_after_s(limit_s, t.successor.lead_minutes), handover_s=HANDOVER_S,
            exclude=f",{t.exclude}" if t.exclude else "", multi=self.multi,
            secrets=_secrets_word(desired, t),
        )
        return _env().get_template("job.sbatch.j2").render(c=ctx)


def script_of(rendered: Rendered) -> RenderedFile:
    return next(f for f in rendered.files if f.host == "slurm")


def script_hash(script: str) -> str:
    """The hash render_slurm put into the script's `--comment=disaggctl:<hash>`."""
    m = re.search(r"^#SBATCH --comment=disaggctl:([0-9a-f]+)$", script, re.MULTILINE)
    if not m:
        raise DisaggError("not a disaggctl Slurm script (no --comment=disaggctl:<hash> line)")
    return m.group(1)
