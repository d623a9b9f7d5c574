"""systemd renderer: unit layout, hardening, ordering, secrets, and a strict systemd-analyze verify."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from disaggctl.compile import compile_spec
from disaggctl.deployment import DesiredState, Rendered
from disaggctl.errors import DisaggError
from disaggctl.loader import load_text
from disaggctl.render.systemd import render_systemd

REPO = Path(__file__).resolve().parents[1]
VERIFY = REPO / "tests" / "infra" / "verify_unit.sh"

SPEC = """
name: demo
model: {path: /models/tiny, served_name: tiny}
hosts:
  - {name: s1, address: 10.201.0.11, gpus: 2}
  - {name: s2, address: 10.201.0.12, gpus: 2}
prefill: {replicas: 1, extra_args: ["--foo", "a b $HOME %n"]}
decode: {replicas: 2}
kv_transfer: {kind: shared-storage, path: /var/tmp/kv}
router: {host: s1, port: 8000}
target:
  kind: systemd
  vllm_bin: /opt/standin/vllm
  python_bin: /opt/venv/bin/python
  secrets: [HF_TOKEN]
  start_timeout_s: 900
"""


def _state(text: str = SPEC) -> tuple[DesiredState, object]:
    loaded = load_text(text, "spec.yaml")
    return compile_spec(loaded), loaded.spec


def _render(text: str = SPEC, secrets: dict[str, str] | None = None) -> Rendered:
    desired, spec = _state(text)
    return render_systemd(desired, spec, {"HF_TOKEN": "hf_x"} if secrets is None else secrets)  # type: ignore[arg-type]


def _file(r: Rendered, host: str, suffix: str) -> str:
    return next(f.content for f in r.for_host(host) if f.path.endswith(suffix))


def test_layout_per_host() -> None:
    r = _render()
    paths = {h: sorted(f.path for f in r.for_host(h)) for h in ("s1", "s2")}
    assert paths["s1"] == [
        "/etc/disaggctl/demo/router.json",
        "/etc/disaggctl/demo/secrets.env",
        "/etc/systemd/system/disaggctl-demo-decode-0.service",
        "/etc/systemd/system/disaggctl-demo-prefill-0.service",
        "/etc/systemd/system/disaggctl-demo-router.service",
        "/etc/systemd/system/disaggctl-demo.target",
    ]
    assert paths["s2"] == [
        "/etc/disaggctl/demo/secrets.env",
        "/etc/systemd/system/disaggctl-demo-decode-1.service",
        "/etc/systemd/system/disaggctl-demo.target",
    ]
    assert r.units["s1"] == [
        "disaggctl-demo-decode-0.service",
        "disaggctl-demo-prefill-0.service",
        "disaggctl-demo-router.service",
    ]


def test_deterministic() -> None:
    assert _render() == _render()


def test_hardening_and_order() -> None:
    r = _render()
    prefill = _file(r, "s1", "prefill-0.service")
    for line in (
        "Restart=on-failure",
        "TimeoutStartSec=900",
        "LimitMEMLOCK=infinity",
        "LimitNOFILE=1048576",
        "EnvironmentFile=/etc/disaggctl/demo/secrets.env",
        "WorkingDirectory=/etc/disaggctl/demo",
        'Environment="PYTHONHASHSEED=0"',
        "After=network-online.target disaggctl-demo-decode-0.service",
        "PartOf=disaggctl-demo.target",
        "WantedBy=disaggctl-demo.target",
    ):
        assert line in prefill.splitlines(), line
    router = _file(r, "s1", "router.service")
    assert "After=network-online.target disaggctl-demo-decode-0.service disaggctl-demo-prefill-0.service" in router
    # the decode on s2 has nothing to wait for on its own host
    assert "After=network-online.target\n" in _file(r, "s2", "decode-1.service")
    target = _file(r, "s1", "demo.target")
    wants = "Wants=disaggctl-demo-decode-0.service disaggctl-demo-prefill-0.service disaggctl-demo-router.service"
    assert wants in target


def test_exec_start_quotes_systemd_specials() -> None:
    prefill = _file(_render(), "s1", "prefill-0.service")
    exec_line = next(line for line in prefill.splitlines() if line.startswith("ExecStart="))
    assert exec_line.startswith("ExecStart=/opt/standin/vllm serve /models/tiny ")
    assert '"a b $$HOME %%n"' in exec_line  # $ and % escaped, spaces kept in one word
    assert '\\"kv_connector\\":\\"ExampleConnector\\"' in exec_line  # JSON as one double-quoted word


def test_secrets_file_mode_hidden_and_required() -> None:
    r = _render(secrets={"HF_TOKEN": 'hf_"$x'})
    sec = next(f for f in r.for_host("s2") if f.path.endswith("secrets.env"))
    assert sec.mode == 0o600 and sec.secret
    assert 'HF_TOKEN="hf_\\"\\$x"' in sec.content
    desired, spec = _state()
    with pytest.raises(DisaggError, match="HF_TOKEN is not set in your environment"):
        render_systemd(desired, spec, {})  # type: ignore[arg-type]


def test_numa_and_cpu_binding_from_placement() -> None:
    desired, spec = _state()
    procs = [
        p.model_copy(update={"numa_node": 1, "cpus": "16-31,48-63"}) if p.name == "decode-0" else p
        for p in desired.processes
    ]
    r = render_systemd(desired.model_copy(update={"processes": procs}), spec, {"HF_TOKEN": "x"})  # type: ignore[arg-type]
    unit = _file(r, "s1", "decode-0.service").splitlines()
    assert "CPUAffinity=16-31 48-63" in unit and "NUMAPolicy=bind" in unit and "NUMAMask=1" in unit
    assert not any(line.startswith("NUMA") for line in _file(r, "s1", "router.service").splitlines())


def test_newline_in_free_text_is_rejected_naming_process() -> None:
    desired, spec = _state()
    procs = [
        p.model_copy(update={"env": {**p.env, "X": "a\nb"}}) if p.name == "decode-1" else p for p in desired.processes
    ]
    with pytest.raises(DisaggError, match=r"process decode-1 on s2: .*newline"):
        render_systemd(desired.model_copy(update={"processes": procs}), spec, {"HF_TOKEN": "x"})  # type: ignore[arg-type]


@pytest.mark.parametrize("run_as", [None, "svc.vllm"])  # a dotted (LDAP) user: systemd accepts it
def test_every_unit_passes_strict_systemd_analyze_verify(tmp_path: Path, run_as: str | None) -> None:
    text = SPEC.replace("  kind: systemd\n", f"  kind: systemd\n  run_as: {run_as}\n") if run_as else SPEC
    desired, spec = _state(text)
    procs = [
        p.model_copy(update={"numa_node": 0, "cpus": "0-3"}) if p.role.value != "router" else p
        for p in desired.processes
    ]
    r = render_systemd(desired.model_copy(update={"processes": procs}), spec, {"HF_TOKEN": "x"})  # type: ignore[arg-type]
    units = []
    for host in ("s1", "s2"):
        d = tmp_path / host
        d.mkdir()
        for f in r.for_host(host):
            if f.path.startswith("/etc/systemd/system/"):
                p = d / Path(f.path).name
                p.write_text(f.content)
                units.append(str(p))
    out = subprocess.run(["bash", str(VERIFY), "--allow-missing-exec", *units], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("OK ") == len(units) == 6
    if run_as:
        assert sum(f"User={run_as}\n" in Path(u).read_text() for u in units) >= 3
