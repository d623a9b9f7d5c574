"""Placement: deterministic, NVLink/NUMA-aware, degraded GPUs avoided, ports without collisions."""

from __future__ import annotations

from disaggctl.compile import compile_spec
from disaggctl.deployment import Placement
from disaggctl.loader import load_text
from disaggctl.placement import place
from disaggctl.topology import Gpu, HostTopology, Nic, Problem, TopologyFile
from tests.plugins.paths import EXAMPLES

SPEC = """\
name: t
model: {path: meta-llama/Llama-3.1-8B-Instruct}
hosts:
  - {name: a, address: 10.0.0.1, gpus: 8}
  - {name: b, address: 10.0.0.2, gpus: 8}
prefill: {replicas: 3, tensor_parallel: 2}
decode: {replicas: 2, tensor_parallel: 4}
kv_transfer: {kind: nixl}
target: {kind: systemd}
"""
# at least one decode instance is required: put it on a third host, out of the way of prefill
DECODE_ON_C = "decode: {replicas: 1, tensor_parallel: 8, hosts: {names: [c]}}"
NO_PP_LIMIT = "kv_transfer: {kind: shared-storage, path: /srv/kv}"
HOST_C = "  - {name: b, address: 10.0.0.2, gpus: 8}\n  - {name: c, address: 10.0.0.3, gpus: 8}"


