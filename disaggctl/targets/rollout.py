"""Executing a rolling change (the plan comes from `targets.rolling`), the same for every target.

A target gives the runner one callable, `restart(instances)`: restart these instances with
their new definition (the local target rewrites its process table with just them changed and
SIGHUPs the supervisor; systemd restarts their units). The runner does the rest of each step:

    drain     the router's admin API (`POST /admin/drain`, then `GET /admin/instances` until
              `drained`: in-flight requests done and, for a prefill, its KV pulled by decode)
    restart   target.restart -> /health of the instance -> a pair canary through it and its
              partner (health.run_pair_canary: proven by decode's answer for its own request)
    undrain   `POST /admin/undrain`

Rotation: a builtin router whose config has `admin` (host, port, token file) is driven through
its admin API. Without it (vllm-router, or a builtin router without the admin API) nothing is
drained: the router notices a restarting instance by its failed requests and health polls,
retries those on another instance of the role, and takes it back when /health answers; the
runner says so before it starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from disaggctl.errors import DisaggError
from disaggctl.health import PAIR_CANARY_KINDS, HealthError, failed_pulls_note
from disaggctl.targets.rolling import Op, RollInstance, RollPlan, Step

if TYPE_CHECKING:
    from disaggctl.deployment import DesiredState
    from disaggctl.spec import ClusterSpec
    from disaggctl.targets.gate import HealthGate

FALLBACK_METRIC = "disaggctl_router_aggregated_fallback_total"
DRAIN_TIMEOUT_S = 300.0

# request(method, url, body, timeout_s, headers) -> (status, body), the signature of
# targets/systemd/access.SshHttp.request; an answer with an error status is returned, not raised
Request = Callable[[str, str, bytes | None, float, Mapping[str, str]], tuple[int, bytes]]


def urllib_request(
    method: str, url: str, body: bytes | None, timeout_s: float, headers: Mapping[str, str]
) -> tuple[int, bytes]:
    """One HTTP request from this machine (the default transport of AdminRotation)."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return int(r.status), bytes(r.read())
    except urllib.error.HTTPError as e:
        return e.code, bytes(e.read())


class Rotation(Protocol):
    """Takes instances out of the router's rotation and puts them back."""

    description: str
    fallback: bool  # the router serves aggregated when a whole role is out

    def drain(self, names: Sequence[str], timeout_s: float) -> None: ...

    def undrain(self, names: Sequence[str]) -> None: ...


class AdminMissing(DisaggError):
    """The router has no admin API where the config says: nothing listens on the admin port
    (connection refused), or it does not know the admin routes (404): a router started before the
    admin API existed, or before its config had `admin`."""


def _refused(e: object) -> bool:
    """A refused connection: urllib's ConnectionRefusedError, or SshHttp's message for a
    direct-tcpip channel the router host's sshd could not connect ("Connection refused")."""
    return isinstance(e, ConnectionRefusedError) or "refused" in str(e).lower()


NO_ADMIN = (
    "instances are not drained; the router retries what a restarting instance fails on another instance "
    "of its role and takes it back when its /health answers"
)


@dataclass
class NoRotation:
    """A router without a drain API: nothing to call; it routes around what fails."""

    description: str = f"the router has no admin API: {NO_ADMIN}"
    fallback: bool = False

    def drain(self, names: Sequence[str], timeout_s: float) -> None:
        return None

    def undrain(self, names: Sequence[str]) -> None:
        return None


