"""Render a DesiredState into systemd units and config files, per host. Pure and deterministic.

    <prefix>-<deployment>-<process>.service   one per process (decode, prefill, router, workers)
    <prefix>-<deployment>.target              per host: groups the deployment's services there
    <config_dir>/<file>                       LMCache YAML, router JSON (DesiredState.files)
    <config_dir>/secrets.env                  target.secrets, mode 0600, hidden in diffs; only on hosts
                                              that run an engine, attached to engine units only
                                              (disaggctl.secrets; a placeholder when rendered offline)

jinja2 only lays out the text; every value that reaches a unit goes through disaggctl.quoting
(systemd's ExecStart= is not a shell). The template context is typed (dataclasses), and
StrictUndefined turns a typo in a template into an error instead of an empty string.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from disaggctl import secrets as secret_files
from disaggctl.deployment import DesiredState, Process, Rendered, RenderedFile
from disaggctl.errors import DisaggError
from disaggctl.quoting import QuotingError, systemd_env, systemd_exec, systemd_value
from disaggctl.render.templates import render
from disaggctl.spec import ClusterSpec, Role, SystemdTarget

UNIT_DIR = "/etc/systemd/system"
SECRETS_FILE = secret_files.FILE_NAME


@dataclass(frozen=True)
class UnitContext:
    """Everything service.j2 reads, already quoted for systemd."""

    deployment: str
    process: str
    description: str
    target: str
    after: str
    wants: str
    start_limit_interval_s: int
    exec_start: str
    working_dir: str
    environment: list[str]
    environment_file: str | None
    user: str | None
    start_timeout_s: int
    cpu_affinity: str | None
    numa_node: int | None
    syslog_identifier: str


@dataclass(frozen=True)
class TargetContext:
    deployment: str
    host: str
    description: str
    services: list[str]


def systemd_target(spec: ClusterSpec) -> SystemdTarget:
    t = spec.target
    if not isinstance(t, SystemdTarget):
        raise DisaggError(f"target.kind is {t.kind!r}; the systemd renderer needs kind: systemd")
    return t


def unit_name(prefix: str, deployment: str, process: str) -> str:
    return f"{prefix}-{deployment}-{process}.service"


def target_name(prefix: str, deployment: str) -> str:
    return f"{prefix}-{deployment}.target"


def _cpus(cpus: str | None) -> str | None:
    """A cpulist "0-15,32-47" as CPUAffinity= wants it ("0-15 32-47")."""
    if not cpus:
        return None
    return " ".join(part.strip() for part in cpus.split(",") if part.strip())


def _predecessors(p: Process, on_host: list[Process], prefix: str, dep: str) -> list[str]:
    """Units on the same host that must start first: decode before prefill before router.

    Cross-host order is enforced by apply (it starts decode everywhere, then prefill, then the
    router); systemd can only order units of one host.
    """
    return [unit_name(prefix, dep, q.name) for q in on_host if q.start_order < p.start_order]


def _unit(p: Process, desired: DesiredState, t: SystemdTarget, has_secrets: bool) -> str:
    dep = desired.name
    on_host = desired.on_host(p.host)
    before = _predecessors(p, on_host, t.unit_prefix, dep)
    try:
        ctx = UnitContext(
            deployment=dep,
            process=p.name,
            description=systemd_value(f"disaggctl {dep}: {p.role.value} {p.name}"),
            target=target_name(t.unit_prefix, dep),
            after=" ".join(["network-online.target", *before]),
            wants=" ".join(["network-online.target", *before]),
            # wide enough that 5 failed starts of a slow-loading engine still count as a burst
            start_limit_interval_s=max(600, 5 * t.start_timeout_s) if p.role is not Role.ROUTER else 600,
            exec_start=systemd_exec(p.argv),
            working_dir=systemd_value(desired.config_dir),
            environment=[systemd_env(k, v) for k, v in p.env.items()],
            environment_file=(
                systemd_value(f"{desired.config_dir}/{SECRETS_FILE}")
                if has_secrets and secret_files.needs(p)
                else None
            ),
            user=t.run_as,
            start_timeout_s=t.start_timeout_s,
            cpu_affinity=_cpus(p.cpus) if t.numa_bind and p.role is not Role.ROUTER else None,
            numa_node=p.numa_node if t.numa_bind and p.role is not Role.ROUTER else None,
            syslog_identifier=f"{dep}-{p.name}",
        )
    except QuotingError as e:
        raise DisaggError(
            f"process {p.name} on {p.host}: {e}; systemd units are line-based, remove the newline from the spec"
        ) from None
    return render("systemd", "service.j2", u=ctx)


def secrets_file(names: list[str], values: Mapping[str, str] | None) -> str:
    """The EnvironmentFile. Without values (render -o, destroy, logs) every value is a placeholder."""
    return secret_files.file_text(names, values)


def render_systemd(desired: DesiredState, spec: ClusterSpec, secrets: Mapping[str, str] | None = None) -> Rendered:
    """All files of every host: config files, secrets, services and one target per host."""
    t = systemd_target(spec)
    has_secrets = bool(t.secrets)
    files: list[RenderedFile] = []
    units: dict[str, list[str]] = {}
    secret_text = secrets_file(list(t.secrets), secrets) if has_secrets else None
    for host in desired.hosts:
        cfg_dir = desired.config_dir
        for cf in sorted(desired.files.get(host, []), key=lambda f: f.name):
            files.append(RenderedFile(host=host, path=f"{cfg_dir}/{cf.name}", content=cf.content, mode=cf.mode))
        if secret_text is not None and any(secret_files.needs(p) for p in desired.on_host(host)):
            files.append(
                RenderedFile(host=host, path=f"{cfg_dir}/{SECRETS_FILE}", content=secret_text, mode=0o600, secret=True)
            )
        procs = sorted(desired.on_host(host), key=lambda p: p.start_order)  # stable: compile order in a role
        names: list[str] = []
        for p in procs:
            name = unit_name(t.unit_prefix, desired.name, p.name)
            files.append(RenderedFile(host=host, path=f"{UNIT_DIR}/{name}", content=_unit(p, desired, t, has_secrets)))
            names.append(name)
        tname = target_name(t.unit_prefix, desired.name)
        tctx = TargetContext(
            deployment=desired.name,
            host=host,
            description=systemd_value(f"disaggctl {desired.name} (all processes on {host})"),
            services=names,
        )
        files.append(
            RenderedFile(host=host, path=f"{UNIT_DIR}/{tname}", content=render("systemd", "target.j2", t=tctx))
        )
        units[host] = names
    return Rendered(target="systemd", files=files, units=units)
