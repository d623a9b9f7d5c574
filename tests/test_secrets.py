"""target.secrets on every target (issue 13 item 5): where values come from, the one 0600 file they land
in, who reads it (engines, never the router), and a canary value grepped for in every other artifact:
rendered files, `plan` text and json, saved plans, `render -o`, process tables, argv, logs, errors.

The pure part runs the renderers and the CLI; the local target runs for real with stand-in engines
(tests/support/standin_engine.py). The Slurm real run is in tests/test_slurm_cluster.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from disaggctl import secrets as sf
from disaggctl.cli import app
from disaggctl.compile import compile_spec
from disaggctl.errors import DisaggError
from disaggctl.loader import LoadedSpec, load_text
from disaggctl.render import render
from disaggctl.render.local import Table
from tests.test_local_backend import standin_vllm, write_spec  # noqa: F401  (a fixture)

PY = sys.executable
CANARY = f"canary{uuid.uuid4().hex}"
NAME = "DCTL_TEST_SECRET"

BASE = """
name: sec
model: {{path: /models/tiny, served_name: tiny}}
hosts:
  - {{name: s1, address: 10.201.0.11, gpus: 2}}
  - {{name: s2, address: 10.201.0.12, gpus: 2}}
  - {{name: s3, address: 10.201.0.13, gpus: 0}}
