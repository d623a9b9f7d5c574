"""A small supervisor for the local target: `python -m disaggctl.targets.local.supervisor STATE_DIR`.

`disaggctl apply` starts it detached (own session) so the processes outlive the CLI. It runs
the process table `STATE_DIR/processes.json` (written by disaggctl.render.local):

- starts every process in start order (decode, prefill, router), each in its own process
  group with stdout and stderr appended to its log, and writes its pid file;
- restarts a process that exits on its own, after `restart_delay_s`, up to `max_restarts`
  times; then marks it failed and leaves it stopped;
- SIGHUP: re-reads the table, stops what was removed or changed, starts what is new or changed
  (unchanged processes keep running);
- SIGTERM / SIGINT: stops everything (reverse start order, SIGTERM to each group, SIGKILL
  after `stop_timeout_s`), removes the pid files and exits.

Its view is written atomically to `run/supervisor.json` on every change: `disaggctl status` and
the health gate read it (a failed process is reported at once instead of at the timeout).
Standard library only; it must not die because a child misbehaves.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from disaggctl import secrets as secret_files
from disaggctl.errors import DisaggError
from disaggctl.render.local import ProcSpec, Table, paths

STOP_TIMEOUT_S = 20.0
RESTART_DELAY_S = 1.0
POLL_S = 0.2


@dataclass
class ProcState:
    """What the supervisor knows about one process (serialized into supervisor.json)."""

    name: str
    state: str = "starting"  # running | restarting | failed | stopped
    pid: int | None = None
    restarts: int = 0
    last_exit: int | None = None  # exit code, negative for a signal
    started_at: float | None = None
    restart_at: float | None = None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_state(state_dir: str) -> dict[str, object] | None:
    """The supervisor's last written view, or None when there is none."""
    p = paths(state_dir)["supervisor_state"]
    try:
        data: dict[str, object] = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return data


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def supervisor_pid(state_dir: str) -> int | None:
    """The pid of a running supervisor of this state folder, else None."""
    try:
        pid = int(paths(state_dir)["supervisor_pid"].read_text().strip())
    except (OSError, ValueError):
        return None
    if not pid_alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid
    # pid reuse: only a supervisor of this very folder counts
    ours = b"disaggctl.targets.local.supervisor" in cmdline or b"disaggctl.supervisor" in cmdline  # also the old name
    return pid if ours and os.fsencode(state_dir) in cmdline else None


