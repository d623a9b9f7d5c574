"""A per-deployment lock on a host: one apply/destroy at a time, across operators' machines.

The lock is a directory (`mkdir` is atomic) holding `owner.json`: who (user, operator host,
pid, command), since when, and a random token. Acquiring runs one remote script with sudo:
`mkdir` wins or it prints the holder. A lock is *stale* when its holder process is gone on
this same operator machine, or when it is older than a bound; a stale lock is never broken
silently: `acquire(force=True)` (a `--force-unlock`) breaks it, stale or not.

    owner = LockOwner.here("apply spec.yaml", deployment="llama70b")
    with held(conn, lock_path("llama70b"), owner):   # raises LockHeld naming the holder
        ...                                          # released on exit, also on errors
"""

from __future__ import annotations

import getpass
import json
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from disaggctl.errors import DisaggError

if TYPE_CHECKING:
    from disaggctl.ssh import Connection

LOCK_ROOT = "/var/lib/disaggctl/locks"
DEFAULT_STALE_AFTER_S = 6 * 3600.0  # no apply holds a lock this long

# $1 lock dir; stdin: owner JSON. Prints "acquired <before> [<stamp>] <now>" or "held <age_s>\n<owner json>".
# <before>: the lock folder's mtime before our mkdir ("new": the folder did not exist); <stamp>: the
# mtime of the lock's release stamp (touched by every release and break before the lock goes, read
# after our mkdir won: no release can slip in between; absent when there is none); <now>: the mtime of
# our owner record (the same coarse clock as the other two). See Taken.quiet_s.
_ACQUIRE = r"""set -eu
d=$1
if [ -d "${d%/*}" ]; then w=$(stat -c %.9Y -- "${d%/*}" 2>/dev/null) || w=-; else mkdir -p -m 0755 "${d%/*}"; w=new; fi
if mkdir -m 0755 "$d" 2>/dev/null; then
  cat > "$d/owner.json.tmp"; mv -f "$d/owner.json.tmp" "$d/owner.json"
  # shellcheck disable=SC2046 # one word per mtime: the stamp's (when there is one), then ours
  echo acquired "$w" $(stat -c %.9Y -- "${d%/*}/.${d##*/}.released" "$d/owner.json" 2>/dev/null)
else
  echo "held $(( $(date +%s) - $(stat -c %Y "$d") ))"; cat "$d/owner.json" 2>/dev/null || true
fi
"""
# $1 lock dir; $2 token: removes the lock only when the token is ours. Prints released|not-ours|absent.
_RELEASE = r"""set -eu
d=$1
[ -d "$d" ] || { echo absent; exit 0; }
if grep -qF "\"token\": \"$2\"" "$d/owner.json" 2>/dev/null; then
  : > "${d%/*}/.${d##*/}.released"; rm -rf -- "$d"; echo released
else
  echo not-ours
fi
"""
# $1 lock dir: stamp the release (see _ACQUIRE), then break the lock.
_BREAK = r""": > "${1%/*}/.${1##*/}.released"; rm -rf -- "$1"
"""
# $1 lock dir; read-only (a no-op apply takes no lock). Prints the host's time first (read before the
# lock folder's times, so activity after it shows as newer than it), then "<mtime> <path>" for the lock
# folder, its release stamp and the lock (those that exist; "new" when the folder does not), then
# "@@owner" and the owner record.
_PEEK = r"""d=$1
date +%s.%N
[ -d "${d%/*}" ] || echo new
stat -c '%.9Y %n' -- "${d%/*}" "${d%/*}/.${d##*/}.released" "$d" 2>/dev/null
echo @@owner
cat -- "$d/owner.json" 2>/dev/null
exit 0
"""
# $1 lock dir. Prints "absent" or "held <age_s>\n<owner json>".
_READ = r"""d=$1
[ -d "$d" ] || { echo absent; exit 0; }
echo "held $(( $(date +%s) - $(stat -c %Y "$d") ))"; cat "$d/owner.json" 2>/dev/null || true
"""


