"""SSH executor on paramiko: argv in, exit code out; atomic uploads; pinned host keys.

One `Connection` per host, hosts in parallel threads (`run_on_hosts`). Host keys are pinned
in a known_hosts file: an unknown key is added on first use (accept-new, like OpenSSH's
`StrictHostKeyChecking=accept-new`) or refused (`strict`); a key that differs from the
pinned one is always refused, naming the host and both fingerprints.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import posixpath
import secrets as _secrets
import select
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Generic, NamedTuple, TypeVar

if "paramiko" not in sys.modules and "invoke" not in sys.modules:
    # paramiko.config imports invoke (asyncio, unittest.mock, argparse: ~50 ms of CPU, a third of
    # importing paramiko) only to run `Match exec` lines of an OpenSSH client config, which
    # disaggctl never parses; paramiko runs without it (invoke is an optional import there). The
    # entry goes right after, so anything that imports invoke later gets the real one.
    sys.modules["invoke"] = None  # type: ignore[assignment]
    try:
        import paramiko
    finally:
        del sys.modules["invoke"]
import paramiko

from disaggctl.errors import DisaggError
from disaggctl.sshcrypto import KEYS, transport

if TYPE_CHECKING:
    from disaggctl.spec import ClusterSpec

T = TypeVar("T")

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
_KNOWN_HOSTS_LOCK = threading.Lock()  # threads pinning keys append to one file


class SshError(DisaggError):
    """A host could not be reached, authenticated or a transfer failed."""

    def __init__(self, host: str, message: str) -> None:
        self.host = host
        super().__init__(f"{host}: {message}")


class HostKeyError(SshError):
    """Host key unknown in strict mode, or changed since it was pinned."""


class CommandTimeout(SshError):
    pass


class SudoError(SshError):
    """sudo refused to run a command (a password is required, not in sudoers, sudo missing).

    Distinct from the command failing: the command never ran, nothing changed."""

    def __init__(self, host: str, user: str, command: str, message: str) -> None:
        self.user, self.command, self.sudo_message = user, command, message
        super().__init__(
            host,
            f"sudo as {user} refused `{command}`: {message} (disaggctl runs sudo non-interactively: "
            f"give {user} passwordless sudo (NOPASSWD) on this host, or connect as root)",
        )


# what sudo prints (exit 1) when it refuses; the command itself never ran
_SUDO_REFUSALS = (
    "a password is required",
    "a terminal is required",
    "no tty present",
    "you must have a tty",
    "is not in the sudoers file",
    "is not allowed to execute",
    "is not allowed to run sudo",
    "account validation failure",
    "unable to initialize policy plugin",
    "must be owned by uid 0",
)


def sudo_refusal(rc: int, stderr: str) -> str | None:
    """sudo's own refusal message when `sudo -n -- CMD` did not run CMD, else None."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if rc == 127 and any("sudo" in line and "not found" in line for line in lines):
        return "sudo is not installed"
    if rc != 1:
        return None
    for line in lines:
        if line.startswith("sudo:") and any(m in line for m in _SUDO_REFUSALS):
            return line.removeprefix("sudo:").strip()
    return None


