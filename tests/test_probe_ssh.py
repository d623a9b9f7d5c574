"""`disaggctl probe SPEC` over real SSH: sshd hosts in network namespaces (tests/infra/fakehosts.sh),
each with the fake NVML installed in its private /opt and its own capture, probed in parallel.
The agent runs under the hosts' system python3 (no pydantic, no pynvml of its own)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from disaggctl.cli import app
from disaggctl.topology import load_topology
from tests.plugins import infra
from tests.plugins.paths import FIXTURES, REPO

pytestmark = pytest.mark.infra

DIR = "dctl-probe-test"  # under each host's private /opt
CAPTURES = {"h1": "gb200_tray", "h2": "b200_gpu2_nvlink_down", "h3": "no_driver", "h4": "b300_7gpu"}
NIC_NUMA = {"h1": 1, "h2": 0, "h3": 0, "h4": 1}


def _install(hosts: infra.TestHosts, name: str, capture: str | None = None) -> Path:
    capture = capture or CAPTURES[name]
    root = hosts.fs(name) / "opt" / DIR
    shutil.rmtree(root, ignore_errors=True)
    (root / "nvml").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "fake_pynvml" / "pynvml.py", root / "nvml" / "pynvml.py")
    shutil.copy(FIXTURES / "nvml" / f"{capture}.json", root / "nvml" / "capture.json")
    # one RDMA NIC in a fake sysfs, on a NUMA node of its own per host
    pci = root / "sys" / "devices" / "pci0000:00" / "0000:17:00.0"
    pci.mkdir(parents=True)
    (pci / "numa_node").write_text(f"{NIC_NUMA.get(name, 0)}\n")
    port = root / "sys" / "class" / "infiniband" / "mlx5_0" / "ports" / "1"
    port.mkdir(parents=True)
    # relative link: the same tree is seen at another path from inside the host
    (root / "sys" / "class" / "infiniband" / "mlx5_0" / "device").symlink_to("../../../devices/pci0000:00/0000:17:00.0")
    (port / "state").write_text("4: ACTIVE\n")
    (port / "rate").write_text("200 Gb/sec (4X HDR)\n")
    (port / "link_layer").write_text("InfiniBand\n")
    return root


@pytest.fixture
def probe_hosts(ssh_hosts: infra.TestHosts) -> Iterator[infra.TestHosts]:
    roots = [_install(ssh_hosts, name) for name in CAPTURES]
    yield ssh_hosts
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)


def _spec(hosts: infra.TestHosts, path: Path) -> Path:
    ssh = f"{{key: {hosts.key}, known_hosts: {hosts.known_hosts}, connect_timeout_s: 5}}"
    lines = [
        "name: probe-test",
        "model: {path: /models/m}",
        "kv_transfer: {kind: nixl}",
        "target: {kind: systemd}",
        "hosts:",
    ]
    for name, gpus in (("h1", 4), ("h2", 8), ("h3", 8), ("h4", 8)):
        lines.append(f"  - {{name: {name}, address: {hosts.ip(name)}, gpus: {gpus}, ssh: {ssh}}}")
    # a host whose sshd does not answer (nothing listens on that port): an error for it alone
    bad_ssh = ssh.replace("connect_timeout_s: 5", "connect_timeout_s: 2, port: 2222")
    lines.append(f"  - {{name: h9, address: {hosts.ip('h1')}, gpus: 8, ssh: {bad_ssh}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


AGENT_ENV = [f"PYTHONPATH=/opt/{DIR}/nvml", f"FAKE_NVML_CAPTURE=/opt/{DIR}/nvml/capture.json",
             f"DISAGGCTL_PROBE_SYSFS=/opt/{DIR}/sys", "DISAGGCTL_PROBE_NVIDIA_SMI=/nonexistent/nvidia-smi"]


def _probe(spec: Path, out: Path) -> Result:
    args = ["probe", str(spec), "-o", str(out)]
    for e in AGENT_ENV:
        args += ["--agent-env", e]
    return CliRunner().invoke(app, args, env={"COLUMNS": "200"})


def test_probe_over_ssh(probe_hosts: infra.TestHosts, tmp_path: Path) -> None:
    spec = _spec(probe_hosts, tmp_path / "spec.yaml")
    out = tmp_path / "topology.json"
    r = _probe(spec, out)
    text = r.output
    assert r.exit_code == 1, text  # h3 has no driver, h9 is unreachable, h2/h4 are degraded
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception

    tf = load_topology(out)
    assert sorted(tf.hosts) == ["h1", "h2", "h3", "h4"]  # h9 answered nothing
    h1 = tf.hosts["h1"]
    assert h1.hostname == "h1" and h1.source == "nvml"  # ran on the host, through NVML (the fake)
    assert [g.clique_id for g in h1.gpus] == [2, 2, 2, 2] and h1.gpus[0].cluster_uuid
    assert [g.numa_node for g in h1.gpus] == [0, 0, 1, 1]
    assert [(n.name, n.numa_node, n.state, n.rate_gbps) for n in h1.nics] == [("mlx5_0", 1, "ACTIVE", 200.0)]
    assert h1.problems == []

    h2 = tf.hosts["h2"]
    assert h2.hostname == "h2" and len(h2.gpus) == 8
    assert [(p.code, p.gpu) for p in h2.problems] == [("nvlink_down", 2)]
    assert h2.nics[0].numa_node == 0

    h3 = tf.hosts["h3"]
    assert h3.hostname == "h3" and h3.gpus == [] and [p.code for p in h3.problems] == ["no_gpus"]

    h4 = tf.hosts["h4"]
    assert len(h4.gpus) == 7 and [(p.code, p.severity) for p in h4.problems] == [("gpu_missing", "error")]

    assert "Driver Not Loaded" in text  # h3's reason, named in its own section
    assert "failed: h3, h9" in text
    h9_line = next(line for line in text.splitlines() if "error:" in line and "h9" in line)
    assert "cannot connect" in h9_line and "2222" in h9_line
    assert "with problems: h2, h4" in text


BASTION_CAPTURES = {"h1": "gb200_tray", "h2": "b300_7gpu", "h3": "gb200_tray"}


@pytest.fixture
def bastion_probe_hosts(bastion_hosts: infra.TestHosts) -> Iterator[infra.TestHosts]:
    roots = [_install(bastion_hosts, name, cap) for name, cap in BASTION_CAPTURES.items()]
    yield bastion_hosts
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)


def test_probe_through_bastion_as_non_root(bastion_probe_hosts: infra.TestHosts, tmp_path: Path) -> None:
    """Hosts only the jump host reaches, probed as the non-root sudo user (`jump: user@host`)."""
    hosts = bastion_probe_hosts
    assert hosts.jump is not None
    jump = f"{hosts.sudo_user}@{hosts.jump[1]}"
    ssh = (f"{{user: {hosts.sudo_user}, jump: '{jump}', key: {hosts.key}, known_hosts: {hosts.known_hosts}, "
           "connect_timeout_s: 5}")
    lines = ["name: probe-bastion", "model: {path: /models/m}", "kv_transfer: {kind: nixl}", "target: {kind: systemd}",
             "hosts:"]
    for name, gpus in (("h1", 4), ("h2", 8), ("h3", 4)):
        lines.append(f"  - {{name: {name}, address: {hosts.ip(name)}, gpus: {gpus}, ssh: {ssh}}}")
    spec = tmp_path / "spec.yaml"
    spec.write_text("\n".join(lines) + "\n")
    out = tmp_path / "topology.json"
    r = _probe(spec, out)
    assert r.exit_code == 1, r.output  # h2 misses a GPU (b300_7gpu): degraded, the others are clean
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    tf = load_topology(out)
    assert sorted(tf.hosts) == ["h1", "h2", "h3"]
    for name in ("h1", "h3"):
        t = tf.hosts[name]
        assert t.hostname == name and t.source == "nvml" and len(t.gpus) == 4 and t.problems == []
        assert [(n.name, n.state) for n in t.nics] == [("mlx5_0", "ACTIVE")]
    assert [(p.code, p.severity) for p in tf.hosts["h2"].problems] == [("gpu_missing", "error")]
    assert "with problems: h2" in r.output

    # the same spec without the jump host: the hosts cannot be reached from here at all
    direct = spec.read_text().replace(f"jump: '{jump}', ", "").replace("connect_timeout_s: 5", "connect_timeout_s: 1")
    spec.write_text(direct)
    r = _probe(spec, tmp_path / "direct.json")
    assert r.exit_code != 0 and "cannot connect" in r.output, r.output