def kill_group(pid: int, timeout_s: float, sleep: float = 0.1) -> None:
    """SIGTERM the process group `pid` leads, then SIGKILL it after `timeout_s`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        # reap it when it is our child, so the group can disappear
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(sleep)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class Supervisor:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.paths = paths(state_dir)
        self.table = self._read_table()
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.states: dict[str, ProcState] = {}
        self.stopping = False
        self.reload = False

    def _read_table(self) -> Table:
        return Table.from_json(self.paths["table"].read_text())

    def log(self, msg: str) -> None:
        sys.stdout.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} supervisor: {msg}\n")
        sys.stdout.flush()

    def save(self) -> None:
        data = {
            "pid": os.getpid(),
            "name": self.table.name,
            "updated_at": time.time(),
            "stopping": self.stopping,
            "processes": {n: asdict(s) for n, s in self.states.items()},
        }
        write_atomic(self.paths["supervisor_state"], json.dumps(data, indent=2) + "\n")

    # ------------------------------------------------------------------ processes

    def start(self, spec: ProcSpec) -> None:
        st = self.states.setdefault(spec.name, ProcState(spec.name))
        Path(spec.cwd).mkdir(parents=True, exist_ok=True)
        for key in ("TMPDIR", "VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH"):
            if key in spec.env:
                Path(spec.env[key]).mkdir(parents=True, exist_ok=True)
        Path(spec.log).parent.mkdir(parents=True, exist_ok=True)
        try:
            env = self._env(spec)
        except (OSError, DisaggError) as e:  # the messages name the file, never a value
            self.log(f"{spec.name}: cannot read its secrets: {e}")
            st.state, st.pid, st.last_exit, st.started_at = "failed", None, 126, time.time()
            self.save()
            return
        with open(spec.log, "ab") as log:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            log.write(f"=== disaggctl {stamp}: start {spec.name} (restart {st.restarts})\n".encode())
            log.flush()
            try:
                child = subprocess.Popen(
                    spec.argv,
                    cwd=spec.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own group: stopping it stops vLLM's engine children too
                )
            except OSError as e:
                log.write(f"=== disaggctl: cannot start {spec.argv[0]}: {e}\n".encode())
                self.log(f"{spec.name}: cannot start: {e}")
                st.state, st.pid, st.last_exit, st.started_at = "failed", None, 127, time.time()
                self.save()
                return
        self.children[spec.name] = child
        write_atomic(Path(spec.pid_file), f"{child.pid}\n")
        st.state, st.pid, st.started_at, st.restart_at = "running", child.pid, time.time(), None
        self.log(f"{spec.name}: started pid {child.pid}")
        self.save()

    def _env(self, spec: ProcSpec) -> dict[str, str]:
        """The inherited environment without the secret names, the row's environment, and, for an engine,
        the secrets file's values (read at every start: a restart sees what the last apply wrote)."""
        env = {k: v for k, v in os.environ.items() if k not in set(self.table.secret_names)}
        env.update(spec.env)
        if spec.secrets and self.table.secrets_file:
            path = Path(self.table.secrets_file)
            env.update(secret_files.parse(path.read_text(), str(path)))
        return env

    def stop(self, name: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
        child = self.children.pop(name, None)
        st = self.states.get(name)
        if child is not None:
            self.log(f"{name}: stopping pid {child.pid}")
            kill_group(child.pid, timeout_s)
            child.poll()
        if st is not None:
            st.state, st.pid = "stopped", None
        try:
            spec = self.table.proc(name)
            Path(spec.pid_file).unlink(missing_ok=True)
        except KeyError:
            pass
        self.save()

    def check(self) -> None:
        """Notice exits; schedule and perform restarts."""
        now = time.monotonic()
        for spec in self.table.processes:
            st = self.states.get(spec.name)
            if st is None:
                continue
            child = self.children.get(spec.name)
            if child is not None:
                code = child.poll()
                if code is None:
                    continue
                # The group may still hold vLLM's engine process: take it down before a restart.
                kill_group(child.pid, 5.0)
                del self.children[spec.name]
                Path(spec.pid_file).unlink(missing_ok=True)
                st.last_exit, st.pid = code, None
                if self.table.restart_on_crash and st.restarts < self.table.max_restarts:
                    st.state = "restarting"
                    st.restart_at = now + self.table.restart_delay_s * (st.restarts + 1)
                    self.log(f"{spec.name}: exited with {code}; restart {st.restarts + 1} of {self.table.max_restarts}")
                else:
                    st.state = "failed"
                    self.log(f"{spec.name}: exited with {code}; not restarting (restarts {st.restarts})")
                self.save()
            elif st.state == "restarting" and st.restart_at is not None and now >= st.restart_at:
                st.restarts += 1
                self.start(spec)

    def apply_table(self, new: Table) -> None:
        """SIGHUP: converge to a new table, restarting only what changed (and what had failed)."""
        old = {p.name: p for p in self.table.processes}
        fresh = {p.name: p for p in new.processes}
        for spec in reversed(self.table.processes):
            if fresh.get(spec.name) != spec:
                self.stop(spec.name)
                self.states.pop(spec.name, None)
        self.table = new
        for spec in new.processes:
            st = self.states.get(spec.name)
            if old.get(spec.name) != spec or st is None or st.state == "failed":
                self.states.pop(spec.name, None)
                self.start(spec)
        self.save()

    # ------------------------------------------------------------------ main loop

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        for d in ("run", "logs", "work"):
            self.paths[d].mkdir(parents=True, exist_ok=True)
        write_atomic(self.paths["supervisor_pid"], f"{os.getpid()}\n")
        self.log(f"supervising {len(self.table.processes)} processes of {self.table.name}")
        for spec in self.table.processes:
            if self.stopping:
                break
            self.start(spec)
        while not self.stopping:
            if self.reload:
                self.reload = False
                try:
                    new = self._read_table()
                except (OSError, ValueError, TypeError) as e:
                    self.log(f"reload refused, keeping the running table: {e}")
                else:
                    self.log("reloading the process table")
                    self.apply_table(new)
            self.check()
            time.sleep(POLL_S)
        self.log("stopping")
        self.save()
        for spec in reversed(self.table.processes):
            self.stop(spec.name, self.table.stop_timeout_s)
        self.paths["supervisor_pid"].unlink(missing_ok=True)
        self.log("stopped")
        return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m disaggctl.targets.local.supervisor STATE_DIR\n")
        return 2
    state_dir = os.path.abspath(args[0])
    if (other := supervisor_pid(state_dir)) is not None and other != os.getpid():
        sys.stderr.write(f"a supervisor already runs for {state_dir} (pid {other})\n")
        return 1
    return Supervisor(state_dir).run()


if __name__ == "__main__":
    sys.exit(main())