def lock_path(deployment: str, root: str = LOCK_ROOT) -> str:
    """The lock directory of a deployment on a host."""
    if not deployment or "/" in deployment or deployment.startswith("."):
        raise ValueError(f"bad deployment name for a lock: {deployment!r}")
    return f"{root}/{deployment}.lock"


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock. `token` tells our own lock from anyone else's."""

    user: str
    operator_host: str
    pid: int
    since: float  # epoch seconds, the operator's clock
    command: str
    deployment: str = ""
    token: str = ""

    @classmethod
    def here(cls, command: str, deployment: str = "") -> LockOwner:
        """This process on this machine, now."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        return cls(user, socket.gethostname(), os.getpid(), time.time(), command, deployment, secrets.token_hex(8))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LockOwner | None:
        """None when the text is no owner record (a lock being written, or damaged)."""
        try:
            d = json.loads(text)
            return cls(str(d["user"]), str(d["operator_host"]), int(d["pid"]), float(d["since"]),
                       str(d["command"]), str(d.get("deployment", "")), str(d.get("token", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self, now: float | None = None) -> str:
        """`alice@laptop (pid 4242) since 2026-12-03 07:40:00 UTC (12 min ago): disaggctl apply x.yaml`"""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        ago = "" if now is None else f" ({_ago(now - self.since)})"
        return f"{self.user}@{self.operator_host} (pid {self.pid}) since {stamp}{ago}: {self.command}"


@dataclass(frozen=True)
class LockState:
    """A lock seen on a host: its owner record (None if unreadable) and its age by the host's clock."""

    path: str
    owner: LockOwner | None
    age_s: float