prefill: {{replicas: 1, hosts: {{names: [s1]}}}}
decode: {{replicas: 1, hosts: {{names: [s2]}}}}
kv_transfer: {{kind: nixl, buffer_device: cpu}}
router: {{host: s3, port: 8000}}
target:
{target}
"""
TARGETS = {
    "systemd": "  kind: systemd\n  secrets: [DCTL_TEST_SECRET, OTHER_SECRET]",
    "slurm": "  kind: slurm\n  workdir: /tmp/dctl-sec\n  secrets: [DCTL_TEST_SECRET, OTHER_SECRET]",
    "local": "  kind: local\n  state_dir: /tmp/dctl-sec-state\n  secrets: [DCTL_TEST_SECRET, OTHER_SECRET]",
}
VALUES = {NAME: CANARY, "OTHER_SECRET": "x" + CANARY[::-1]}


def _text(kind: str) -> str:
    text = BASE.format(target=TARGETS[kind])
    if kind != "systemd":  # Slurm and local: node slots / this machine (no fixed addresses)
        text = text.replace(", address: 10.201.0.11", "").replace(", address: 10.201.0.12", "")
        text = text.replace(", address: 10.201.0.13", "")
    if kind == "local":
        text = text.replace("  - {name: s2, gpus: 2}\n  - {name: s3, gpus: 0}\n", "")
        text = text.replace("names: [s2]", "names: [s1]").replace("host: s3", "host: s1")
        text = text.replace("{name: s1, gpus: 2}", "{name: s1, address: 127.0.0.1, gpus: 2}")
    return text


def _loaded(kind: str) -> LoadedSpec:
    return load_text(_text(kind), "sec.yaml")


# --------------------------------------------------------------------------- values and the file format


def test_values_come_from_the_environment_then_the_secrets_file(tmp_path: Path) -> None:
    src = tmp_path / "secrets"
    src.write_text(f"# mine\nexport OTHER_SECRET='{VALUES['OTHER_SECRET']}'\n{NAME}=from-file\n")
    src.chmod(0o600)
    loaded = _loaded("systemd")
    spec = loaded.spec.model_copy(update={"target": loaded.spec.target.model_copy(update={"secrets_file": str(src)})})
    got = sf.operator_values(spec, {NAME: CANARY})
    assert got == VALUES  # the environment wins over the file
    src.chmod(0o644)
    with pytest.raises(DisaggError, match=r"readable by others.*chmod 600"):
        sf.operator_values(spec, {})


def test_a_missing_or_bad_value_is_named_never_shown() -> None:
    spec = _loaded("slurm").spec
    with pytest.raises(DisaggError, match="OTHER_SECRET not set in your environment") as e:
        sf.operator_values(spec, {NAME: CANARY})
    assert CANARY not in str(e.value)
    with pytest.raises(DisaggError, match="contains a newline") as e:
        sf.operator_values(spec, {NAME: CANARY + "\nx", "OTHER_SECRET": "y"})
    assert CANARY not in str(e.value)


def test_file_round_trips_through_bash_and_the_supervisor_parser(tmp_path: Path) -> None:
    """One format for systemd's EnvironmentFile, bash's `.` (Slurm launchers) and the local supervisor."""
    hostile = {"A": 'q"uo\'te $HOME `id` \\n \\ end', "B": "", "C": "  spaced  "}
    text = sf.file_text(list(hostile), hostile)
    assert sf.parse(text) == hostile
    f = tmp_path / "s.env"
    f.write_text(text)
    out = subprocess.run(["bash", "-c", 'set -a; . "$1"; printf "%s\\0" "$A" "$B" "$C"', "bash", str(f)],
                         capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout
    assert out.split("\0")[:3] == [hostile["A"], "", hostile["C"]]
    assert sf.PLACEHOLDER in sf.file_text(["A"], None)


def test_write_private_is_0600_from_the_first_byte(tmp_path: Path) -> None:
    p = tmp_path / "private" / "secrets.env"
    os.umask(0o022)
    sf.write_private(p, "A=1\n")
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and stat.S_IMODE(p.parent.stat().st_mode) == 0o700


# --------------------------------------------------------------------------- renderers


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_rendered_files_carry_names_only_engines_read_them(kind: str) -> None:
    loaded = _loaded(kind)
    desired = compile_spec(loaded)
    rendered = render(desired, loaded.spec, VALUES if kind != "slurm" else None)
    secret = [f for f in rendered.files if f.secret]
    assert secret and all(f.mode == 0o600 and f.path.endswith("/secrets.env") for f in secret)
    for f in rendered.files:
        if not f.secret:
            assert CANARY not in f.content and CANARY[::-1] not in f.content, f.path
    if kind == "systemd":
        units = {f.path.rsplit("-", 1)[-1]: f.content for f in rendered.files if f.path.endswith(".service")}
        assert "EnvironmentFile=" in units["0.service"] and "EnvironmentFile=" not in units["router.service"]
        assert not any(f.host == "s3" for f in secret)  # the router's host gets no secrets file
        assert {f.host for f in secret} == {"s1", "s2"}
        assert all(CANARY in f.content for f in secret)
    elif kind == "slurm":
        launch = {f.path.rsplit("/", 1)[-1]: f.content for f in rendered.files if "/run/" in f.path}
        assert '. "$dctl_secrets"' in launch["decode-0.sh"] and '. "$dctl_secrets"' in launch["prefill-0.sh"]
        assert "secrets" not in launch["router.sh"]
        script = next(f.content for f in rendered.files if f.path.endswith("job.sbatch"))
        assert "trap dctl_forget_secrets EXIT" in script and sf.PLACEHOLDER in secret[0].content
        assert secret[0].path == "/tmp/dctl-sec/sec/private/secrets.env"
    else:
        tbl = Table.from_json(next(f.content for f in rendered.files if f.path.endswith("processes.json")))
        assert {p.name: p.secrets for p in tbl.processes} == {"decode-0": True, "prefill-0": True, "router": False}
        assert tbl.secret_names == [NAME, "OTHER_SECRET"] and CANARY in secret[0].content


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_render_out_and_offline_plan_never_hold_a_value(kind: str, tmp_path: Path) -> None:
    spec = tmp_path / "sec.yaml"
    spec.write_text(_text(kind))
    env = {**VALUES, "COLUMNS": "200"}
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["render", str(spec), "-o", str(out)], env=env)
    assert r.exit_code == 0, r.output
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "secrets.env" for p in files)
    for p in files:
        assert CANARY not in p.read_text(), p
        if p.name == "secrets.env":
            assert sf.PLACEHOLDER in p.read_text() and stat.S_IMODE(p.stat().st_mode) == 0o600
    for args in (["plan", "--offline"], ["plan", "--offline", "--output", "json"]):
        r = CliRunner().invoke(app, [*args, str(spec)], env=env)
        assert r.exit_code == 0, r.output
        assert CANARY not in r.output


# --------------------------------------------------------------------------- the local target, for real


def _proc_env(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def _cmdlines_with(marker: str) -> list[str]:
    hits = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "cmdline").read_bytes():
                    hits.append(p.name)
            except OSError:
                continue
    return hits


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "disaggctl.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL)


def test_local_apply_gives_the_value_to_engines_only(tmp_path: Path, standin_vllm: str) -> None:  # noqa: F811
    spec = write_spec(tmp_path, standin_vllm, name="lsec")
    spec.write_text(spec.read_text().replace("target: {kind: local,", f"target: {{kind: local, secrets: [{NAME}],"))
    state = tmp_path / "state"
    env = dict(os.environ, COLUMNS="200", **{NAME: CANARY})
    try:
        r = _run("apply", str(spec), "-y", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        outputs = [r.stdout + r.stderr]
        pids = {n: int((state / "run" / f"{n}.pid").read_text()) for n in ("decode-0", "prefill-0", "router")}
        sup = int((state / "run" / "supervisor.pid").read_text())
        needle = f"{NAME}={CANARY}".encode()
        assert needle in _proc_env(pids["decode-0"]) and needle in _proc_env(pids["prefill-0"])
        assert CANARY.encode() not in _proc_env(pids["router"]) and CANARY.encode() not in _proc_env(sup)
        assert not _cmdlines_with(CANARY)
        sec = state / "secrets.env"
        assert stat.S_IMODE(sec.stat().st_mode) == 0o600 and CANARY in sec.read_text()
        # plan, plan json, a saved plan, status, logs: no value
        r = _run("plan", str(spec), "--detailed-exitcode", env=env)
        assert r.returncode == 0 and "No changes." in r.stdout, r.stdout + r.stderr
        saved = tmp_path / "saved.plan"
        for args in (["--output", "json"], ["-o", str(saved)]):
            outputs.append(_run("plan", str(spec), *args, env=env).stdout)
        outputs += [_run("status", str(spec), env=env).stdout, _run("logs", str(spec), "-n", "200", env=env).stdout]
        # a changed value restarts the engines (not the router), reported without the value
        new = CANARY + "v2"
        env2 = dict(env, **{NAME: new})
        r = _run("plan", str(spec), "--detailed-exitcode", env=env2)
        assert r.returncode == 2 and "secrets" in r.stdout and CANARY not in r.stdout, r.stdout
        r = _run("apply", str(spec), "-y", env=env2)
        assert r.returncode == 0, r.stdout + r.stderr
        outputs.append(r.stdout + r.stderr)
        now = {n: int((state / "run" / f"{n}.pid").read_text()) for n in pids}
        assert now["router"] == pids["router"] and now["decode-0"] != pids["decode-0"]
        assert f"{NAME}={new}".encode() in _proc_env(now["decode-0"])
        # status needs no values: no false "secrets changed" without them
        for e in (env2, {k: v for k, v in env.items() if k != NAME}):
            r = _run("status", str(spec), env=e)
            assert r.returncode == 0 and "changed" not in r.stdout, r.stdout + r.stderr
            outputs.append(r.stdout)
        # a missing value: a named error before anything changes
        r = _run("plan", str(spec), env={k: v for k, v in env.items() if k != NAME})
        assert r.returncode == 1 and f"{NAME} not set in your environment" in r.stderr, r.stdout + r.stderr
        for text in [*outputs, saved.read_text()]:
            assert CANARY not in text
        for f in state.rglob("*"):
            if f.is_file() and f != sec:
                assert CANARY.encode() not in f.read_bytes(), f
    finally:
        _run("destroy", str(spec), "-y", env=env)
    assert not (state / "secrets.env").exists()


def test_slurm_launchers_source_the_file_engines_only(tmp_path: Path) -> None:
    """The launchers as the job runs them (bash, no Slurm needed): an engine's process gets the value from
    the private file, the router's does not; a missing file stops the step with exit 96, naming the file."""
    rec = tmp_path / "fake"
    rec.write_text('#!/bin/bash\nprintf "%s|%s\\n" "$0" "${DCTL_TEST_SECRET-unset}" >> "$DCTL_REC"\n')
    rec.chmod(0o755)
    text = _text("slurm").replace("workdir: /tmp/dctl-sec", f"workdir: {tmp_path}/jobs\n  vllm_bin: {rec}\n"
                                                           f"  python_bin: {rec}")
    loaded = load_text(text, "sec.yaml")
    rendered = render(compile_spec(loaded), loaded.spec)
    run_dir = tmp_path / "jobs" / "sec" / "run"
    run_dir.mkdir(parents=True)
    for f in rendered.files:
        if "/run/" in f.path:
            (run_dir / Path(f.path).name).write_text(f.content)
    out = tmp_path / "rec.txt"
    env = {"PATH": os.environ["PATH"], "DCTL_REC": str(out), **{f"DCTL_ADDR_{i}": "127.0.0.1" for i in range(3)}}
    r = subprocess.run(["bash", str(run_dir / "decode-0.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 96 and "private/secrets.env is missing" in r.stderr, r.stderr
    sf.write_private(tmp_path / "jobs" / "sec" / "private" / "secrets.env", sf.file_text(list(VALUES), VALUES))
    for name in ("decode-0", "prefill-0", "router"):
        r = subprocess.run(["bash", str(run_dir / f"{name}.sh")], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    got = [line.split("|")[1] for line in out.read_text().splitlines()]
    assert got == [CANARY, CANARY, "unset"]
    script = tmp_path / "job.sbatch"
    script.write_text(next(f.content for f in rendered.files if f.path.endswith("job.sbatch")))
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_quoted_output_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Log tails quoted in errors (a failed Slurm job, a failed local engine) pass through redact()."""
    spec = _loaded("local").spec
    monkeypatch.setenv(NAME, CANARY)
    monkeypatch.delenv("OTHER_SECRET", raising=False)  # one missing: the ones that are set still count
    text = f"env: {NAME}={CANARY} PATH=/bin"
    assert sf.redact(text, sf.known_values(spec)) == f"env: {NAME}={sf.REDACTED} PATH=/bin"
