"""Run the probe agent on hosts (over SSH, in parallel) or on this machine, and read its answer.

The agent program goes to the host's python3 on stdin (`python3 -`): nothing is written on the
host. Anything with `run(argv, input=, timeout=)` returning `.rc/.stdout/.stderr` can carry it
(`Runner`): an SSH `Connection`, or `LocalRunner` here. One failing host never stops the others.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pydantic import ValidationError

from disaggctl.probe.bundle import agent_source
from disaggctl.probe.checks import detect_problems
from disaggctl.topology import HostTopology

if TYPE_CHECKING:
    from disaggctl.spec import ClusterSpec

AGENT_TIMEOUT_S = 120.0


class Result(Protocol):
    @property
    def rc(self) -> int: ...
    @property
    def stdout(self) -> bytes: ...
    @property
    def stderr(self) -> bytes: ...


class Runner(Protocol):
    def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = None) -> Result: ...


@dataclass
class LocalResult:
    rc: int
    stdout: bytes
    stderr: bytes


class LocalRunner:
    """Runs argv on this machine (for `probe --local` and tests)."""

    def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = None) -> LocalResult:
        try:
            r = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
        except FileNotFoundError:
            return LocalResult(127, b"", f"{argv[0]}: command not found".encode())
        except subprocess.TimeoutExpired:
            return LocalResult(124, b"", f"timed out after {timeout} s".encode())
        return LocalResult(r.returncode, r.stdout, r.stderr)


class ProbeFailed(Exception):
    """The agent did not produce a topology on a host (no python3, crashed, bad output)."""


@dataclass
class HostProbe:
    """One host's outcome: a topology, an error, or both (a host that answered but has no GPU)."""

    host: str
    topology: HostTopology | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def agent_argv(python: str = "python3", env: dict[str, str] | None = None, mode: str = "auto") -> list[str]:
    env_part = ["env", *(f"{k}={v}" for k, v in sorted(env.items()))] if env else []
    return [*env_part, python, "-", "--mode", mode]


def run_agent(runner: Runner, *, python: str = "python3", env: dict[str, str] | None = None,
              mode: str = "auto", timeout: float = AGENT_TIMEOUT_S) -> HostTopology:
    """Feed the agent to the host's Python and parse its JSON. Raises ProbeFailed with the reason."""
    argv = agent_argv(python, env, mode)
    r = runner.run(argv, input=agent_source().encode(), timeout=timeout)
    err = r.stderr.decode(errors="replace").strip()
    if r.rc == 127:
        raise ProbeFailed(f"{python} not found on the host (the probe needs Python 3.8+): {err}")
    if r.rc != 0:
        tail = "\n".join(err.splitlines()[-5:])
        raise ProbeFailed(f"probe agent exited {r.rc} ({shlex.join(argv)}): {tail or 'no output'}")
    try:
        return HostTopology.model_validate(json.loads(r.stdout))
    except (ValueError, ValidationError) as e:
        raise ProbeFailed(f"probe agent printed no valid topology: {str(e).splitlines()[0]}") from None


def finish(name: str, topo: HostTopology, expected_gpus: int | None, seconds: float) -> HostProbe:
    """Detect problems; a host that answered without any GPU is an error for that host only."""
    topo.problems = detect_problems(topo, expected_gpus)
    error = None
    if not topo.gpus:
        why = "; ".join(topo.warnings) or "no GPU"
        error = f"no NVIDIA driver or GPU found ({why})"
    return HostProbe(name, topo, error, seconds)


def probe_local(*, python: str | None = None, env: dict[str, str] | None = None, mode: str = "auto",
                expected_gpus: int | None = None, timeout: float = AGENT_TIMEOUT_S) -> HostProbe:
    """Probe this machine with this interpreter (it has nvidia-ml-py when disaggctl[nvml] is installed)."""
    start = time.monotonic()
    try:
        topo = run_agent(LocalRunner(), python=python or sys.executable, env=env, mode=mode, timeout=timeout)
    except ProbeFailed as e:
        return HostProbe("local", None, str(e), time.monotonic() - start)
    return finish(topo.hostname or "local", topo, expected_gpus, time.monotonic() - start)


def expected_gpus(spec: ClusterSpec, host: str) -> int | None:
    h = spec.host(host)
    return h.gpus if h.gpus is not None else spec.hardware.gpus_per_host


def probe_host_names(spec: ClusterSpec) -> list[str]:
    """The hosts `probe` visits by default: every declared host but a pure jump host (another
    host's `ssh.jump`, declared with `gpus: 0`: a bastion has no GPU to probe)."""
    jumps = {h.ssh.jump for h in spec.hosts if h.ssh.jump}
    return [h.name for h in spec.hosts if not (h.name in jumps and h.gpus == 0)]


def probe_hosts(spec: ClusterSpec, hosts: list[str] | None = None, *, python: str = "python3",
                env: dict[str, str] | None = None, mode: str = "auto",
                timeout: float = AGENT_TIMEOUT_S, max_workers: int = 32) -> list[HostProbe]:
    """Probe the spec's hosts (or the named ones) in parallel over SSH, in spec order."""
    from disaggctl import ssh  # paramiko: imported only when hosts are really probed

    names = hosts or probe_host_names(spec)
    targets = ssh.targets_for(spec, names)

    def one(conn: ssh.Connection) -> HostTopology:
        return run_agent(conn, python=python, env=env, mode=mode, timeout=timeout)

    results = ssh.run_on_hosts(targets, one, max_workers=max_workers, timeout=timeout + 30)
    out = []
    for name in names:
        r = results[name]
        if r.value is not None:
            out.append(finish(name, r.value, expected_gpus(spec, name), r.seconds))
        else:
            err = r.error
            msg = str(err) if err is not None else "unknown error"
            if not msg.startswith(name):
                msg = f"{name}: {msg}"
            out.append(HostProbe(name, None, msg, r.seconds))
    return out