@dataclass(frozen=True)
class SshTarget:
    """How to reach one host."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    key: str | None = None  # private key file; ssh-agent and default keys otherwise
    jump: SshTarget | None = None
    known_hosts: str | None = None  # None: ~/.ssh/known_hosts
    strict: bool = False
    connect_timeout: float = 10.0

    @property
    def known_hosts_path(self) -> Path:
        return Path(os.path.expanduser(self.known_hosts or DEFAULT_KNOWN_HOSTS))

    @property
    def host_key_name(self) -> str:
        """The name the key is stored under in known_hosts (OpenSSH's `[addr]:port` for non-22)."""
        return self.address if self.port == 22 else f"[{self.address}]:{self.port}"


@dataclass(frozen=True)
class CommandResult:
    rc: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


def parse_jump(value: str, base: SshTarget) -> SshTarget:
    """`user@host[:port]` (or `host`, `[v6]:port`) as a jump target sharing `base`'s keys."""
    user, _, hostport = value.rpartition("@")
    host, port = hostport, 22
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif hostport.count(":") == 1:
        host, p = hostport.split(":")
        port = int(p)
    return SshTarget(
        name=value,
        address=host,
        port=port,
        user=user or base.user,
        key=base.key,
        known_hosts=base.known_hosts,
        strict=base.strict,
        connect_timeout=base.connect_timeout,
    )


def target_for(spec: ClusterSpec, host_name: str, _seen: frozenset[str] = frozenset()) -> SshTarget:
    """Build the SshTarget of a declared host (jump: another declared host or user@host[:port])."""
    hosts = {h.name: h for h in spec.hosts}
    if host_name not in hosts:
        raise DisaggError(f"host {host_name!r} is not declared in the spec")
    h = hosts[host_name]
    s = h.ssh
    t = SshTarget(
        name=h.name,
        address=h.addr,
        port=s.port,
        user=s.user,
        key=os.path.expanduser(s.key) if s.key else None,
        known_hosts=s.known_hosts,
        strict=s.strict_host_keys,
        connect_timeout=s.connect_timeout_s,
    )
    if s.jump:
        if s.jump in _seen | {host_name}:
            raise DisaggError(f"hosts.{host_name}.ssh.jump: jump hosts form a loop through {s.jump!r}")
        jump = target_for(spec, s.jump, _seen | {host_name}) if s.jump in hosts else parse_jump(s.jump, t)
        t = SshTarget(**{**t.__dict__, "jump": jump})
    return t


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style SHA256 fingerprint."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class _PinPolicy(paramiko.MissingHostKeyPolicy):
    """Unknown key: pin it (accept-new) or refuse it (strict)."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        t = self.target
        if t.strict:
            raise HostKeyError(
                t.name,
                f"host key {key.get_name()} {fingerprint(key)} of {hostname} is not in {t.known_hosts_path} "
                "and strict host key checking is on; add it (ssh-keyscan) or turn strict_host_keys off",
            )
        path = t.known_hosts_path
        with _KNOWN_HOSTS_LOCK:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


class _KnownHosts:
    """Parsed known_hosts files, shared by every connection of the process.

    paramiko's `load_host_keys` parses the whole file (a key object per line, and a quadratic
    duplicate check) for each connection: at 32 hosts, 32 parses of a 32-line file (~35 ms of
    CPU). Here a file is parsed once per (size, mtime) - a key pinned meanwhile changes both -
    and each client gets only the entries of its own host (hashed names included: the lookup
    is paramiko's)."""

    def __init__(self) -> None:
        self._parsed: dict[str, tuple[tuple[int, int], paramiko.HostKeys]] = {}

    def lookup(self, path: Path, name: str) -> dict[str, paramiko.PKey]:
        """{key type: key} pinned for `name` in the file at path ({} when none, or no file)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_size, st.st_mtime_ns)
        with _KNOWN_HOSTS_LOCK:
            held = self._parsed.get(str(path))
            if held is None or held[0] != stamp:
                keys = paramiko.HostKeys()
                keys.load(str(path))
                held = self._parsed[str(path)] = (stamp, keys)
            found = held[1].lookup(name)
            return dict(found) if found is not None else {}


_HOST_KEYS = _KnownHosts()

_MISSING_RC = 66  # _GET_SCRIPT: the file does not exist
_GET_SCRIPT = '[ -e "$1" ] || [ -L "$1" ] || exit 66; exec cat -- "$1"'


class HttpResponse(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def text(self) -> str:
        return self.body.decode(errors="replace")


class HttpError(SshError):
    """An HTTP request through an SSH connection got no answer (refused, unreachable, timeout)."""


_RETRYABLE = (socket.timeout, TimeoutError, ConnectionError, OSError, EOFError, paramiko.SSHException)


def _client(target: SshTarget, sock: paramiko.Channel | None) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    path = target.known_hosts_path
    pinned = client.get_host_keys()
    for kind, key in _HOST_KEYS.lookup(path, target.host_key_name).items():
        pinned.add(target.host_key_name, kind, key)
    client.set_missing_host_key_policy(_PinPolicy(target))
    pkey = KEYS.load(target.key) if target.key else None  # parsed once per process (sshcrypto)
    try:
        client.connect(
            target.address,
            target.port,
            username=target.user,
            pkey=pkey,
            key_filename=None if pkey is not None else target.key,
            allow_agent=True,
            look_for_keys=target.key is None,
            timeout=target.connect_timeout,
            banner_timeout=target.connect_timeout,
            auth_timeout=target.connect_timeout,
            sock=sock,
            transport_factory=transport,
        )
    except paramiko.BadHostKeyException as e:
        client.close()
        raise HostKeyError(
            target.name,
            f"HOST KEY CHANGED for {target.host_key_name}: pinned {e.expected_key.get_name()} "
            f"{fingerprint(e.expected_key)}, server offers {e.key.get_name()} {fingerprint(e.key)}. "
            f"Refusing to connect; if the host was reinstalled, remove its line from {path}",
        ) from None
    except BaseException:
        client.close()
        raise
    return client


class _SharedJumps:
    """One SSH connection per jump host, shared by every connection through it (refcounted).

    A bastion sees one login for N hosts, not N (sshd's MaxStartups drops the excess of
    concurrent logins); paramiko opens channels on one transport from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[SshTarget, tuple[Connection, int]] = {}
        self._connecting: dict[SshTarget, threading.Lock] = {}

    def get(self, target: SshTarget, attempts: int, backoff: float) -> Connection:
        with self._lock:
            key_lock = self._connecting.setdefault(target, threading.Lock())
        with key_lock:  # one connect per jump host; the others wait for it
            with self._lock:
                held = self._conns.get(target)
                if held is not None and held[0].alive:
                    self._conns[target] = (held[0], held[1] + 1)
                    return held[0]
            conn = connect(target, attempts, backoff)
            conn._shared = True
            with self._lock:
                self._conns[target] = (conn, 1)
            return conn

    def release(self, conn: Connection) -> None:
        with self._lock:
            held = self._conns.get(conn.target)
            if held is not None and held[0] is conn:
                if held[1] > 1:
                    self._conns[conn.target] = (conn, held[1] - 1)
                    return
                del self._conns[conn.target]
        conn._close_now()


_JUMPS = _SharedJumps()


def connect(target: SshTarget, attempts: int = 3, backoff: float = 0.5) -> Connection:
    """Connect with retries of connection setup (not of auth or host key failures).

    Through a jump host: one shared connection to it per jump target (see _SharedJumps)."""
    jump_conn = _JUMPS.get(target.jump, attempts, backoff) if target.jump else None
    last: BaseException | None = None
    for i in range(attempts):
        sock = None
        try:
            if jump_conn is not None:
                transport = jump_conn.client.get_transport()
                assert transport is not None
                sock = transport.open_channel(
                    "direct-tcpip", (target.address, target.port), ("127.0.0.1", 0), timeout=target.connect_timeout
                )
            return Connection(target, _client(target, sock), jump_conn)
        except (HostKeyError, paramiko.AuthenticationException) as e:
            if jump_conn:
                jump_conn.close()
            if isinstance(e, paramiko.AuthenticationException):
                raise SshError(target.name, f"authentication as {target.user} failed: {e}") from None
            raise
        except _RETRYABLE as e:
            last = e
            if i + 1 < attempts:
                time.sleep(backoff * (2**i))
    if jump_conn:
        jump_conn.close()
    via = f" via {target.jump.name}" if target.jump else ""
    raise SshError(
        target.name,
        f"cannot connect to {target.user}@{target.address}:{target.port}{via} after {attempts} attempts: "
        f"{type(last).__name__}: {last}",
    )


class Connection:
    """One SSH connection to a host: commands, atomic uploads, reads."""

    def __init__(self, target: SshTarget, client: paramiko.SSHClient, jump: Connection | None = None) -> None:
        self.target = target
        self.client = client
        self._jump = jump
        self._sftp: paramiko.SFTPClient | None = None
        self._shared = False  # a jump connection shared through _JUMPS: closed by its last user
        self._close_lock = threading.Lock()  # close() may race with run_on_hosts' timeout

    @property
    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def is_root(self) -> bool:
        return self.target.user == "root"

    def command_line(self, argv: list[str], sudo: bool = False) -> str:
        line = shlex.join(argv)
        return f"sudo -n -- {line}" if sudo and not self.is_root else line

    def run(
        self, argv: list[str], input: bytes | None = None, timeout: float | None = None, sudo: bool = False
    ) -> CommandResult:
        """Run argv (joined with shlex for the remote shell); success is rc == 0."""
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise SshError(self.name, "connection is closed")
        line = self.command_line(argv, sudo)
        try:
            chan = transport.open_session()
        except paramiko.SSHException as e:
            raise SshError(self.name, f"cannot open a session: {e}") from None
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            chan.exec_command(line)
            if input:
                chan.sendall(input)
            chan.shutdown_write()
            # select on the channel: paramiko signals its pipe on stdout, stderr and close, so
            # both streams drain together (reading one to EOF first can deadlock on the window)
            while True:
                while chan.recv_ready():
                    out.append(chan.recv(65536))
                while chan.recv_stderr_ready():
                    err.append(chan.recv_stderr(65536))
                pending = chan.recv_ready() or chan.recv_stderr_ready()
                if not pending and chan.exit_status_ready() and (chan.eof_received or chan.closed):
                    break
                wait = 1.0 if deadline is None else deadline - time.monotonic()
                if wait <= 0:
                    raise CommandTimeout(self.name, f"command timed out after {timeout} s: {line}")
                select.select([chan], [], [], min(wait, 1.0))
            if not chan.exit_status_ready():
                raise SshError(self.name, f"connection lost running {argv[0]} (no exit status)")
            rc = chan.recv_exit_status()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise SshError(self.name, f"connection lost running {argv[0]}: {e}") from None
        finally:
            chan.close()
        result = CommandResult(rc, b"".join(out), b"".join(err))
        if sudo and not self.is_root:
            refused = sudo_refusal(rc, result.err)
            if refused is not None:
                raise SudoError(self.name, self.target.user, shlex.join(argv), refused)
        return result

    def check_sudo(self) -> None:
        """Preflight: raise SudoError (host, user, sudo's message) unless `sudo -n` works here.

        Run it before changing anything on a host; a root login needs no sudo."""
        if self.is_root:
            return
        r = self.run(["true"], sudo=True, timeout=30)  # raises SudoError on a refusal
        if r.rc != 0:
            raise SudoError(self.name, self.target.user, "true", r.err.strip() or f"exit {r.rc}")

    def stream(self, argv: list[str], on_line: Callable[[str], None], sudo: bool = False) -> int:
        """Run argv and hand each output line (stdout and stderr merged) to on_line as it arrives."""
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise SshError(self.name, "connection is closed")
        chan = transport.open_session()
        try:
            chan.set_combine_stderr(True)
            chan.exec_command(self.command_line(argv, sudo))
            chan.shutdown_write()
            for raw in chan.makefile("rb"):
                on_line(raw.decode(errors="replace").rstrip("\n"))
            return chan.recv_exit_status()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise SshError(self.name, f"connection lost running {argv[0]}: {e}") from None
        finally:
            chan.close()

    def check(
        self, argv: list[str], input: bytes | None = None, timeout: float | None = None, sudo: bool = False
    ) -> CommandResult:
        """run(), raising SshError naming the host and command when rc != 0."""
        r = self.run(argv, input=input, timeout=timeout, sudo=sudo)
        if r.rc != 0:
            raise SshError(self.name, f"`{shlex.join(argv)}` exited {r.rc}: {r.err.strip() or r.out.strip()}")
        return r

    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
            except (OSError, paramiko.SSHException) as e:
                raise SshError(self.name, f"cannot open SFTP: {e}") from None
        return self._sftp

    def put(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Write a file atomically: a temp file in the same folder, chmod, then rename over.

        Whatever step fails, no staged or temporary file is left behind (best effort when the
        connection itself is gone)."""
        d, base = posixpath.split(path)
        tmp = posixpath.join(d, f".{base}.dctl-{_secrets.token_hex(4)}")
        try:
            if self.is_root:
                self._put_root(path, tmp, data, mode)
            else:
                self._put_sudo(path, tmp, data, mode)
        except (OSError, paramiko.SSHException) as e:
            raise SshError(self.name, f"cannot write {path}: {e}") from None

    def _put_root(self, path: str, tmp: str, data: bytes, mode: int) -> None:
        sftp = self.sftp()
        try:
            # create with the final mode before any byte is written (secrets never world-readable)
            with sftp.open(tmp, "wb") as f:
                f.chmod(mode)
                f.set_pipelined(True)
                f.write(data)
            sftp.posix_rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError, paramiko.SSHException):
                sftp.remove(tmp)
            raise

    def _put_sudo(self, path: str, tmp: str, data: bytes, mode: int) -> None:
        # SFTP runs as the login user: stage in its home (0600), install with sudo next to the
        # destination, rename over it; the staged file and the temp file go whatever fails
        staged = f".dctl-upload-{_secrets.token_hex(6)}"
        sftp = self.sftp()
        installed = False
        try:
            with sftp.open(staged, "wb") as f:
                f.chmod(0o600)
                f.write(data)
            installed = True
            self.check(["install", "-m", format(mode, "o"), "-o", "root", "-g", "root", staged, tmp], sudo=True)
            self.check(["mv", "-fT", tmp, path], sudo=True)
            installed = False
        finally:
            with contextlib.suppress(OSError, paramiko.SSHException, SshError):
                sftp.remove(staged)
            if installed:
                with contextlib.suppress(OSError, paramiko.SSHException, SshError):
                    self.run(["rm", "-f", "--", tmp], sudo=True, timeout=30)

    def get(self, path: str) -> bytes | None:
        """A file's content, or None when it does not exist.

        Not a root login: read with sudo; a sudo refusal raises SudoError (never read as
        "missing"), any other failure to read raises SshError."""
        if not self.is_root:
            r = self.run(["sh", "-c", _GET_SCRIPT, "get", path], sudo=True, timeout=120)
            if r.rc == _MISSING_RC:
                return None
            if r.rc != 0:
                raise SshError(self.name, f"cannot read {path}: {r.err.strip() or f'exit {r.rc}'}")
            return r.stdout
        try:
            with self.sftp().open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except (OSError, paramiko.SSHException) as e:
            raise SshError(self.name, f"cannot read {path}: {e}") from None

    def http(
        self,
        method: str,
        host: str,
        port: int,
        path: str = "/",
        body: bytes | None = None,
        timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """One HTTP request to host:port as seen FROM this host (a direct-tcpip channel of this
        SSH connection, so through its jump host too): (status, headers, body).

        Raises HttpError (an SshError) when no answer comes: refused, unreachable, timed out."""
        from disaggctl.sshhttp import request  # http.client: only when a check really runs

        what = f"{method} http://{host}:{port}{path}"
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise HttpError(self.name, f"{what}: connection is closed")
        try:
            chan = transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=timeout)
        except paramiko.ChannelException as e:
            # the SSH server could not connect: refused, no route, or forwarding disabled
            raise HttpError(self.name, f"{what}: cannot connect from {self.name} to {host}:{port} ({e.text})") from None
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise HttpError(self.name, f"{what}: no forwarding channel: {e or type(e).__name__}") from None
        try:
            return request(chan, self.name, method, host, port, path, body, timeout, headers)
        except paramiko.SSHException as e:
            raise HttpError(self.name, f"{what}: {e}") from None

    def http_url(
        self, method: str, url: str, body: bytes | None = None, timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResponse:
        """http() for an `http://host:port/path` URL (health and canary URLs)."""
        from disaggctl.sshhttp import split_url

        host, port, path = split_url(url)
        return self.http(method, host, port, path, body, timeout, headers)

    def close(self) -> None:
        if self._shared:
            _JUMPS.release(self)
        else:
            self._close_now()

    def _close_now(self) -> None:
        with self._close_lock:
            sftp, self._sftp = self._sftp, None
            jump, self._jump = self._jump, None
        if sftp is not None:
            with contextlib.suppress(OSError, paramiko.SSHException):
                sftp.close()
        self.client.close()
        if jump is not None:
            jump.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class HostResult(Generic[T]):
    """The outcome of a per-host function: a value or the exception that stopped it."""

    host: str
    value: T | None = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def run_on_hosts(
    targets: Iterable[SshTarget],
    fn: Callable[[Connection], T],
    max_workers: int = 32,
    timeout: float | None = None,
    connector: Callable[[SshTarget], Connection] = connect,
) -> dict[str, HostResult[T]]:
    """Run fn(connection) on every host in parallel threads, one connection per host.

    An unreachable or failing host yields a HostResult with its error; the others go on.
    A per-host timeout closes that host's connection, which makes its pending I/O fail.
    """
    tlist = list(targets)

    def one(t: SshTarget) -> HostResult[T]:
        start = time.monotonic()
        timer: threading.Timer | None = None
        conn: Connection | None = None
        expired = threading.Event()
        try:
            conn = connector(t)
            if timeout is not None:
                closing = conn

                def expire() -> None:
                    expired.set()
                    closing.close()

                timer = threading.Timer(max(0.0, timeout - (time.monotonic() - start)), expire)
                timer.daemon = True
                timer.start()
            value = fn(conn)
            if expired.is_set():
                raise SshError(t.name, f"timed out after {timeout:g} s")
            return HostResult(t.name, value=value, seconds=time.monotonic() - start)
        except Exception as e:  # reported per host, the others continue
            err: Exception = SshError(t.name, f"timed out after {timeout:g} s") if expired.is_set() else e
            return HostResult(t.name, error=err, seconds=time.monotonic() - start)
        finally:
            if timer is not None:
                timer.cancel()
            if conn is not None:
                conn.close()

    if not tlist:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(tlist)))) as ex:
        results = list(ex.map(one, tlist))
    return {r.host: r for r in results}


def targets_for(spec: ClusterSpec, hosts: Iterable[str]) -> list[SshTarget]:
    return [target_for(spec, h) for h in hosts]