def hgx(numa_split: bool = True, nics: bool = True, dead: int | None = None) -> HostTopology:
    """8 GPUs, NUMA 0 for GPUs 0-3 and 1 for 4-7, all NVLinked except `dead`."""
    gpus = []
    for i in range(8):
        peers = [] if i == dead else [j for j in range(8) if j not in (i, dead)]
        gpus.append(
            Gpu(
                index=i,
                name="NVIDIA B200",
                architecture="blackwell",
                memory_total_mib=183359,
                numa_node=(i // 4) if numa_split else 0,
                cpu_affinity="0-55" if i < 4 else "56-111",
                nvlink_peers=peers,
            )
        )
    nic_list = (
        [Nic(name=f"mlx5_{i}", numa_node=i // 4, state="4: ACTIVE", rate_gbps=400) for i in range(8)] if nics else []
    )
    return HostTopology(gpus=gpus, nics=nic_list, source="test")


def test_deterministic_and_no_gpu_shared() -> None:
    loaded = load_text(SPEC, "s.yaml")
    p1, p2 = place(loaded), place(loaded)
    assert p1 == p2
    used = [(n.host, g) for i in p1.instances for n in i.nodes for g in n.gpus]
    assert len(used) == len(set(used)) == 3 * 2 + 2 * 4


def test_ports_unique_per_host_and_router_port_reserved() -> None:
    p = place(load_text(SPEC, "s.yaml"))
    for ports in p.ports.values():
        assert len(ports) == len(set(ports))
    assert p.ports["a"][8000] == "router"
    http = [(i.head.host, i.http_port) for i in p.instances]
    assert len(http) == len(set(http))
    assert all(port != 8000 for _, port in http)
    side = [(i.head.host, i.side_channel_port) for i in p.instances]
    assert len(side) == len(set(side))


def test_tp_group_prefers_one_numa_node_and_picks_local_nics() -> None:
    topo = TopologyFile(hosts={"a": hgx(), "b": hgx()})
    spec = SPEC.replace("gpus: 8}", "}")
    p = place(load_text(spec, "s.yaml"), topo)
    for inst in p.instances:
        for node in inst.nodes:
            assert node.numa_node is not None, inst  # every group inside one NUMA node
            assert node.nics and all(int(n.split("_")[1][0]) // 4 == node.numa_node for n in node.nics)


def test_degraded_gpu_is_skipped() -> None:
    topo = TopologyFile(hosts={"a": hgx(dead=2), "b": hgx()})
    spec = SPEC.replace("gpus: 8}", "}")
    p = place(load_text(spec, "s.yaml"), topo)
    assert all(not (n.host == "a" and 2 in n.gpus) for i in p.instances for n in i.nodes)
    assert any("GPU 2" in w or "gpu 2" in w.lower() for w in p.warnings)


def test_host_level_problem_refused_unless_allowed() -> None:
    bad = hgx().model_copy(update={"problems": [Problem(code="driver_old", message="driver 550 is too old")]})
    topo = TopologyFile(hosts={"a": bad, "b": hgx()})
    spec = SPEC.replace("gpus: 8}", "}").replace("replicas: 3", "replicas: 1").replace("replicas: 2", "replicas: 1")
    loaded = load_text(spec, "s.yaml")
    try:
        place(loaded, topo)
    except Exception as e:
        assert "host a is degraded: driver 550 is too old" in str(e)
        assert "--allow-degraded" in str(e)
    else:
        raise AssertionError("placement accepted a degraded host")
    p = place(loaded, topo, allow_degraded=True)
    assert any("driver 550" in w for w in p.warnings)


def test_nvl72_instance_spans_trays_of_one_clique_only() -> None:
    def tray(clique: int) -> HostTopology:
        return HostTopology(
            gpus=[
                Gpu(
                    index=i,
                    architecture="blackwell",
                    memory_total_mib=189471,
                    nvlink_peers=[j for j in range(4) if j != i],
                    cluster_uuid="4f1a2b3c-0000-1111-2222-333344445555",
                    clique_id=clique,
                    fabric_state="completed",
                )
                for i in range(4)
            ]
        )

    spec = """\
name: r
model: {path: meta-llama/Llama-3.1-70B-Instruct}
hosts:
  - {name: t1}
  - {name: t2}
  - {name: t3}
  - {name: t4}
prefill: {replicas: 1, tensor_parallel: 8}
decode: {replicas: 1, tensor_parallel: 8}
kv_transfer: {kind: nixl}
target: {kind: systemd}
"""
    # t1 and t3 share clique 1, t2 and t4 clique 2: each TP8 instance needs two trays of ONE clique
    topo = TopologyFile(hosts={"t1": tray(1), "t2": tray(2), "t3": tray(1), "t4": tray(2)})
    p = place(load_text(spec, "s.yaml"), topo)
    hosts = [sorted(n.host for n in i.nodes) for i in p.instances]
    assert hosts == [["t1", "t3"], ["t2", "t4"]]


def test_tp_never_spans_hgx_hosts() -> None:
    spec = SPEC.replace("prefill: {replicas: 3, tensor_parallel: 2}", "prefill: {replicas: 1, tensor_parallel: 16}")
    spec = spec.replace("decode: {replicas: 2, tensor_parallel: 4}", "decode: {replicas: 1, tensor_parallel: 16}")
    spec = spec.replace("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-405B-Instruct")
    try:
        place(load_text(spec, "s.yaml"))
    except Exception as e:
        assert "cannot place decode instance 0" in str(e) or "cannot place prefill instance 0" in str(e), e
    else:
        raise AssertionError("TP16 was placed across two HGX hosts")


def test_pp_across_hgx_hosts_is_allowed() -> None:
    spec = SPEC.replace(
        "prefill: {replicas: 3, tensor_parallel: 2}",
        "prefill: {replicas: 1, tensor_parallel: 8, pipeline_parallel: 2, hosts: {names: [a, b]}}",
    )
    spec = spec.replace("decode: {replicas: 2, tensor_parallel: 4}", DECODE_ON_C)
    spec = spec.replace("  - {name: b, address: 10.0.0.2, gpus: 8}", HOST_C)
    spec = spec.replace("kv_transfer: {kind: nixl}", NO_PP_LIMIT)  # vLLM 0.32's NixlConnector refuses a PP prefill
    p = place(load_text(spec, "s.yaml"))
    (inst,) = [i for i in p.instances if i.role.value == "prefill"]
    assert [n.host for n in inst.nodes] == ["a", "b"]
    assert inst.master_port is not None


def test_multinode_compiles_to_nnodes_and_headless() -> None:
    spec = SPEC.replace(
        "prefill: {replicas: 3, tensor_parallel: 2}",
        "prefill: {replicas: 1, tensor_parallel: 8, pipeline_parallel: 2, hosts: {names: [a, b]}}",
    )
    spec = spec.replace("decode: {replicas: 2, tensor_parallel: 4}", DECODE_ON_C)
    spec = spec.replace("  - {name: b, address: 10.0.0.2, gpus: 8}", HOST_C)
    spec = spec.replace("kv_transfer: {kind: nixl}", NO_PP_LIMIT)  # vLLM 0.32's NixlConnector refuses a PP prefill
    d = compile_spec(load_text(spec, "s.yaml"))
    head, worker = d.process("prefill-0"), d.process("prefill-0-node1")
    assert head.http_port is not None and worker.http_port is None
    assert head.argv[head.argv.index("--node-rank") + 1] == "0"
    assert worker.argv[worker.argv.index("--node-rank") + 1] == "1"
    assert "--headless" in worker.argv and "--headless" not in head.argv
    assert worker.argv[worker.argv.index("--master-addr") + 1] == "10.0.0.1"
    assert "--port" not in worker.argv


def test_examples_place(tmp_path: object) -> None:
    for f in sorted(EXAMPLES.glob("*.yaml")):
        loaded = load_text(f.read_text(), str(f))
        p: Placement = place(loaded)
        assert p.instances, f


def test_topology_without_nvlink_data_assumes_connected_with_a_warning() -> None:
    bare = HostTopology(gpus=[Gpu(index=i, architecture="blackwell", memory_total_mib=183359) for i in range(8)])
    spec = SPEC.replace("gpus: 8}", "}").replace("replicas: 3", "replicas: 1").replace("replicas: 2", "replicas: 1")
    p = place(load_text(spec, "s.yaml"), TopologyFile(hosts={"a": bare, "b": bare}))
    assert [i.nodes[0].gpus for i in p.instances] == [[0, 1], [2, 3, 4, 5]]
    assert any("no NVLink data" in w for w in p.warnings)
    # with link data, a GPU without peers is never part of a TP group
    partial = hgx(dead=0)
    p2 = place(load_text(spec, "s.yaml"), TopologyFile(hosts={"a": partial, "b": hgx()}), allow_degraded=True)
    assert all(0 not in n.gpus for i in p2.instances for n in i.nodes if n.host == "a")
