"""Fixtures for stand-in OpenAI-compatible engines (owned by the router work).

`standin` (function scope) and `standin_module` (module scope) are factories that start
stand-in engines (tests/support/standin_engine.py, stdlib only) and builtin routers as real
processes on free loopback ports, and stop them all at teardown. `standin_pd` is a ready
NIXL 1 prefill + 1 decode pair behind a router (module scope).

    def test_x(standin):
        p = standin.engine("prefill-0", kv="nixl", role="kv_producer")
        d = standin.engine("decode-0", kv="nixl", role="kv_consumer")
        r = standin.router(kv_kind="nixl", prefill=[p], decode=[d])
        post_json(r.url + "/v1/completions", {...})
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

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "support" / "standin_engine.py"
MODEL = "tiny"
CONNECTORS = {"nixl": "NixlConnector", "shared-storage": "ExampleConnector", "lmcache": "LMCacheConnectorV1"}


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_base(n: int = 1) -> int:
    """A port p with p .. p+n-1 all free on 127.0.0.1, below the kernel's ephemeral range: a port that
    bind(0) handed out is one that outgoing connections (the router's to its engines, test clients) also
    get, and a listener started a moment later on it (or on p+1, the router's admin port) then fails
    with "address already in use" (seen: 1 run in 6 of tests/test_local_rolling.py)."""
    rng = random.Random()
    top = min(_ephemeral_low(), 65000) - n
    for _ in range(500):
        base = rng.randrange(10000, top)
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports below the ephemeral range")


def free_port() -> int:
    return free_base(1)


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP call; returns (status, headers, body) for any status (no raise on 4xx/5xx)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def post_json(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, data = http("POST", url, body, headers)
    return status, json.loads(data) if data else None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels as written)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of `name` whose labels include all of `labels`."""
    total = 0.0
    for key, v in metrics.items():
        base = key.split("{", 1)[0]
        if base != name:
            continue
        if all(f'{k}="{val}"' in key for k, val in labels.items()):
            total += v
    return total


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"process exited with {proc.returncode} before listening on {port}:\n{log.read_text()[-3000:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s:\n{log.read_text()[-3000:]}")


@dataclass
class Proc:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        status, _, data = http("GET", self.url + "/metrics")
        assert status == 200, data
        return parse_metrics(data.decode())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Engine(Proc):
    kv_transfer_config: dict[str, Any] | None = None
    lmcache_init_ports: list[int] = field(default_factory=list)
    lmcache_alloc_ports: list[int] = field(default_factory=list)

    def requests(self, path: str | None = None) -> list[dict[str, Any]]:
        """The generation/tokenize requests this engine received (method, path, headers, body)."""
        _, _, data = http("GET", self.url + "/standin/requests")
        seen: list[dict[str, Any]] = json.loads(data)
        return [r for r in seen if path is None or r["path"] == path]

    def reset(self) -> None:
        http("POST", self.url + "/standin/reset", {})

    def upstream(self) -> dict[str, Any]:
        """This engine as a RouterConfig upstream."""
        up: dict[str, Any] = {"name": self.name, "url": self.url}
        if self.lmcache_init_ports:
            up.update(
                lmcache_host="127.0.0.1",
                lmcache_init_ports=self.lmcache_init_ports,
                lmcache_alloc_ports=self.lmcache_alloc_ports,
            )
        return up


@dataclass
class RouterProc(Proc):
    config: dict[str, Any] = field(default_factory=dict)


class Standin:
    """Starts stand-in engines and routers; `close()` stops every process it started."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp / f"{name}.log"
        f = open(log, "wb")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            argv,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=REPO,
        )
        f.close()
        return proc, log

    def engine(
        self,
        name: str,
        *,
        kv: str | None = None,
        role: str | None = None,
        extra: dict[str, Any] | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        lmcache_ranks: int = 1,
        proxy_port: int | None = None,
        port: int | None = None,
        python: str = sys.executable,
        isolated: bool = False,
        vllm_bin: str | None = None,
        wait: bool = True,
    ) -> Engine:
        """Start one stand-in engine. kv: nixl | shared-storage | lmcache; role: kv_producer | kv_consumer.
        `vllm_bin`: start it as `VLLM serve ...` (a wrapper from `standin_engine.py install-wrapper`)."""
        port = port or free_port()
        head = [vllm_bin] if vllm_bin else [python, *(["-I"] if isolated else []), str(STANDIN)]
        argv = [*head, "serve", MODEL, "--port", str(port), "--host", "127.0.0.1", *args]
        ktc = None
        init_ports: list[int] = []
        alloc_ports: list[int] = []
        env = dict(env or {})
        if kv:
            ktc = {"kv_connector": CONNECTORS[kv], "kv_role": role or "kv_both"}
            extra = dict(extra or {})
            if kv == "lmcache":
                if role == "kv_consumer":
                    init_ports = [free_port() for _ in range(lmcache_ranks)]
                    alloc_ports = [free_port() for _ in range(lmcache_ranks)]
                    extra.update(
                        {
                            "lmcache.pd_role": "receiver",
                            "lmcache.pd_peer_host": "127.0.0.1",
                            "lmcache.pd_peer_init_port": init_ports,
                            "lmcache.pd_peer_alloc_port": alloc_ports,
                        }
                    )
                else:
                    extra.update(
                        {
                            "lmcache.pd_role": "sender",
                            "lmcache.pd_proxy_host": "127.0.0.1",
                            "lmcache.pd_proxy_port": proxy_port,
                        }
                    )
            if extra:
                ktc["kv_connector_extra_config"] = extra
            argv += ["--kv-transfer-config", json.dumps(ktc)]
        proc, log = self._spawn(name, argv, env)
        eng = Engine(name, port, proc, log, ktc, init_ports, alloc_ports)
        self.procs.append(eng)
        if wait:
            _wait_port(port, proc, log)
        return eng

    def router(
        self, *, kv_kind: str, prefill: list[Engine], decode: list[Engine], wait_healthy: bool = True, **settings: Any
    ) -> RouterProc:
        """Start `python -m disaggctl.router` with a RouterConfig built from the engines and settings."""
        port = free_port()
        cfg: dict[str, Any] = {
            "bind": "127.0.0.1",
            "port": port,
            "model": MODEL,
            "kv_kind": kv_kind,
            "prefill": [e.upstream() for e in prefill],
            "decode": [e.upstream() for e in decode],
            "health_interval_s": 0.5,
            "connect_timeout_s": 2.0,
            "request_timeout_s": 30,
            "local_prefill_threshold": 8,
        }
        if kv_kind == "lmcache" and "lmcache_proxy_port" not in settings:
            cfg.update(lmcache_proxy_bind="127.0.0.1", lmcache_proxy_port=free_port())
        cfg.update(settings)
        path = self.tmp / f"router-{port}.json"
        path.write_text(json.dumps(cfg, indent=2))
        argv = [sys.executable, "-m", "disaggctl.router", "--config", str(path), "--log-level", "DEBUG"]
        proc, log = self._spawn(f"router-{port}", argv, None)
        r = RouterProc(f"router-{port}", port, proc, log, cfg)
        self.procs.append(r)
        _wait_port(port, proc, log)
        if wait_healthy:
            deadline = time.monotonic() + 60
            while http("GET", r.url + "/health")[0] != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"router never healthy:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
        return r

    def pair(self, kv: str = "nixl", **settings: Any) -> tuple[Engine, Engine, RouterProc]:
        """One prefill + one decode of connector `kv` behind a router."""
        proxy = free_port() if kv == "lmcache" else None
        extra = {"shared_storage_path": str(self.tmp / "kv-shared")} if kv == "shared-storage" else None
        d = self.engine("decode-0", kv=kv, role="kv_consumer", extra=extra)
        p = self.engine("prefill-0", kv=kv, role="kv_producer", extra=extra, proxy_port=proxy)
        if proxy:
            settings.setdefault("lmcache_proxy_bind", "127.0.0.1")
            settings.setdefault("lmcache_proxy_port", proxy)
        r = self.router(kv_kind=kv, prefill=[p], decode=[d], **settings)
        return p, d, r

    def close(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                p.stop()
        self.procs.clear()


@dataclass
class StandinPD:
    prefill: Engine
    decode: Engine
    router: RouterProc


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[Standin]:
    """Factory for stand-in engines and routers (processes stopped after the test)."""
    s = Standin(tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def standin_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standin]:
    """The same factory, module scope (processes shared by a module's tests)."""
    s = Standin(tmp_path_factory.mktemp("standin"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def standin_pd(standin_module: Standin) -> StandinPD:
    """A NIXL stand-in prefill + decode behind a builtin router (local_prefill_threshold 8 tokens)."""
    return StandinPD(*standin_module.pair("nixl"))
