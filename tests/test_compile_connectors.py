"""Compile: kv-transfer configs, env, LMCache YAML (checked with LMCache 0.5.6's own loader)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from disaggctl.compile import compile_spec
from disaggctl.deployment import DesiredState, Process
from disaggctl.loader import load_text
from disaggctl.router.config import parse_router_config
from tests.plugins.paths import EXAMPLES

SPEC = """\
name: t
model: {path: /models/llama, served_name: llama, catalog: llama-3.1-8b}
hosts:
  - {name: a, address: 10.0.0.1, gpus: 8}
  - {name: b, address: 10.0.0.2, gpus: 8}
prefill: {replicas: 2, tensor_parallel: 2, hosts: {names: [a]}}
decode: {replicas: 2, tensor_parallel: 2, hosts: {names: [b]}}
kv_transfer: {kind: nixl}
target: {kind: systemd}
"""


def compiled(text: str) -> DesiredState:
    return compile_spec(load_text(text, "s.yaml"))


def kvcfg(p: Process) -> dict[str, object]:
    value = json.loads(p.argv[p.argv.index("--kv-transfer-config") + 1])
    assert isinstance(value, dict)
    return value


def test_nixl_roles_env_and_side_channel() -> None:
    d = compiled(SPEC)
    p0, d0 = d.process("prefill-0"), d.process("decode-0")
    assert kvcfg(p0) == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_producer",
        "kv_buffer_device": "cuda",
        "kv_connector_extra_config": {"backends": ["UCX"]},
    }
    assert kvcfg(d0)["kv_role"] == "kv_consumer"
    assert p0.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.1"
    assert d0.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.2"
    assert p0.env["UCX_TLS"] == "cuda_copy,cuda_ipc,rc"
    ports = {d.process(n).env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for n in ("prefill-0", "prefill-1")}
    assert len(ports) == 2  # two instances on one host never share a side channel
    assert {p.env["PYTHONHASHSEED"] for p in d.processes} == {"0"}
    assert p0.env["CUDA_VISIBLE_DEVICES"] == "0,1" and d.process("prefill-1").env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert [p.role.value for p in d.processes] == ["decode", "decode", "prefill", "prefill", "router"]


def test_router_config_lists_instances() -> None:
    d = compiled(SPEC)
    (cf,) = d.files["a"]
    cfg = parse_router_config(json.loads(cf.content))
    assert [u.url for u in cfg.prefill] == ["http://10.0.0.1:8100", "http://10.0.0.1:8101"]
    assert [u.url for u in cfg.decode] == ["http://10.0.0.2:8100", "http://10.0.0.2:8101"]
    assert cfg.kv_kind == "nixl" and cfg.model == "llama"
    router = d.process("router")
    assert router.argv[-2:] == ["--config", "/etc/disaggctl/t/router.json"]


def test_vllm_router_argv() -> None:
    d = compiled(SPEC + "router: {kind: vllm-router, prefill_policy: cache_aware, decode_policy: power_of_two}\n")
    argv = d.process("router").argv
    assert argv[:2] == ["/opt/vllm/bin/vllm-router", "--vllm-pd-disaggregation"]
    assert argv.count("--prefill") == 2 and argv.count("--decode") == 2
    assert argv[argv.index("--prefill-policy") + 1] == "cache_aware"
    assert argv[argv.index("--kv-connector") + 1] == "nixl"
    assert not d.files  # no builtin router config


def test_shared_storage() -> None:
    d = compiled(SPEC.replace("{kind: nixl}", "{kind: shared-storage, path: /mnt/kv}"))
    p = d.process("prefill-0")
    assert kvcfg(p) == {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"shared_storage_path": "/mnt/kv"},
    }
    assert p.argv[p.argv.index("--block-size") + 1] == "32"
    assert "VLLM_NIXL_SIDE_CHANNEL_HOST" not in p.env


def _lmcache(d: DesiredState, host: str, name: str) -> dict[str, object]:
    f = next(f for f in d.files[host] if f.name == f"lmcache-{name}.yaml")
    value = yaml.safe_load(f.content)
    assert isinstance(value, dict)
    return value


def test_lmcache_configs() -> None:
    d = compiled(SPEC.replace("{kind: nixl}", "{kind: lmcache, buffer_size_mb: 1024}"))
    p0, d1 = d.process("prefill-0"), d.process("decode-1")
    assert kvcfg(p0) == {
        "kv_connector": "LMCacheConnectorV1",
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"discard_partial_chunks": False, "lmcache_rpc_port": "producer0"},
    }
    assert kvcfg(d1)["kv_connector_extra_config"] == {
        "discard_partial_chunks": False,
        "lmcache_rpc_port": "consumer1",
        "skip_last_n_tokens": 1,
    }
    assert p0.env["LMCACHE_CONFIG_FILE"] == "/etc/disaggctl/t/lmcache-prefill-0.yaml"
    sender = _lmcache(d, "a", "prefill-0")
    receiver = _lmcache(d, "b", "decode-1")
    assert sender["pd_role"] == "sender" and sender["pd_proxy_host"] == "10.0.0.1" and sender["pd_proxy_port"] == 7500
    assert receiver["pd_role"] == "receiver" and receiver["pd_peer_host"] == "10.0.0.2"
    assert receiver["pd_peer_init_port"] == [7302, 7303] and receiver["pd_peer_alloc_port"] == [7402, 7403]
    old_names = {"nixl_role", "enable_nixl", "enable_xpyd", "pd_retrieve_locations", "nixl_peer_host"}
    assert not old_names & set(sender) and not old_names & set(receiver)
    rpc = [
        kvcfg(d.process(n))["kv_connector_extra_config"]["lmcache_rpc_port"]  # type: ignore[index]
        for n in ("prefill-0", "prefill-1")
    ]
    assert len(set(rpc)) == 2


def test_lmcache_yaml_loads_with_lmcache_loader(tmp_path: Path) -> None:
    """LMCache 0.5.6's own loader reads every generated YAML with P/D on, the right role, ports, buffer."""
    from lmcache.v1.config import LMCacheEngineConfig

    d = compiled(SPEC.replace("{kind: nixl}", "{kind: lmcache, buffer_size_mb: 1024, buffer_device: cpu}"))
    checked = 0
    for host, files in d.files.items():
        for f in files:
            if not f.name.startswith("lmcache-"):
                continue
            path = tmp_path / f"{host}-{f.name}"
            path.write_text(f.content)
            cfg = LMCacheEngineConfig.from_file(str(path))
            assert cfg.enable_pd is True
            assert cfg.transfer_channel == "nixl"
            assert cfg.pd_buffer_size == 1024 * 1024 * 1024
            assert cfg.pd_buffer_device == "cpu"
            assert cfg.chunk_size == 256
            if "prefill" in f.name:
                assert cfg.pd_role == "sender"
                assert cfg.pd_proxy_host == "10.0.0.1" and cfg.pd_proxy_port == 7500
            else:
                assert cfg.pd_role == "receiver"
                assert cfg.pd_peer_host == "10.0.0.2"
                assert len(cfg.pd_peer_init_port) == 2 and len(cfg.pd_peer_alloc_port) == 2
            checked += 1
    assert checked == 4


