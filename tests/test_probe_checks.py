"""detect_problems: each kind of degraded host is reported with the right code, GPU and severity."""

from __future__ import annotations

from disaggctl.probe.checks import detect_problems
from disaggctl.probe.smi_text import parse_fabric_sections
from disaggctl.topology import Gpu, HostTopology, NvLink
from tests.plugins.paths import SMI


def mesh(n: int, **kw: object) -> list[Gpu]:
    return [Gpu(index=i, nvlink_peers=[j for j in range(n) if j != i], **kw) for i in range(n)]  # type: ignore[arg-type]


def found(topo: HostTopology, expected: int | None = None) -> list[tuple[str, int | None, str]]:
    return [(p.code, p.gpu, p.severity) for p in detect_problems(topo, expected)]


def test_healthy_host_has_no_problems() -> None:
    topo = HostTopology(driver_version="580.105.08", gpus=mesh(8, name="NVIDIA B200", architecture="blackwell"))
    assert found(topo, 8) == []


def test_no_gpus() -> None:
    topo = HostTopology(warnings=["NVML did not start: Driver Not Loaded"])
    (p,) = detect_problems(topo, 8)
    assert (p.code, p.severity) == ("no_gpus", "error") and "Driver Not Loaded" in p.message


def test_gpu_missing() -> None:
    assert found(HostTopology(gpus=mesh(7)), 8) == [("gpu_missing", None, "error")]
    assert found(HostTopology(gpus=mesh(8)), 8) == []
    assert found(HostTopology(gpus=mesh(4))) == []  # a 4-GPU tray is a board size
    assert found(HostTopology(gpus=mesh(1))) == []


def test_nvlink_down_and_degraded() -> None:
    gpus = mesh(4)
    gpus[1] = Gpu(index=1, nvlinks=[NvLink(link=i, active=False) for i in range(18)])
    for g in gpus:
        g.nvlink_peers = [p for p in g.nvlink_peers if p != 1]
    assert found(HostTopology(gpus=gpus)) == [("nvlink_down", 1, "error")]
    # a PCIe-only host (no GPU has NVLink) is not degraded
    assert found(HostTopology(gpus=[Gpu(index=i) for i in range(4)])) == []
    # one GPU with fewer active links than the others: a warning
    part = mesh(2)
    part[0].nvlinks = [NvLink(link=i, active=True) for i in range(18)]
    part[1].nvlinks = [NvLink(link=i, active=i < 12) for i in range(18)]
    assert found(HostTopology(gpus=part)) == [("nvlink_degraded", 1, "warning")]


def test_fabric_snippets_are_reported() -> None:
    unhealthy, insufficient, in_progress = parse_fabric_sections((SMI / "smi_q_fabric_snippets.txt").read_text())
    for fab, expect in (
        (unhealthy, [("fabric_unhealthy", 0, "warning")]),
        (insufficient, [("fabric_incomplete", 0, "error")]),
        (in_progress, [("fabric_incomplete", 0, "error")]),
    ):
        topo = HostTopology(gpus=[Gpu(index=0, **fab)])
        assert found(topo) == expect, fab
    assert found(HostTopology(gpus=[Gpu(index=0, fabric_state="not_supported")])) == []


def test_mig_mixed_driver_ecc() -> None:
    gpus = mesh(2, architecture="blackwell")
    gpus[0].mig_enabled = True
    gpus[0].name, gpus[1].name = "NVIDIA B200", "NVIDIA H200"
    gpus[1].ecc_uncorrected = 3
    topo = HostTopology(driver_version="565.57.01", gpus=gpus)
    assert found(topo) == [
        ("driver_old", None, "error"),
        ("mixed_gpus", None, "warning"),
        ("mig_enabled", 0, "error"),
        ("ecc_uncorrected", 1, "warning"),
    ]
    # R565 on Hopper only is fine
    assert found(HostTopology(driver_version="565.57.01", gpus=mesh(2, architecture="hopper"))) == []
    # compute capability 10.x counts as Blackwell when the architecture is unknown
    assert found(HostTopology(driver_version="560.1", gpus=mesh(2, compute_capability="10.0"))) == [
        ("driver_old", None, "error")
    ]
