"""The NVML code path, driven by the fake pynvml built from the recorded captures, and the
nvidia-smi fallback, driven by a fake nvidia-smi that prints the recorded captures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from disaggctl.probe import nvml
from disaggctl.probe.captures import host_from_files
from disaggctl.probe.checks import detect_problems
from disaggctl.probe.remote import LocalRunner, ProbeFailed, probe_local, run_agent
from disaggctl.topology import HostTopology
from tests.plugins.paths import REPO, SMI

FAKE = REPO / "tests" / "fake_pynvml"
SYSTEM_PYTHON = "/usr/bin/python3"  # the hosts' python3: no pydantic, no pynvml


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("fake_pynvml_under_test", FAKE / "pynvml.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("DISAGGCTL_PROBE_SYSFS", str(tmp_path / "nosys"))  # no real PCI devices leak in
    return mod


def nvml_topo(fake: ModuleType, monkeypatch: pytest.MonkeyPatch, capture: str) -> HostTopology:
    monkeypatch.setenv("FAKE_NVML_CAPTURE", capture)
    return HostTopology.model_validate(nvml.probe(fake))


def found(topo: HostTopology, expected: int | None = None) -> list[tuple[str, int | None, str]]:
    return [(p.code, p.gpu, p.severity) for p in detect_problems(topo, expected)]


def test_gb200_tray_over_nvml(fake: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    t = nvml_topo(fake, monkeypatch, "gb200_tray")
    assert t.source == "nvml" and (t.driver_version, t.cuda_driver_version) == ("580.173.02", "13.0")
    assert [g.numa_node for g in t.gpus] == [0, 0, 1, 1]  # nvmlDeviceGetMemoryAffinity
    assert [g.gpu_numa_node for g in t.gpus] == [2, 10, 18, 26]  # nvmlDeviceGetNumaNodeId
    assert [g.cpu_affinity for g in t.gpus] == ["0-71", "0-71", "72-143", "72-143"]  # from the CPU bitmask
    assert [g.nvlink_peers for g in t.gpus] == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    for g in t.gpus:
        assert (g.architecture, g.compute_capability, g.memory_total_mib) == ("blackwell", "10.0", 189471)
        assert (g.clique_id, g.cluster_uuid, g.fabric_health) == (2, "00000001-0000-0000-0000-000000000001", "healthy")
        assert (g.nvlink_active, len(g.nvlinks), g.c2c_mode) == (18, 18, "enabled")
        assert g.in_nvl_domain
    assert found(t, 4) == []


def test_nvml_agrees_with_the_xml_parser(fake: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two independent readings of one capture (fake NVML built with ElementTree; disaggctl's parser)."""
    over_nvml = nvml_topo(fake, monkeypatch, "b200_hgx")
    from_xml = host_from_files([SMI / "nvidia-smi-q-x_b200.xml"])
    keys = ("index", "uuid", "name", "architecture", "memory_total_mib", "pci_bus_id", "mig_enabled",
            "persistence_mode", "power_limit_w", "max_sm_clock_mhz", "fabric_state", "fabric_status", "clique_id",
            "cluster_uuid", "fabric_health", "c2c_mode", "ecc_uncorrected")
    for a, b in zip(over_nvml.gpus, from_xml.gpus, strict=True):
        assert a.model_dump(include=set(keys)) == b.model_dump(include=set(keys))
    assert over_nvml.driver_version == from_xml.driver_version == "580.105.08"


