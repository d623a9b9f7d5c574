"""Recorded nvidia-smi captures parse to the right topology (pure: files in, HostTopology out)."""

from __future__ import annotations

from pathlib import Path

import pytest

from disaggctl.errors import DisaggError
from disaggctl.probe import smi_text, smi_topo, smi_xml
from disaggctl.probe.captures import host_from_files, topology_from_files
from disaggctl.topology import HostTopology
from tests.plugins.paths import SMI


def topo_of(*names: str, expected: int | None = None) -> HostTopology:
    return host_from_files([SMI / n for n in names], expected)


def codes(topo: HostTopology) -> list[tuple[str, int | None, str]]:
    return [(p.code, p.gpu, p.severity) for p in topo.problems]


def test_b200_xml() -> None:
    t = topo_of("nvidia-smi-q-x_b200.xml", expected=8)
    assert len(t.gpus) == 8
    assert (t.driver_version, t.cuda_driver_version) == ("580.105.08", "13.0")
    assert {g.name for g in t.gpus} == {"NVIDIA B200"}
    assert all(g.architecture == "blackwell" and g.is_blackwell for g in t.gpus)
    assert [g.pci_bus_id for g in t.gpus] == [
        "00000000:8F:00.0", "00000000:90:00.0", "00000000:96:00.0", "00000000:97:00.0",
        "00000000:C4:00.0", "00000000:C5:00.0", "00000000:CB:00.0", "00000000:CC:00.0",
    ]
    g0 = t.gpus[0]
    assert g0.uuid == "GPU-00000000-0000-0000-0000-000000000000"
    assert (g0.memory_total_mib, g0.power_limit_w, g0.max_sm_clock_mhz) == (183359, 1000.0, 1965)
    assert (g0.mig_enabled, g0.persistence_mode, g0.c2c_mode) == (False, False, "disabled")
    assert (g0.ecc_corrected, g0.ecc_uncorrected) == (0, 0)
    # an HGX node: fabric completed, but clique 0 and an all-zero cluster UUID = no NVL72 domain
    assert (g0.fabric_state, g0.fabric_status, g0.clique_id) == ("completed", "success", 0)
    assert g0.cluster_uuid == "00000000-0000-0000-0000-000000000000" and not g0.in_nvl_domain
    assert t.problems == []


def test_gb200_tray_xml_fabric_and_c2c() -> None:
    t = topo_of("nvidia-smi-q-x_gb200.xml", expected=4)
    assert len(t.gpus) == 4 and t.driver_version == "580.173.02"
    assert [g.pci_bus_id for g in t.gpus] == [
        "00000000:29:00.0", "00000000:3F:00.0", "00000000:9C:00.0", "00000000:B2:00.0",
    ]
    for g in t.gpus:
        assert (g.name, g.architecture, g.memory_total_mib) == ("NVIDIA GB200", "blackwell", 189471)
        assert (g.fabric_state, g.fabric_status, g.fabric_health) == ("completed", "success", "healthy")
        assert g.clique_id == 2 and g.cluster_uuid == "00000001-0000-0000-0000-000000000001"
        assert g.in_nvl_domain and g.c2c_mode == "enabled" and g.power_limit_w == 1200.0
    assert t.problems == []


def test_h100_xml() -> None:
    t = topo_of("nvidia-smi-q-x_h100.xml", expected=8)
    assert len(t.gpus) == 8
    assert {(g.name, g.architecture, g.memory_total_mib, g.power_limit_w, g.max_sm_clock_mhz) for g in t.gpus} == {
        ("NVIDIA H100 80GB HBM3", "hopper", 81559, 700.0, 1980)
    }
    assert not any(g.is_blackwell for g in t.gpus)
    assert t.gpus[0].pci_bus_id == "00000000:53:00.0" and t.gpus[7].pci_bus_id == "00000000:CA:00.0"
    assert t.problems == []