@dataclass
class AdminRotation:
    """The builtin router's admin API (GET /admin/instances, POST /admin/drain, /admin/undrain)."""

    base_url: str
    token: str
    fallback: bool = False
    interval_s: float = 0.5
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    description: str = field(default="")
    read_token: Callable[[], str] | None = None  # the token, read on the first call when `token` is empty
    # how a call travels: urllib from this machine (local target), or SshHttp.request through the
    # router host's SSH connection (systemd: a loopback admin listener is reached from that host)
    request: Request = field(default=urllib_request)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        if not self.description:
            self.description = f"drained through the router's admin API at {self.base_url}"

    def _call(self, method: str, path: str, body: Mapping[str, object] | None = None) -> tuple[int, object]:
        if not self.token and self.read_token is not None:
            self.token = self.read_token()
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        try:
            status, raw = self.request(method, self.base_url + path, data, 10.0, headers)
        except (OSError, DisaggError) as e:  # urllib's URLError is an OSError; SshHttp raises OSError
            why = getattr(e, "reason", e)
            kind = AdminMissing if _refused(why) else DisaggError
            raise kind(f"router admin {method} {path}: {why}") from None
        if status == 404 and b"no instance" not in raw:  # the route is unknown, not the instance
            raise AdminMissing(f"router admin {method} {path}: HTTP 404 {raw[:200]!r}")
        if status >= 400:
            raise DisaggError(f"router admin {method} {path}: HTTP {status} {raw[:200]!r}")
        try:
            return status, json.loads(raw) if raw else None
        except ValueError as e:
            raise DisaggError(f"router admin {method} {path}: {e}") from None

    def missing(self) -> str | None:
        """Why the router has no admin API here (a refused connection, a 404 for the admin route),
        or None: it answers (401 without the token is an answer). Asks without the token, so
        `plan` can say it before anything is read or restarted; other failures are left to the calls."""
        try:
            status, _ = self.request("GET", self.base_url + "/admin/instances", None, 5.0, {})
        except (OSError, DisaggError) as e:
            why = getattr(e, "reason", e)
            return f"GET {self.base_url}/admin/instances: {why}" if _refused(why) else None
        return f"GET {self.base_url}/admin/instances: HTTP 404" if status == 404 else None

    def states(self) -> dict[str, dict[str, object]]:
        _, body = self._call("GET", "/admin/instances")
        items = body.get("instances") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise DisaggError(f"router admin GET /admin/instances: unexpected answer {str(body)[:200]}")
        return {str(i.get("name")): i for i in items if isinstance(i, dict)}

    def drain(self, names: Sequence[str], timeout_s: float) -> None:
        for n in names:
            self._call("POST", "/admin/drain", {"instance": n})
        deadline = self.clock() + timeout_s
        while True:
            st = self.states()
            left = [n for n in names if (st.get(n) or {}).get("state") not in ("drained", "down")]
            if not left:
                return
            if self.clock() >= deadline:
                detail = ", ".join(f"{n}: {(st.get(n) or {}).get('in_flight', '?')} in flight" for n in left)
                raise DisaggError(f"not drained after {timeout_s:g} s ({detail})")
            self.sleep(self.interval_s)

    def undrain(self, names: Sequence[str]) -> None:
        for n in names:
            self._call("POST", "/admin/undrain", {"instance": n})


def rollout_problems(plan: RollPlan, rotation: Rotation) -> list[str]:
    """What fails requests with this plan and this router: the plan's own problems and, for a
    fingerprint change, a router that cannot take instances out of rotation (the generations mix)."""
    out = plan.problems(rotation.fallback)
    if plan.fingerprint_change and isinstance(rotation, NoRotation):
        out.append(
            "the fingerprint changes and the router cannot drain: restarted instances rejoin the router "
            "while old ones of the other role still serve, and their pairs fail the KV handshake"
        )
    return out


def rollable(plan: RollPlan, rotation: Rotation) -> bool:
    """Whether rolling beats restarting everything at once: not when every order pairs the old
    generation with the new one (one instance of a role, or a router that cannot drain)."""
    return not plan.unsafe and not (plan.fingerprint_change and isinstance(rotation, NoRotation))


ALL_AT_ONCE = "the change cannot be rolled: restarting every changed instance at once (requests fail until it is back)"


def roll_text(plan: RollPlan, rotation: Rotation) -> list[str]:
    """What `plan` and `apply` print about a rollout with this router."""
    from disaggctl.targets.rolling import render_text

    lines = render_text(plan, rotation.fallback, rollout_problems(plan, rotation))
    return [*lines, f"  rotation: {rotation.description}"] if lines else []


def router_has_fallback(metrics_url: str, timeout_s: float = 2.0, request: Request = urllib_request) -> bool:
    """The router exports the aggregated-fallback counter (so it has the fallback)."""
    try:
        status, body = request("GET", metrics_url, None, timeout_s, {})
    except (OSError, DisaggError):
        return False
    return status == 200 and FALLBACK_METRIC in body.decode(errors="replace")


