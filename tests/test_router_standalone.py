"""The router runs with only its own runtime dependencies: `python -m disaggctl.router` with the
CLI's packages (typer, paramiko, jinja2, rich, pydantic, yaml) and aiohttp blocked from import
serves a request through stand-in engines, and its config errors still come out as located lines.
(Its optional packages - uvloop, orjson, pyzmq, tokenizers - stay importable.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.plugins.standin import REPO, Standin, _wait_port, free_port, http, post_json

BLOCKED = ("typer", "paramiko", "jinja2", "rich", "pydantic", "pydantic_core", "yaml", "aiohttp")

BLOCKER = f"""
import importlib.machinery
import sys

BLOCKED = {BLOCKED!r}


class Blocker:
    # a spec whose loader refuses: `import x` fails, a find_spec() probe (yarl's) still succeeds
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"{{spec.name}} is blocked: the router must run without the CLI's dependencies")

    def exec_module(self, module):
        raise AssertionError("unreachable")


sys.meta_path.insert(0, Blocker())
"""


def blocked_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "blocker"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": f"{site}:{REPO}"}


def run_py(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, **env}, cwd=REPO
    )


def test_the_blocker_blocks(tmp_path: Path) -> None:
    env = blocked_env(tmp_path)
    for mod in BLOCKED:
        r = run_py(f"import {mod}", env)
        assert r.returncode != 0 and "is blocked" in r.stderr, (mod, r.stderr)
    r = run_py("import disaggctl.router.server, disaggctl.router.config, disaggctl.router.__main__", env)
    assert r.returncode == 0, r.stderr


def test_router_serves_with_only_its_runtime_deps(tmp_path: Path, standin: Standin) -> None:
    import os

    env = blocked_env(tmp_path)
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer")
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer")
    port = free_port()
    cfg = {
        "bind": "127.0.0.1",
        "port": port,
        "model": "tiny",
        "kv_kind": "nixl",
        "prefill": [p.upstream()],
        "decode": [d.upstream()],
        "health_interval_s": 0.5,
        "local_prefill_threshold": 8,
    }
    (tmp_path / "router.json").write_text(json.dumps(cfg))
    log = tmp_path / "router.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "disaggctl.router", "--config", str(tmp_path / "router.json")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=tmp_path,  # not the repository: PYTHONPATH alone finds disaggctl
        )
    try:
        _wait_port(port, proc, log)
        deadline = time.monotonic() + 30
        while http("GET", f"http://127.0.0.1:{port}/health")[0] != 200:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        prompt = "one two three four five six seven eight nine ten " * 4
        status, out_json = post_json(
            f"http://127.0.0.1:{port}/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 4}
        )
        assert status == 200, out_json
        direct_status, direct = post_json(
            d.url + "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 4}
        )
        assert direct_status == 200 and out_json["choices"][0]["text"] == direct["choices"][0]["text"]
        assert len(p.requests("/v1/completions")) == 1  # it went through prefill: disaggregated
        assert "is blocked" not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(10)


def test_config_errors_without_pydantic(tmp_path: Path) -> None:
    env = blocked_env(tmp_path)
    bad = tmp_path / "router.json"
    bad.write_text(
        json.dumps(
            {
                "model": "m",
                "kv_kind": "tcp",
                "port": "80",
                "prefill": [{"name": "p", "url": "10.0.0.1:8100"}],
                "decode": [{"name": "d", "url": "http://d:1", "lmcache_init_ports": [1]}],
            }
        )
    )
    r = run_py(
        f"import sys; from disaggctl.router.__main__ import main; sys.exit(main(['--config', {str(bad)!r}]))", env
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    for line in (
        "kv_kind: 'tcp' is not one of 'nixl', 'lmcache', 'shared-storage'",
        "port: expected an integer, got a string ('80')",
        "prefill[0].url: '10.0.0.1:8100' is not an http://host:port URL",
        "decode[0].lmcache_alloc_ports: needs one port per lmcache_init_ports entry",
    ):
        assert line in r.stderr, r.stderr


SYSTEM_PYTHON = "/usr/bin/python3"


def test_router_on_a_bare_system_python(tmp_path: Path, standin: Standin) -> None:
    """No third-party package at all (no uvloop, no orjson): the standard-library fallbacks serve."""
    import os

    import pytest

    check = "import sys; assert sys.version_info >= (3, 11); import importlib.util as u; "
    check += "assert not any(u.find_spec(m) for m in ('uvloop', 'orjson', 'aiohttp', 'pydantic'))"
    if not os.path.exists(SYSTEM_PYTHON) or subprocess.run([SYSTEM_PYTHON, "-c", check]).returncode:
        pytest.fail(f"{SYSTEM_PYTHON} is not a bare Python >= 3.11 (Debian 12 ships one: the router must run on it)")
    d = standin.engine("decode-0", kv="nixl", role="kv_consumer")
    p = standin.engine("prefill-0", kv="nixl", role="kv_producer")
    port = free_port()
    cfg = {"bind": "127.0.0.1", "port": port, "model": "tiny", "kv_kind": "nixl", "local_prefill_threshold": 8}
    cfg.update(prefill=[p.upstream()], decode=[d.upstream()], health_interval_s=0.5)
    (tmp_path / "router.json").write_text(json.dumps(cfg))
    log = tmp_path / "router.log"
    with open(log, "wb") as out:
        argv = [SYSTEM_PYTHON, "-m", "disaggctl.router", "--config", str(tmp_path / "router.json")]
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)  # -m: finds ./disaggctl
    try:
        _wait_port(port, proc, log)
        deadline = time.monotonic() + 30
        while http("GET", f"http://127.0.0.1:{port}/health")[0] != 200:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        prompt = "one two three four five six seven eight nine ten " * 4
        req = {"model": "tiny", "prompt": prompt, "max_tokens": 4}
        status, got = post_json(f"http://127.0.0.1:{port}/v1/completions", req)
        assert (
            status == 200
            and got["choices"][0]["text"] == post_json(d.url + "/v1/completions", req)[1]["choices"][0]["text"]
        )
        status, _, data = http("POST", f"http://127.0.0.1:{port}/v1/completions", dict(req, stream=True))
        assert status == 200 and data.endswith(b"data: [DONE]\n\n")
        assert len(p.requests("/v1/completions")) == 2  # both disaggregated
    finally:
        proc.terminate()
        proc.wait(10)