def test_gb200_tray_topo_numa_nics_and_mesh() -> None:
    t = topo_of("topo_gb200_tray_8nic.txt")
    assert [g.nvlink_peers for g in t.gpus] == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert [g.numa_node for g in t.gpus] == [0, 0, 1, 1]  # first node of "NUMA Affinity"
    assert [g.gpu_numa_node for g in t.gpus] == [2, 10, 18, 26]  # the Grace "GPU NUMA ID"
    assert [g.cpu_affinity for g in t.gpus] == ["0-71", "0-71", "72-143", "72-143"]
    assert [n.name for n in t.nics] == [f"mlx5_{i}" for i in range(8)]
    assert all(n.numa_node is None for n in t.nics)  # SYS to every GPU: the capture does not say
    assert t.problems == []


def test_gb200_xml_plus_topo_merge_into_one_host() -> None:
    tf = topology_from_files([SMI / "nvidia-smi-q-x_gb200.xml", SMI / "topo_gb200_tray_8nic.txt"], host="tray1")
    assert list(tf.hosts) == ["tray1"]
    t = tf.hosts["tray1"]
    assert [(g.clique_id, g.numa_node, g.nvlink_peers) for g in t.gpus] == [
        (2, 0, [1, 2, 3]), (2, 0, [0, 2, 3]), (2, 1, [0, 1, 3]), (2, 1, [0, 1, 2]),
    ]
    assert t.source == "capture:nvidia-smi-q-x_gb200.xml,topo_gb200_tray_8nic.txt"


def test_b200_header_lost_separator_nic11nic12() -> None:
    """`NIC11NIC12` in the header: 21 device columns, so the affinity columns stay aligned."""
    parsed = smi_topo.parse_topo((SMI / "topo_b200_vllm31594_partial.txt").read_text())
    assert len(parsed["nics"]) == 13
    gpus = parsed["gpus"]
    assert [g["index"] for g in gpus] == list(range(8))
    assert gpus[0]["nvlink_peers"] == [1, 2, 3, 4, 5, 6, 7]
    assert (gpus[0]["cpu_affinity"], gpus[0]["numa_node"]) == ("0-15", 0)
    assert "numa_node" not in gpus[4]  # the row is cut before its affinity columns
    # NIC11 is PIX to GPU0 (NUMA 0): a NIC behind a NUMA-0 host bridge
    assert parsed["nics"][11]["numa_node"] == 0
    t = topo_of("topo_b200_vllm31594_partial.txt")
    assert len(t.gpus) == 8 and t.nics == []  # no NIC legend: NIC# are not device names
    assert any("NIC legend" in w for w in t.warnings)
    assert t.problems == []


def test_b200_gpu2_lost_nvlink_is_reported() -> None:
    t = topo_of("topo_b200_vllm16336_degraded_partial.txt", expected=8)
    assert len(t.gpus) == 8  # GPU7's row is cut off; its column is in the other rows
    assert t.gpus[2].nvlink_peers == []
    assert t.gpus[0].nvlink_peers == [1, 3, 4, 5, 6, 7]
    assert t.gpus[7].nvlink_peers == [0, 1, 3, 4, 5, 6]
    assert [g.numa_node for g in t.gpus[:6]] == [0, 0, 0, 0, 1, 1]
    assert t.gpus[4].cpu_affinity == "56-111,168-223"
    assert codes(t) == [("nvlink_down", 2, "error")]
    assert t.bad_gpus == {2}


def test_gb200_partial_capture_driver_and_symmetry() -> None:
    t = topo_of("topo_gb200_sglang11208_partial.txt")
    assert t.driver_version == "570.172.08"
    assert len(t.gpus) == 4
    assert t.gpus[3].nvlink_peers == [0, 1, 2]  # its row is cut after GPU3's own X
    assert [g.gpu_numa_node for g in t.gpus[:3]] == [2, 10, 18]
    assert t.problems == []


