"""How the systemd target reaches real clusters: sudo preflight, HTTP through SSH, the deployment
lock, and the hosts a deployment has ever placed files on.

    sudo_checked     a connector that runs `sudo -n true` right after connecting (a non-root login
                     whose sudo needs a password fails there: host, user, command; nothing changed)
    SshHttp          health probes, router checks and the canary through the SSH connections (a
                     direct-tcpip channel from the process's own host): bastion-only hosts work
    deployment_lock  apply/destroy hold `<state_dir>/locks/<deployment>.lock` on the lock host
                     (the first declared host that runs something): two operators see each other
    registry         every manifest records how to reach every host of the deployment (address,
                     port, user, key, jump): a host removed from the spec is still found, cleaned by
                     `apply` (plan shows its deletions) and by `destroy`; key and known_hosts are
                     this operator's where the recorded paths do not exist here (see reach())
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

from disaggctl.errors import DisaggError
from disaggctl.hostlock import LockHeld, LockOwner, Peek, Taken, held, lock_path, peek, stale_reason
from disaggctl.ssh import Connection, HttpError, SshError, SshTarget, target_for
from disaggctl.targets.systemd.manifest import HostAddress

if TYPE_CHECKING:
    from rich.console import Console

    from disaggctl.spec import ClusterSpec
    from disaggctl.targets.systemd.backend import Context, Hosts
    from disaggctl.targets.systemd.changes import Observed

Connector = Callable[..., Connection]


# --------------------------------------------------------------------------- sudo preflight


def sudo_checked(connector: Connector) -> Connector:
    """connector, then `Connection.check_sudo()` (free for root): a SudoError becomes the host's
    connection error, reported before anything is read or changed there."""

    def connect_checked(target: SshTarget, *args: object, **kw: object) -> Connection:
        conn = connector(target, *args, **kw)
        try:
            conn.check_sudo()
        except BaseException:
            conn.close()
            raise
        return conn

    return connect_checked


# --------------------------------------------------------------------------- HTTP through SSH


class SshHttp:
    """The HealthGate's probe/fetch/request through the deployment's SSH connections.

    A URL's host is matched to the declared host with that address and the request leaves from
    there (`Connection.http_url`, a direct-tcpip channel): it reaches what that host reaches, also
    when the operator reaches only a bastion. An address no host has (127.0.0.1, a VIP) goes
    through `default` (the router's host)."""

    def __init__(self, conns: Mapping[str, Connection], by_addr: Mapping[str, str], default: str | None) -> None:
        self.conns, self.by_addr, self.default = conns, by_addr, default

    @classmethod
    def for_context(cls, c: Context, conns: Mapping[str, Connection]) -> SshHttp:
        by_addr = {h.addr: h.name for h in c.spec.hosts}
        router = next((p.host for p in c.desired.processes if p.role.value == "router"), None)
        return cls(conns, by_addr, router if router in conns else next(iter(conns), None))

    def _conn(self, url: str) -> Connection:
        from disaggctl.sshhttp import split_url

        host = split_url(url)[0]
        name = self.by_addr.get(host)
        if name is None or name not in self.conns:
            name = self.default
        if name is None or name not in self.conns:
            raise OSError(f"no SSH connection to check {url} through")
        return self.conns[name]

    def request(
        self, method: str, url: str, body: bytes | None, timeout_s: float, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        try:
            r = self._conn(url).http_url(method, url, body, timeout_s, headers)
        except (HttpError, SshError) as e:
            raise OSError(str(e)) from None
        return r.status, r.body

    def probe(self, url: str, timeout_s: float) -> tuple[bool, str]:
        try:
            status, _ = self.request("GET", url, None, timeout_s, {})
        except OSError as e:
            return False, str(e)
        return status == 200, str(status) if status == 200 else f"HTTP {status}"

    def fetch(self, url: str, timeout_s: float) -> bytes:
        status, body = self.request("GET", url, None, timeout_s, {})
        if status != 200:
            raise OSError(f"GET {url}: HTTP {status}")
        return body


# --------------------------------------------------------------------------- the lock


def lock_host(c: Context) -> str:
    """Where the deployment's lock lives: the first declared host that runs something (every
    operator with the same spec picks the same one), else the first declared host."""
    return next((h for h in c.hosts if c.rendered.for_host(h)), c.hosts[0])


def lock_dir(c: Context) -> str:
    return lock_path(c.desired.name, root=f"{c.target.state_dir.rstrip('/')}/locks")


@contextmanager
def deployment_lock(hosts: Hosts, c: Context, command: str, force: bool, console: Console) -> Iterator[Taken]:
    """Hold the deployment's lock for the body; LockHeld (who, since when, from where) when taken.
    `force` (--force-unlock) breaks a lock first, saying whose."""
    name = lock_host(c)
    conn = hosts.connection(name)
    if isinstance(conn, str):  # every host's connection error (a sudo refusal), nothing changed anywhere
        why = "\n".join(hosts.errors.values())
        raise DisaggError(f"cannot take the deployment lock on {name}; nothing was changed:\n{why}")
    owner = LockOwner.here(command, c.desired.name)
    with held(conn, lock_dir(c), owner, force=force) as taken:
        broken = taken.broken
        if broken is not None:
            who = broken.owner.describe() if broken.owner else f"an unknown holder ({broken.age_s:.0f} s old)"
            console.print(f"[yellow]{name}: broke the deployment lock held by {who}[/yellow]")
        yield taken


# an observation stands when the lock folder was quiet this much longer than the observing took:
# file times come from the kernel's coarse clock (a tick, 1-10 ms, behind the fine one)
QUIET_MARGIN_S = 0.05


@contextmanager
def locked_observation(
    hosts: Hosts, c: Context, command: str, force: bool, console: Console
) -> Iterator[dict[str, Observed]]:
    """deployment_lock + observe_everything, overlapped: each declared host is observed as soon as
    its connection is up while the lock is being taken on the lock host (no host waits for the
    lock host's connection and lock command).

    What was observed before the lock was ours stands only when nobody can have changed a host
    meanwhile: every apply/destroy changes hosts only while holding the lock, and every lock taken
    or released touches the lock folder (its mtime, and a release stamp read after our mkdir won).
    So when the lock host says the folder had been quiet for longer than it has been since the
    first observation began (measured here, up to the lock's answer: that bounds it from above
    in the host's clock too), no other apply held the lock during any observation, and the
    result is the same as observing under the lock. Otherwise (an apply just ended, a broken lock,
    an old host without the times) every host is observed again, under the lock."""
    from disaggctl.targets.systemd.backend import observe_all, observe_started

    began = time.monotonic()
    early = observe_started(hosts, c)
    with deployment_lock(hosts, c, command, force, console) as taken:
        window = time.monotonic() - began
        if taken.quiet_s is not None and taken.quiet_s > window + QUIET_MARGIN_S:
            observed = {name: f.result() for name, f in early.items()}
        else:
            for f in early.values():
                f.cancel()
            observed = observe_all(hosts, c)
        yield observe_everything(hosts, c, declared=observed)


def lock_peek(hosts: Hosts, c: Context) -> Future[Peek]:
    """The deployment lock looked at on the lock host (one read-only command), not waiting for it."""
    name = lock_host(c)

    def one(n: str) -> Peek:
        conn = hosts.connection(n)
        if isinstance(conn, str):
            raise DisaggError(conn)
        return peek(conn, lock_dir(c))

    return hosts.start_each([name], one)[name]


def unlocked_since(c: Context, seen: Peek, began: float) -> bool:
    """Whether no apply or destroy held the deployment lock at any time from `began` (monotonic,
    before the first observation was sent) until the peek, which was sent after every observation
    had answered: then those observations are what observing under the lock gives, and a no-op
    apply may end there, taking no lock. LockHeld (who, since when, from where) when someone holds
    it: a no-op never says "no changes" over someone else's apply. False when the lock folder saw
    activity in that window (or its times are unknown): take the lock and observe again."""
    if seen.held is not None:
        raise LockHeld(lock_host(c), seen.held, stale_reason(seen.held))
    return seen.quiet_s is not None and seen.quiet_s > time.monotonic() - began + QUIET_MARGIN_S


@contextmanager
def lock_after_observation(
    hosts: Hosts, c: Context, command: str, console: Console, observed: dict[str, Observed], began: float
) -> Iterator[dict[str, Observed]]:
    """deployment_lock for an apply that observed every host first (from `began`, monotonic): the
    observations stand when the lock folder had been quiet since before they began (the rule of
    locked_observation), else every host is observed again, under the lock."""
    with deployment_lock(hosts, c, command, False, console) as taken:
        if taken.quiet_s is not None and taken.quiet_s > time.monotonic() - began + QUIET_MARGIN_S:
            yield observed
        else:
            yield observe_everything(hosts, c)


def lock_command(op: str, spec_file: str) -> str:
    return f"disaggctl {op} {os.path.basename(spec_file)}"


# --------------------------------------------------------------------------- the host registry


def address_of(t: SshTarget) -> HostAddress:
    return HostAddress(
        name=t.name, address=t.address, port=t.port, user=t.user, key=t.key, known_hosts=t.known_hosts,
        strict=t.strict, connect_timeout=t.connect_timeout, jump=address_of(t.jump) if t.jump else None,
    )  # fmt: skip


def target_of(a: HostAddress) -> SshTarget:
    return SshTarget(
        name=a.name, address=a.address, port=a.port, user=a.user, key=a.key, known_hosts=a.known_hosts,
        strict=a.strict, connect_timeout=a.connect_timeout, jump=target_of(a.jump) if a.jump else None,
    )  # fmt: skip


def reach(a: HostAddress, spec: ClusterSpec) -> SshTarget:
    """A remembered host as THIS operator reaches it: the address, port, user, jump and host-key
    policy it had; its key and known_hosts are the recorded paths only where they exist on this
    machine (another operator's ~/.ssh is not ours), else those of the first declared host with
    the same user (this operator's settings in this spec), else the ssh-agent and default keys
    and ~/.ssh/known_hosts."""
    mine = next((h.ssh for h in spec.hosts if h.ssh.user == a.user), None)
    key = a.key if _here(a.key) else (os.path.expanduser(mine.key) if mine and mine.key else None)
    known = a.known_hosts if _here(a.known_hosts) else (mine.known_hosts if mine else None)
    jump = reach(a.jump, spec) if a.jump else None
    return replace(target_of(a), key=key, known_hosts=known, jump=jump)


def _here(path: str | None) -> bool:
    return path is not None and os.path.exists(os.path.expanduser(path))


def remembered(observed: Mapping[str, Observed]) -> dict[str, HostAddress]:
    """Every host any observed manifest remembers."""
    out: dict[str, HostAddress] = {}
    for o in observed.values():
        if o.manifest is not None:
            out.update(o.manifest.hosts)
    return out


def observe_everything(
    hosts: Hosts, c: Context, full: bool = False, declared: dict[str, Observed] | None = None
) -> dict[str, Observed]:
    """Observe the declared hosts (unless `declared` has them already), then the hosts their
    manifests remember that the spec no longer declares (reached with the remembered address,
    user, port and jump); `full` as in observe()."""
    from disaggctl.targets.systemd.backend import observe_all, observe_more

    observed = dict(declared) if declared is not None else observe_all(hosts, c, full)
    gone = {n: a for n, a in remembered(observed).items() if n not in observed}
    if gone:
        c.removed = gone
        observed |= observe_more(hosts, c, {n: reach(a, c.spec) for n, a in gone.items()}, full)
    return observed


def final_registry(c: Context) -> dict[str, HostAddress]:
    """Every declared host that runs something, as this spec reaches it (computed once)."""
    if c.final_registry is None:
        c.final_registry = {h: address_of(target_for(c.spec, h)) for h in c.hosts if c.rendered.for_host(h)}
    return c.final_registry


def set_registry(c: Context, observed: Mapping[str, Observed]) -> None:
    """What the manifests written by this apply remember: every declared host that runs something,
    every host that holds files now (pending), and a remembered host that is unreachable (it may
    still hold files: remembered until it is cleaned). A host that never held files is never
    remembered."""
    final = dict(final_registry(c))
    before = remembered(observed)
    holding: dict[str, HostAddress] = {}
    for name, o in observed.items():
        if name in final:
            continue
        if o.error:
            if name in before:
                final[name] = holding[name] = before[name]
            continue
        if o.manifest is None:
            continue
        holding[name] = c.removed.get(name) or before.get(name) or address_of(target_for(c.spec, name))
    c.registry, c.registry_pending = final, {**final, **holding}


def stale_registry(c: Context, observed: Mapping[str, Observed]) -> list[str]:
    """Hosts that keep files but remember a different set of hosts (a removed host was cleaned)."""
    return [
        n for n, o in observed.items()
        if o.manifest is not None and c.rendered.for_host(n) and dict(o.manifest.hosts) != c.registry
    ]  # fmt: skip