def rotation_for(
    spec: ClusterSpec,
    desired: DesiredState,
    read_token: Callable[[str], str] | None = None,
    remote_router: bool = False,
    request: Request | None = None,
) -> Rotation:
    """The builtin router's admin API as compile puts it in the router config (admin_bind, the
    allocated admin port, the token file in the config folder), else NoRotation. The token is read
    (`read_token(path)`: locally by default, over SSH on systemd) on the first admin call, not at plan time.
    `request`: the transport of the admin calls and the fallback check (default urllib from this
    machine); systemd passes SshHttp.request, which reaches 127.0.0.1 from the router's host."""
    from disaggctl.compile import router_admin

    via = request or urllib_request
    fallback = spec.router.kind == "builtin" and router_has_fallback(
        desired.router_url.rstrip("/") + "/metrics", request=via
    )
    admin = router_admin(spec, desired.placement) if spec.router.kind == "builtin" else None
    if admin is None or not admin.token_file:
        return NoRotation(fallback=fallback)
    host = admin.host
    if remote_router and request is None and host in ("127.0.0.1", "::1", "localhost"):
        # the admin listener serves the router host's loopback only: urllib from this machine
        # cannot reach it (a transport through the router host can)
        return NoRotation(fallback=fallback)
    if host in ("0.0.0.0", "::"):  # listening everywhere: reach it at the router host's address
        host = desired.placement.router_address or "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{admin.port}"
    rot = AdminRotation(url, "", fallback=fallback, read_token=partial(read_token or _read_local, admin.token_file),
                        request=via)  # fmt: skip
    missing = rot.missing()
    if missing is None:
        return rot
    # a router started before it had the admin API (an older disaggctl, or a config without admin)
    why = f"no router admin API answers ({missing}: a router started before it had one, or none running)"
    return NoRotation(description=f"{why}: {NO_ADMIN}", fallback=fallback)


def _read_local(path: str) -> str:
    try:
        return Path(path).expanduser().read_text().strip()
    except OSError as e:
        raise DisaggError(f"router admin token {path}: cannot read: {e.strerror or e}") from None


def fingerprinter(spec: ClusterSpec, desired: DesiredState) -> Callable[[str, list[str]], str]:
    """fingerprint(instance, argv): what must match for an instance run with `argv` to pair with a
    partner: the compatibility fingerprint (compat/fingerprint.py, the function compile uses) plus
    the KV connector and its extra config (`--kv-transfer-config` minus the role), which the NIXL
    hash does not cover: a NIXL prefill and a shared-storage decode have the same fingerprint and
    never exchange KV."""
    from disaggctl.compat import fingerprint as fp
    from disaggctl.compat.spec_rules import kv_model
    from disaggctl.compat.transfer import environment_versions

    model = kv_model(spec)
    mla = bool(model and model.mla)
    versions = environment_versions(spec)
    arch = {i.name: i.head.arch for i in desired.placement.instances}

    def digest(name: str, argv: list[str]) -> str:
        base = fp.digest(fp.vllm_factors(argv, arch.get(name), mla), fp.extra_factors(argv, versions))
        cfg = fp.option(argv, "--kv-transfer-config") or ""
        try:
            kv = json.loads(cfg) if cfg else {}
        except ValueError:
            kv = {"unparsed": cfg}
        return hashlib.sha256((base + json.dumps(_connector_identity(kv), sort_keys=True)).encode()).hexdigest()

    return digest


def _connector_identity(cfg: object) -> object:
    """What of a `--kv-transfer-config` both sides of a pair share: the connector class and where
    shared storage lives, also of nested connectors (MultiConnector); not the role, nor per-instance
    ports (LMCache's rpc port, decode's skip_last_n_tokens)."""
    if not isinstance(cfg, dict):
        return None
    extra = cfg.get("kv_connector_extra_config")
    extra = extra if isinstance(extra, dict) else {}
    nested = extra.get("connectors")
    return {
        "kv_connector": cfg.get("kv_connector"),
        "shared_storage_path": extra.get("shared_storage_path"),
        "connectors": [_connector_identity(c) for c in nested] if isinstance(nested, list) else None,
    }


def running_fingerprints(
    spec: ClusterSpec, desired: DesiredState, argv: Mapping[str, list[str]]
) -> dict[str, tuple[str, str]]:
    """instance -> (role, fingerprint) of what runs (`argv`: the running head process's argv)."""
    digest = fingerprinter(spec, desired)
    role = {i.name: i.role.value for i in desired.placement.instances}
    return {n: (role.get(n, "?"), digest(n, a)) for n, a in argv.items()}


def roll_instances(
    spec: ClusterSpec,
    desired: DesiredState,
    old_argv: Mapping[str, list[str]],
    new_argv: Mapping[str, list[str]],
    restart: set[str],
) -> list[RollInstance]:
    """The planner's input: each vLLM instance of the spec, whether it restarts, and its
    fingerprint before (from the running argv; None when it is not running) and after."""
    digest = fingerprinter(spec, desired)
    out = []
    for inst in desired.placement.instances:
        if inst.name not in new_argv:
            continue
        old = old_argv.get(inst.name)
        out.append(RollInstance(inst.name, inst.role.value, inst.name in restart,
                                digest(inst.name, old) if old is not None else None,
                                digest(inst.name, new_argv[inst.name])))  # fmt: skip
    return out