def test_b300_seven_of_eight() -> None:
    t = topo_of("b300_dell_xe9780_7gpu.txt", expected=8)
    assert len(t.gpus) == 7
    assert (t.driver_version, t.cuda_driver_version) == ("610.57.04", "13.3")
    for g in t.gpus:
        assert (g.name, g.compute_capability, g.architecture) == ("NVIDIA B300 SXM6 AC", "10.3", "blackwell")
        assert (g.memory_total_mib, g.power_limit_w, g.mig_enabled) == (275040, 1100.0, False)
    assert [g.numa_node for g in t.gpus] == [0, 0, 0, 1, 1, 1, 1]
    assert t.gpus[3].pci_bus_id == "00000001:1A:00.0"
    assert t.gpus[0].uuid == "GPU-bce5282f-d716-d136-5759-b7181a7a55df"
    assert (t.gpus[0].nvlink_active, len(t.gpus[0].nvlinks)) == (18, 18)
    assert t.gpus[6].nvlink_peers == [0, 1, 2, 3, 4, 5]
    assert codes(t) == [("gpu_missing", None, "error")]
    assert "7 of 8" in t.problems[0].message
    # without the spec's count: still a warning (7 is not a board size)
    assert codes(topo_of("b300_dell_xe9780_7gpu.txt")) == [("gpu_missing", None, "warning")]


def test_q_text_h100_driver_565() -> None:
    t = topo_of("smi_q_h100_sxm_gpu0_565.txt")
    assert (t.driver_version, t.cuda_driver_version, len(t.gpus)) == ("565.57.01", "12.7", 1)
    g = t.gpus[0]
    assert (g.name, g.architecture, g.pci_bus_id) == ("NVIDIA H100 80GB HBM3", "hopper", "00000000:18:00.0")
    assert (g.uuid, g.memory_total_mib, g.power_limit_w) == ("GPU-b42dd28e-ffdd-8720-1df0-98bd8cdc05b1", 81559, 700.0)
    assert (g.persistence_mode, g.mig_enabled, g.max_sm_clock_mhz) == (True, False, 1980)
    assert t.problems == []  # R565 is too old for Blackwell, not for Hopper


def test_fabric_snippets() -> None:
    healthy_id_unhealthy, no_partition, in_progress = smi_text.parse_fabric_sections(
        (SMI / "smi_q_fabric_snippets.txt").read_text()
    )
    assert healthy_id_unhealthy == {
        "fabric_state": "completed", "fabric_status": "success", "clique_id": 2,
        "cluster_uuid": "dc6e40c4-d722-4357-9ba6-5291dd461278", "fabric_health": "unhealthy",
    }
    assert no_partition["fabric_status"] == "insufficient_resources" and no_partition["clique_id"] == 0
    assert in_progress == {"fabric_state": "in_progress"}


def test_xml_mig_and_old_ecc_format() -> None:
    text = (SMI / "nvidia-smi-q-x_h100.xml").read_text().replace("<current_mig>Disabled", "<current_mig>Enabled", 1)
    host = smi_xml.parse(text)
    assert [g["mig_enabled"] for g in host["gpus"]] == [True] + [False] * 7
    old = """<nvidia_smi_log><driver_version>535.1</driver_version><gpu id="00000000:01:00.0">
      <ecc_errors><aggregate><single_bit><total>3</total></single_bit><double_bit><total>1</total></double_bit>
      </aggregate></ecc_errors><fb_memory_usage><total>N/A</total></fb_memory_usage></gpu></nvidia_smi_log>"""
    g = smi_xml.parse(old)["gpus"][0]
    assert (g["ecc_corrected"], g["ecc_uncorrected"]) == (3, 1)
    assert "memory_total_mib" not in g  # N/A stays unknown


def test_capture_errors() -> None:
    with pytest.raises(DisaggError, match="no GPU found"):
        host_from_files([SMI / "smi_q_fabric_snippets.txt"])
    with pytest.raises(DisaggError, match="capture: cannot read"):
        host_from_files([Path("/nonexistent/capture.xml")])


def test_bad_xml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<?xml version='1.0'?><nvidia_smi_log><gpu></nvidia_smi_log>")
    with pytest.raises(DisaggError, match="not a valid `nvidia-smi -q -x`"):
        host_from_files([bad])
