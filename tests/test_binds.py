"""Bind only where needed (issue 13 item 6): every listener binds the address it serves on, from
placement, unless the spec says otherwise; 0.0.0.0 only when asked for. vllm-router's flags are
checked with vllm-router's own argument parser (the pinned wheel)."""

from __future__ import annotations

import argparse
import json

import yaml

from disaggctl.compile import compile_spec
from disaggctl.deployment import DesiredState
from disaggctl.loader import load_spec, load_text
from disaggctl.render import render
from disaggctl.router.config import RouterConfig, parse_router_config
from tests.plugins.paths import EXAMPLES

SPEC = """\
name: b
model: {path: /models/llama, served_name: llama}
hosts:
  - {name: a, address: 10.0.0.1, gpus: 2}
  - {name: c, address: 10.0.0.2, gpus: 2}
  - {name: r, address: 10.0.0.3, gpus: 0}
prefill: {replicas: 1, hosts: {names: [a]}}
decode: {replicas: 1, hosts: {names: [c]}}
kv_transfer: {kind: lmcache}
target: {kind: systemd}
"""


def compiled(text: str) -> DesiredState:
    return compile_spec(load_text(text, "s.yaml"))


def _router_cfg(d: DesiredState) -> RouterConfig:
    cf = next(f for fs in d.files.values() for f in fs if f.name == "router.json")
    return parse_router_config(json.loads(cf.content))


def _host(argv: list[str]) -> str:
    return argv[argv.index("--host") + 1]


def test_defaults_bind_the_placed_addresses() -> None:
    d = compiled(SPEC + "router: {host: r}\n")
    cfg = _router_cfg(d)
    assert cfg.bind == "10.0.0.3"
    sender = yaml.safe_load(next(f.content for f in d.files["a"] if f.name == "lmcache-prefill-0.yaml"))
    # the notification socket listens exactly where the prefillers are told to push
    assert cfg.lmcache_proxy_bind == sender["pd_proxy_host"] == "10.0.0.3"
    assert _host(d.process("prefill-0").argv) == "10.0.0.1" and _host(d.process("decode-0").argv) == "10.0.0.2"


def test_the_spec_can_ask_for_every_interface() -> None:
    d = compiled(SPEC + "router: {host: r, bind: 0.0.0.0, notify_bind: 10.9.9.9}\nengine: {host_bind: 0.0.0.0}\n")
    cfg = _router_cfg(d)
    assert (cfg.bind, cfg.lmcache_proxy_bind) == ("0.0.0.0", "10.9.9.9")
    assert {_host(p.argv) for p in d.processes if p.role.value != "router"} == {"0.0.0.0"}


def test_vllm_router_binds_http_and_metrics_as_its_parser_reads_them() -> None:
    from vllm_router.router_args import RouterArgs  # type: ignore[import-untyped]

    text = SPEC.replace("{kind: lmcache}", "{kind: nixl}") + (
        "router: {host: r, kind: vllm-router, metrics_port: 29100, prefill_policy: cache_aware,"
        " decode_policy: power_of_two}\n"
    )
    argv = compiled(text).process("router").argv
    parser = argparse.ArgumentParser()
    RouterArgs.add_cli_args(parser)
    args = RouterArgs.from_cli_args(parser.parse_args(argv[1:]))
    assert (args.host, args.port) == ("10.0.0.3", 8000)
    assert (args.prometheus_host, args.prometheus_port) == ("10.0.0.3", 29100)
    argv = compiled(text.replace("metrics_port: 29100", "metrics_port: 29100, metrics_bind: 127.0.0.1")).process(
        "router").argv
    assert RouterArgs.from_cli_args(parser.parse_args(argv[1:])).prometheus_host == "127.0.0.1"


def test_slurm_binds_the_node_address_found_at_run_time() -> None:
    text = SPEC.replace("target: {kind: systemd}", "target: {kind: slurm}")
    for n in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        text = text.replace(f", address: {n}", "")
    loaded = load_text(text + "router: {host: r}\n", "s.yaml")
    rendered = render(compile_spec(loaded), loaded.spec)
    launch = {f.path.rsplit("/", 1)[-1]: f.content for f in rendered.files if "/run/" in f.path}
    assert '--host "${DCTL_ADDR_0}"' in launch["decode-0.sh"]  # decode slots come first
    assert '--host "${DCTL_ADDR_1}"' in launch["prefill-0.sh"]
    script = next(f.content for f in rendered.files if f.path.endswith("job.sbatch"))
    assert '"bind": "\' "${DCTL_ADDR_2}"' in script and '"lmcache_proxy_bind": "\' "${DCTL_ADDR_2}"' in script
    assert "0.0.0.0" not in script


def test_no_example_listens_on_every_interface_unless_it_says_so() -> None:
    for example in sorted(EXAMPLES.glob("*.yaml")):
        loaded = load_spec(example)
        if "0.0.0.0" in example.read_text():
            continue
        rendered = render(compile_spec(loaded), loaded.spec)
        for f in rendered.files:
            assert "0.0.0.0" not in f.content, (example.name, f.path)
        assert json.dumps([p.argv for p in compile_spec(loaded).processes]).count("0.0.0.0") == 0


def test_notification_socket_binds_exactly_the_given_address() -> None:
    """The router's LMCache ZMQ PULL socket: a host name is resolved (ZMQ cannot bind a DNS name), and the
    socket listens on that address only, not on every interface."""
    import asyncio
    import socket

    from disaggctl.router.lmcache import Notifications, zmq_bind_endpoint

    assert zmq_bind_endpoint("localhost", 7) in (("tcp://127.0.0.1:7", False), ("tcp://[::1]:7", True))
    assert zmq_bind_endpoint("::1", 7) == ("tcp://[::1]:7", True)

    async def run() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        n = Notifications("127.0.0.1", port)
        await n.start()
        try:
            import zmq

            return str(n._sock.getsockopt(zmq.LAST_ENDPOINT).decode())
        finally:
            await n.close()

    assert asyncio.run(run()).startswith("tcp://127.0.0.1:")