def _span(s: float) -> str:
    s = max(0.0, s)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _ago(s: float) -> str:
    return _span(s) + " ago"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(
    state: LockState,
    this_host: str | None = None,
    alive: Callable[[int], bool] = pid_alive,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> str | None:
    """Why a lock is stale, or None when its holder may still be working."""
    if state.age_s > stale_after_s:
        return f"older than {_span(stale_after_s)}"
    o = state.owner
    if o is None:
        # mkdir and the owner record are two steps: give a writer a moment before calling it damaged
        return "no owner record" if state.age_s > 60 else None
    if o.operator_host == (this_host if this_host is not None else socket.gethostname()) and not alive(o.pid):
        return f"its process {o.pid} is gone on {o.operator_host}"
    return None


class LockHeld(DisaggError):
    """Someone else holds the deployment's lock on a host."""

    def __init__(self, host: str, state: LockState, stale: str | None) -> None:
        self.host, self.state, self.stale = host, state, stale
        who = state.owner.describe(time.time()) if state.owner else f"unknown holder ({state.age_s:.0f} s old)"
        hint = (
            f"it looks stale ({stale}): break it with --force-unlock if that apply is really gone"
            if stale
            else "wait for it to finish, or break it with --force-unlock if that apply is really gone"
        )
        super().__init__(f"{host}: deployment is locked by {who} ({state.path}); {hint}")


@dataclass(frozen=True)
class Taken:
    """A lock this process took: the lock it broke first (force), and for how long before it no
    lock in the same folder had been taken or released (the host's clock)."""

    broken: LockState | None = None
    quiet_s: float | None = None  # inf: the lock folder is new; None: unknown (nothing to rely on)


def _quiet(words: list[str]) -> float | None:
    """_ACQUIRE's "acquired <before> [<stamp>] <now>" -> seconds since the last lock activity."""
    if len(words) not in (3, 4) or words[1] == "-":
        return None
    try:
        now = float(words[-1])
        last = [float(w) for w in words[2:-1]] + ([] if words[1] == "new" else [float(words[1])])
    except ValueError:
        return None
    return now - max(last) if last else math.inf


def _parse(path: str, out: str) -> LockState | None:
    head, _, rest = out.partition("\n")
    if not head.startswith("held "):
        return None
    return LockState(path, LockOwner.from_json(rest.strip()) if rest.strip() else None, float(head.split()[1]))


@dataclass(frozen=True)
class Peek:
    """A lock looked at without taking it: who holds it (None: nobody), and for how long before
    the look no lock in the same folder had been taken or released (the host's clock)."""

    held: LockState | None
    quiet_s: float | None  # inf: no lock was ever in that folder; None: unknown


def _parse_peek(path: str, out: str) -> Peek:
    times, _, owner_text = out.partition("@@owner\n")
    lines = times.splitlines()
    new = "new" in lines
    try:
        now = float(lines[0])
        mtimes = {p: float(t) for t, _, p in (ln.partition(" ") for ln in lines[1:] if ln != "new")}
    except (ValueError, IndexError):
        return Peek(None, None)
    parent, _, name = path.rpartition("/")
    owner = LockOwner.from_json(owner_text.strip()) if owner_text.strip() else None
    held = None
    if path in mtimes or owner is not None:  # the lock may have appeared between stat and cat
        held = LockState(path, owner, max(0.0, now - mtimes.get(path, now)))
    activity = [t for p, t in mtimes.items() if p in (parent, f"{parent}/.{name}.released")]
    quiet = now - max(activity) if activity else (math.inf if new else None)
    return Peek(held, quiet)


def peek(conn: Connection, path: str) -> Peek:
    """Whether anyone holds the lock at `path`, and how long its folder has been quiet; changes
    nothing on the host (one command). The host's time is read with its fine clock and file times
    come from its coarse one (a tick behind at most): quiet_s may exceed the truth by that tick."""
    r = conn.check(["sh", "-c", _PEEK, "lock-peek", path], sudo=True, timeout=30)
    return _parse_peek(path, r.out)


def read(conn: Connection, path: str) -> LockState | None:
    """The lock at `path` on the host, or None when nobody holds it."""
    r = conn.check(["sh", "-c", _READ, "lock-read", path], sudo=True, timeout=30)
    return _parse(path, r.out)


def acquire(
    conn: Connection,
    path: str,
    owner: LockOwner,
    force: bool = False,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> LockState | None:
    """Take the lock or raise LockHeld (naming holder, since, from where, and whether it is stale).

    force=True breaks a lock held by anyone (like `terraform force-unlock`) and takes it; it
    returns the broken lock's state (None when there was none)."""
    return take(conn, path, owner, force, stale_after_s).broken


def take(
    conn: Connection,
    path: str,
    owner: LockOwner,
    force: bool = False,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> Taken:
    """acquire(), also saying how long the lock folder had been quiet (Taken.quiet_s)."""
    broken: LockState | None = None
    for _ in range(2):
        r = conn.check(["sh", "-c", _ACQUIRE, "lock", path], input=owner.to_json().encode(), sudo=True, timeout=30)
        if r.out.startswith("acquired"):
            return Taken(broken, None if broken else _quiet(r.out.split()))
        state = _parse(path, r.out)
        if state is None:
            raise DisaggError(f"{conn.name}: unexpected answer taking the lock {path}: {r.out.strip()[:200]}")
        if not force or broken is not None:
            raise LockHeld(conn.name, state, stale_reason(state, stale_after_s=stale_after_s))
        conn.check(["sh", "-c", _BREAK, "unlock", path], sudo=True, timeout=30)
        broken = state
    raise AssertionError("unreachable")  # pragma: no cover


def release(conn: Connection, path: str, owner: LockOwner) -> bool:
    """Remove our lock; False (and nothing removed) when the lock is absent or someone else's."""
    if not owner.token:
        raise ValueError("a lock owner without a token cannot release")
    r = conn.check(["sh", "-c", _RELEASE, "unlock", path, owner.token], sudo=True, timeout=30)
    return r.out.strip() == "released"


@contextmanager
def held(conn: Connection, path: str, owner: LockOwner, force: bool = False) -> Iterator[Taken]:
    """take() ... release(), also when the body raises."""
    taken = take(conn, path, owner, force=force)
    try:
        yield taken
    except BaseException:
        with suppress(Exception):  # the body's error matters more than a failed release
            release(conn, path, owner)
        raise
    release(conn, path, owner)
