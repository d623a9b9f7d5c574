"""`disaggctl topology` and `disaggctl probe --local` through the real CLI app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from disaggctl.cli import app
from disaggctl.errors import DisaggError
from disaggctl.topology import load_topology
from tests.plugins.paths import REPO, SMI

FAKE = REPO / "tests" / "fake_pynvml"


def run(*args: str) -> tuple[int, str, BaseException | None]:
    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    return r.exit_code, r.output, r.exception


def test_topology_json_on_stdout() -> None:
    files = [str(SMI / "nvidia-smi-q-x_gb200.xml"), str(SMI / "topo_b200_vllm16336_degraded_partial.txt")]
    code, out, _ = run("topology", *files, "--output", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["version"] == 1
    assert list(doc["hosts"]) == ["nvidia-smi-q-x_gb200", "topo_b200_vllm16336_degraded_partial"]
    gb = doc["hosts"]["nvidia-smi-q-x_gb200"]
    assert [g["clique_id"] for g in gb["gpus"]] == [2, 2, 2, 2]
    deg = doc["hosts"]["topo_b200_vllm16336_degraded_partial"]
    assert deg["problems"] == [{"code": "nvlink_down", "gpu": 2, "severity": "error",
                                "message": deg["problems"][0]["message"]}]


def test_topology_one_host_to_file_and_text(tmp_path: Path) -> None:
    out = tmp_path / "topo.json"
    code, text, _ = run("topology", str(SMI / "b300_dell_xe9780_7gpu.txt"), "--host", "b300-01", "--gpus", "8",
                        "-o", str(out))
    assert code == 0
    assert "b300-01" in text and "gpu_missing" in text and "found 7 of 8" in text and "B300 SXM6 AC" in text
    tf = load_topology(out)
    assert list(tf.hosts) == ["b300-01"] and len(tf.hosts["b300-01"].gpus) == 7
    assert tf.hosts["b300-01"].problems[0].code == "gpu_missing"


def test_topology_bad_input() -> None:
    _, _, exc = run("topology", str(SMI / "README.md"), "--output", "json")
    assert isinstance(exc, DisaggError) and "no GPU found in README.md" in str(exc)
    code, out, _ = run("topology", str(SMI / "nvidia-smi-q-x_b200.xml"), "--output", "yaml")
    assert code == 2 and "'yaml' is not one of 'text', 'json'" in out


def test_probe_local_without_gpu_fails_clearly(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    code, text, _ = run("probe", "--local", "-o", str(out), "--agent-env",
                        f"DISAGGCTL_PROBE_NVIDIA_SMI={tmp_path}/none", "--agent-env", "PYTHONPATH=/nonexistent")
    assert code == 1
    assert "no NVIDIA driver or GPU found" in text and "failed:" in text
    (host,) = load_topology(out).hosts.values()
    assert host.gpus == [] and [p.code for p in host.problems] == ["no_gpus"]


@pytest.mark.parametrize(("capture", "code", "words"), [
    ("gb200_tray", 0, ["GB200", "clique 2", "wrote"]),
    ("b200_gpu2_nvlink_down", 1, ["nvlink_down", "with problems", "--allow-degraded"]),
])
def test_probe_local_with_fake_nvml(tmp_path: Path, capture: str, code: int, words: list[str]) -> None:
    out = tmp_path / "t.json"
    rc, text, _ = run("probe", "--local", "-o", str(out), "--agent-env", f"PYTHONPATH={FAKE}",
                      "--agent-env", f"FAKE_NVML_CAPTURE={capture}", "--agent-env", f"DISAGGCTL_PROBE_SYSFS={tmp_path}")
    assert rc == code, text
    for w in words:
        assert w in text
    (host,) = load_topology(out).hosts.values()
    assert host.source == "nvml"
    if code:
        rc, text, _ = run("probe", "--local", "-o", str(out), "--allow-degraded", "--agent-env", f"PYTHONPATH={FAKE}",
                          "--agent-env", f"FAKE_NVML_CAPTURE={capture}")
        assert rc == 0 and "nvlink_down" in text


def test_probe_needs_a_spec() -> None:
    _, _, exc = run("probe")
    assert isinstance(exc, DisaggError) and "needs a SPEC" in str(exc)
    _, _, exc = run("probe", "--local", "--agent-env", "oops")
    assert isinstance(exc, DisaggError) and "NAME=VALUE" in str(exc)