def test_degrade_per_field(fake: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """NotSupported (no NUMA in the capture), FunctionNotFound (fabric V API, C2C) and
    NoPermission (ECC) each leave their field unknown with a warning; the probe goes on."""
    t = nvml_topo(fake, monkeypatch, "h100_hgx")
    assert len(t.gpus) == 8 and all(g.architecture == "hopper" for g in t.gpus)
    g = t.gpus[0]
    assert g.numa_node is None and g.cpu_affinity is None
    assert g.ecc_uncorrected is None and g.c2c_mode is None
    # nvmlDeviceGetGpuFabricInfoV is "not found": the legacy call still reads the fabric
    assert (g.fabric_state, g.fabric_status, g.clique_id) == ("completed", "success", 0)
    assert g.nvlink_peers == [1, 2, 3, 4, 5, 6, 7]
    text = "\n".join(t.warnings)
    assert "nvmlDeviceGetMemoryAffinity: Not Supported (GPU 0, 1, 2, 3, 4, 5, 6, 7)" in text
    assert "nvmlDeviceGetTotalEccErrors: Insufficient Permissions" in text
    assert "nvmlDeviceGetC2cModeInfoV: Function Not Found" in text
    assert found(t, 8) == []


def test_degraded_captures_over_nvml(fake: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    t = nvml_topo(fake, monkeypatch, "b200_gpu2_nvlink_down")
    assert (t.gpus[2].nvlink_active, len(t.gpus[2].nvlinks), t.gpus[2].nvlink_peers) == (0, 18, [])
    assert t.gpus[0].nvlink_peers == [1, 3, 4, 5, 6, 7]
    assert [g.numa_node for g in t.gpus] == [0, 0, 0, 0, 1, 1, None, None]
    assert found(t, 8) == [("nvlink_down", 2, "error")]

    t = nvml_topo(fake, monkeypatch, "b300_7gpu")
    assert (len(t.gpus), t.driver_version, t.cuda_driver_version) == (7, "610.57.04", "13.3")
    assert {g.compute_capability for g in t.gpus} == {"10.3"}
    assert found(t, 8) == [("gpu_missing", None, "error")]

    t = nvml_topo(fake, monkeypatch, "gb200_fabric_in_progress")
    assert {g.fabric_state for g in t.gpus} == {"in_progress"} and t.gpus[0].clique_id is None
    assert found(t, 4) == [("fabric_incomplete", i, "error") for i in range(4)]

    t = nvml_topo(fake, monkeypatch, "gb200_fabric_insufficient")
    assert {g.fabric_status for g in t.gpus} == {"insufficient_resources"}
    assert found(t, 4) == [("fabric_incomplete", i, "error") for i in range(4)]

    t = nvml_topo(fake, monkeypatch, "gb200_fabric_unhealthy")
    uuid = "dc6e40c4-d722-4357-9ba6-5291dd461278"
    assert {(g.fabric_health, g.cluster_uuid) for g in t.gpus} == {("unhealthy", uuid)}
    assert found(t, 4) == [("fabric_unhealthy", i, "warning") for i in range(4)]


def test_no_driver_raises_unavailable(fake: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVML_CAPTURE", "no_driver")
    with pytest.raises(nvml.NvmlUnavailable, match="Driver Not Loaded"):
        nvml.probe(fake)


def test_fake_captures_are_up_to_date() -> None:
    r = subprocess.run([sys.executable, str(FAKE / "build_captures.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- the shipped program, as a host runs it


def fake_sysfs(root: Path) -> Path:
    """/sys with one RDMA NIC (mlx5_0, NUMA 1, ACTIVE, 400 Gb/s) and the PCI dir of B200 GPU0."""
    pci = root / "devices" / "pci0000:00" / "0000:17:00.0"
    pci.mkdir(parents=True)
    (pci / "numa_node").write_text("1\n")
    port = root / "class" / "infiniband" / "mlx5_0" / "ports" / "1"
    port.mkdir(parents=True)
    (root / "class" / "infiniband" / "mlx5_0" / "device").symlink_to(pci)
    (port / "state").write_text("4: ACTIVE\n")
    (port / "rate").write_text("400 Gb/sec (4X NDR)\n")
    (port / "link_layer").write_text("InfiniBand\n")
    gpu = root / "bus" / "pci" / "devices" / "0000:8f:00.0"
    gpu.mkdir(parents=True)
    (gpu / "numa_node").write_text("0\n")
    (gpu / "local_cpulist").write_text("0-55,112-167\n")
    return root


def agent_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"DISAGGCTL_PROBE_SYSFS": str(fake_sysfs(tmp_path / "sys")), **extra}


def test_bundled_agent_on_system_python_with_fake_nvml(tmp_path: Path) -> None:
    assert os.path.exists(SYSTEM_PYTHON), "the test hosts' python3 is /usr/bin/python3"
    env = agent_env(tmp_path, PYTHONPATH=str(FAKE), FAKE_NVML_CAPTURE="b200_hgx")
    t = run_agent(LocalRunner(), python=SYSTEM_PYTHON, env=env)
    assert t.source == "nvml" and len(t.gpus) == 8
    assert (t.gpus[0].numa_node, t.gpus[0].cpu_affinity) == (0, "0-55,112-167")  # sysfs first
    assert t.gpus[1].numa_node is None
    (nic,) = t.nics
    assert (nic.name, nic.port, nic.numa_node, nic.state, nic.rate_gbps) == ("mlx5_0", 1, 1, "ACTIVE", 400.0)
    assert (nic.pci_bus_id, nic.link_layer, nic.ucx_name) == ("0000:17:00.0", "InfiniBand", "mlx5_0:1")


FAKE_SMI = """#!/bin/sh
case "$*" in
  "-q -x") cat {smi}/nvidia-smi-q-x_b200.xml ;;
  "topo -m") cat {smi}/topo_b200_vllm16336_degraded_partial.txt ;;
  *) echo "Invalid combination of input arguments" ; exit 2 ;;
esac
"""


def test_nvidia_smi_fallback(tmp_path: Path) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(FAKE_SMI.format(smi=SMI))
    smi.chmod(0o755)
    env = agent_env(tmp_path, DISAGGCTL_PROBE_NVIDIA_SMI=str(smi))
    t = run_agent(LocalRunner(), python=SYSTEM_PYTHON, env=env)  # no pynvml there: the fallback runs
    assert t.source == "nvidia-smi" and len(t.gpus) == 8
    assert t.gpus[0].name == "NVIDIA B200" and t.gpus[2].nvlink_peers == []
    assert t.gpus[4].numa_node == 1
    assert t.nics[0].name == "mlx5_0"  # from sysfs, not topo -m's NIC#
    assert any("nvidia-ml-py (pynvml) is not installed" in w for w in t.warnings)
    assert any("--query-gpu=index,compute_cap" in w and "exited 2" in w for w in t.warnings)
    assert found(t, 8) == [("nvlink_down", 2, "error")]


def test_host_without_driver_or_python(tmp_path: Path) -> None:
    env = agent_env(tmp_path, DISAGGCTL_PROBE_NVIDIA_SMI=str(tmp_path / "missing-nvidia-smi"))
    r = probe_local(python=SYSTEM_PYTHON, env=env, expected_gpus=8)
    assert r.topology is not None and r.topology.gpus == []
    assert r.error is not None and "no NVIDIA driver or GPU found" in r.error and "not found" in r.error
    assert [p.code for p in r.topology.problems] == ["no_gpus"]
    with pytest.raises(ProbeFailed, match="not found on the host"):
        run_agent(LocalRunner(), python="/nonexistent/python3")


class _Bad:
    def __init__(self, rc: int, out: bytes, err: bytes) -> None:
        self.r = (rc, out, err)

    def run(self, argv: list[str], input: bytes | None = None, timeout: float | None = None) -> Any:
        rc, out, err = self.r
        return type("R", (), {"rc": rc, "stdout": out, "stderr": err})()


def test_bad_agent_output() -> None:
    with pytest.raises(ProbeFailed, match=r"(?s)exited 1.*boom"):
        run_agent(_Bad(1, b"", b"Traceback\nboom"))
    with pytest.raises(ProbeFailed, match="no valid topology"):
        run_agent(_Bad(0, b"not json", b""))
    with pytest.raises(ProbeFailed, match="no valid topology"):
        run_agent(_Bad(0, b'{"gpus": [{"index": "x"}]}', b""))


def test_shipped_modules_are_stdlib_and_python38() -> None:
    """The hosts may run an old python3 with nothing installed: check what the bundle ships."""
    import ast

    from disaggctl.probe.bundle import MODULES

    for name in MODULES:
        src = (REPO / "disaggctl" / "probe" / f"{name}.py").read_text()
        tree = ast.parse(src, feature_version=(3, 8))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                assert top in sys.stdlib_module_names or top in ("__future__", "pynvml"), f"{name}: imports {m}"
        for newer in ("removeprefix", "removesuffix", "strict=", "functools.cache\n"):
            assert newer not in src, f"{name}.py uses {newer!r} (not in Python 3.8)"
        assert "from __future__ import annotations" in src  # PEP 604/585 annotations stay strings


def test_lost_gpu_is_left_out(fake: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cap = json.loads((REPO / "tests" / "fixtures" / "nvml" / "b200_hgx.json").read_text())
    cap["devices"][3]["errors"] = {"nvmlDeviceGetHandleByIndex": "GpuIsLost"}
    cap["devices"][5]["errors"] = {"nvmlDeviceGetName": "Unknown"}
    path = tmp_path / "lost.json"
    path.write_text(json.dumps(cap))
    t = nvml_topo(fake, monkeypatch, str(path))
    assert [g.index for g in t.gpus] == [0, 1, 2, 4, 5, 6, 7]
    assert t.gpus[4].index == 5 and t.gpus[4].name is None and t.gpus[4].uuid  # the rest of GPU5 is read
    assert 3 not in t.gpus[0].nvlink_peers
    assert any("nvmlDeviceGetHandleByIndex: GPU is lost (GPU 3)" in w for w in t.warnings)
    assert found(t, 8) == [("gpu_missing", None, "error")]