@dataclass
class RolloutRunner:
    """Walks a RollPlan: drain -> restart -> health -> canary -> undrain, step by step."""

    plan: RollPlan
    gate: HealthGate
    rotation: Rotation
    restart: Callable[[list[str]], None]  # the target: restart these instances with the new definition
    say: Callable[[str], None]
    alive: Callable[[str], bool] | None = None
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    log: list[str] = field(default_factory=list)

    current: Step | None = None  # the step running now (the one that failed, after a failure)
    drained: list[str] = field(default_factory=list)  # out of rotation by this rollout, not put back yet

    def run(self) -> None:
        """Every step; when one fails, what this rollout drained goes back in rotation (as far as the
        router can be reached: the router then takes a restarted instance back when its /health
        answers), then the failure propagates."""
        for n, step in enumerate(self.plan.steps, 1):
            self.current = step
            t0 = time.monotonic()
            try:
                self._step(step)
            except BaseException:
                self._restore()
                raise
            line = f"step {n}/{len(self.plan.steps)}: {step.describe()} ({time.monotonic() - t0:.1f} s)"
            self.log.append(line)
            self.say(line)
        self.current = None

    def _step(self, step: Step) -> None:
        names = list(step.instances)
        if step.op is Op.DRAIN:
            self.drained += [n for n in names if n not in self.drained]
            try:
                self.rotation.drain(names, self.drain_timeout_s)
            except AdminMissing as e:
                self._without_admin(e, names)
        elif step.op is Op.UNDRAIN:
            try:
                self.rotation.undrain(names)
            except AdminMissing as e:
                self._without_admin(e, names)
            self.drained = [n for n in self.drained if n not in names]
        else:
            self.restart(names)
            self.gate.wait(names, alive=self.alive)
            self._canary(step)

    def _without_admin(self, e: AdminMissing, names: list[str]) -> None:
        """The router has no admin API (one from before it): the rest of the rollout restarts
        without drain, as with a router that cannot drain; said once, with what it costs."""
        self.rotation = NoRotation(fallback=self.rotation.fallback)
        self.drained = []  # a router without the admin API has nothing out of rotation
        self.say(
            f"  warning: {e}: the running router has no admin API (it was started before it had one); "
            f"restarting without drain from {', '.join(names)} on: {self.rotation.description}; "
            "requests open on a restarting instance can fail (restart the router first to drain)"
            + (
                ": the fingerprint changes, so old and new instances pair until the last one restarted"
                if self.plan.fingerprint_change
                else ""
            )
        )

    def _restore(self) -> None:
        if not self.drained:
            return
        names, self.drained = self.drained, []
        try:
            self.rotation.undrain(names)
        except (DisaggError, OSError) as e:
            self.say(f"  the rollout stopped; could not put {', '.join(names)} back in rotation: {e}")
            return
        self.say(f"  the rollout stopped; put {', '.join(names)} back in rotation")

    def _canary(self, step: Step) -> None:
        if not step.canary_with:
            return
        if self.gate.desired.kv_kind not in PAIR_CANARY_KINDS:
            self.say(f"  no canary through {', '.join(step.instances)}: {self.gate.desired.kv_kind} has no pair canary")
            return
        partner = step.canary_with[0]
        for name in step.instances:
            p, d = (partner, name) if step.role == "decode" else (name, partner)
            try:
                res = self.gate.pair_canary(p, d)
            except HealthError as e:
                raise HealthError(e.name, f"canary after restarting {name}: {e.detail}") from e
            self.say(
                f"  canary {res.request_id} via {p} -> {d}: KV of {res.kv_tokens:g} tokens for this request"
                + failed_pulls_note(res)
            )


def ensure_admin_token(path: Path) -> bool:
    """The router admin token (local target): a random one written 0600 before the router starts,
    kept when the file exists so re-applies leave it alone. True when it was made now."""
    import secrets

    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return True


# systemd target, run on the router host as root: `sh -c ADMIN_TOKEN_SCRIPT token PATH`. The token
# never leaves the host through argv or output; the file is made only when missing (umask 077).
ADMIN_TOKEN_SCRIPT = r"""
set -eu
umask 077
[ -e "$1" ] && exit 0
mkdir -p -- "$(dirname -- "$1")"
tmp="$1.new.$$"
head -c 32 /dev/urandom | base64 | tr -d '\n=' | tr '+/' '-_' > "$tmp"
mv -- "$tmp" "$1"
"""