def test_kv_offload_lmcache_and_multiconnector(tmp_path: Path) -> None:
    from lmcache.v1.config import LMCacheEngineConfig

    d = compiled(SPEC + "profiles: [multi-round-qa]\n")
    p = d.process("prefill-0")
    cfg = kvcfg(p)
    assert cfg["kv_connector"] == "MultiConnector"
    connectors = cfg["kv_connector_extra_config"]["connectors"]  # type: ignore[index]
    assert [c["kv_connector"] for c in connectors] == ["NixlConnector", "LMCacheConnectorV1"]
    path = tmp_path / "offload.yaml"
    path.write_text(next(f for f in d.files["a"] if f.name == "lmcache-prefill-0.yaml").content)
    loaded = LMCacheEngineConfig.from_file(str(path))
    assert loaded.local_cpu is True and loaded.max_local_cpu_size == 64
    assert not loaded.enable_pd


def test_every_example_lmcache_yaml_loads(tmp_path: Path) -> None:
    from lmcache.v1.config import LMCacheEngineConfig

    count = 0
    for example in sorted(EXAMPLES.glob("*.yaml")):
        d = compile_spec(load_text(example.read_text(), str(example)))
        for host, files in d.files.items():
            for f in files:
                if f.name.startswith("lmcache-"):
                    path = tmp_path / f"{example.stem}-{host}-{f.name}"
                    path.write_text(f.content)
                    cfg = LMCacheEngineConfig.from_file(str(path))
                    assert cfg.enable_pd and cfg.pd_role in ("sender", "receiver")
                    count += 1
    assert count >= 10
