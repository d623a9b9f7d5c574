"""The Slurm renderer: structure of the heterogeneous job, run-time addresses, static checks
(`bash -n`, shellcheck) of every rendered script, and what it refuses."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from disaggctl.compile import compile_spec
from disaggctl.deployment import ConfigFile, DesiredState, Placement, Process
from disaggctl.errors import DisaggError
from disaggctl.loader import load_spec, load_text
from disaggctl.render.slurm import Var, render_slurm, script_hash, script_of, split_text
from disaggctl.spec import Role

REPO = Path(__file__).resolve().parents[1]

BASE = """
name: pd
model: {path: /models/tiny, served_name: tiny}
hosts:
  - {name: slot-a, gpus: 4}
  - {name: slot-b, gpus: 4}
prefill: {replicas: 2, hosts: {names: [slot-a]}}
decode: {replicas: 1, tensor_parallel: 2, hosts: {names: [slot-b]}}
kv_transfer: {kind: nixl}
router: {host: slot-a, port: 8000}
target:
  kind: slurm
  partition: gpu
  account: acct
  qos: high
  constraint: h100
  exclude: bad[1-2]
  time_limit: "1-00:00:00"
  successor: {enabled: true, lead_minutes: 20}
"""


def rendered(text: str = BASE):  # type: ignore[no-untyped-def]
    loaded = load_text(text, "spec.yaml")
    desired = compile_spec(loaded)
    return desired, render_slurm(desired, loaded.spec)


def shellcheck(path: Path) -> None:
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_het_job_layout() -> None:
    _desired, out = rendered()
    script = script_of(out).content
    directives = re.findall(r"^#SBATCH (.*)$", script, re.MULTILINE)
    assert directives[0] == "--job-name=disaggctl-pd"
    assert "--signal=B:TERM@120" in directives
    comps = [d for d in directives if d.startswith("--nodes=1")]
    assert directives.count("hetjob") == 1 and len(comps) == 2
    # decode slot first (compile starts decoders first): 1 process, GPUs 0-1; prefill slot: 2 prefills + router
    assert comps[0].startswith("--nodes=1 --ntasks=1 --time=1-00:00:00 --gres=gpu:2 ")
    assert comps[1].startswith("--nodes=1 --ntasks=3 --time=1-00:00:00 --gres=gpu:2 ")
    for c in comps:
        assert "--partition=gpu --account=acct --qos=high --constraint=h100 --exclude=bad[1-2]" in c
    # one srun step per process, in its component, started decode -> prefill -> router
    steps = re.findall(r"^srun --het-group=(\d) .*--job-name=([a-z0-9-]+) ", script, re.MULTILINE)
    assert steps == [("0", "decode-0"), ("1", "prefill-0"), ("1", "prefill-1"), ("1", "router")]
    # clean stop order: router, prefill, decode
    stops = re.findall(r"^  dctl_stop_step ([a-z0-9-]+)$", script, re.MULTILINE)
    assert stops == ["router", "prefill-0", "prefill-1", "decode-0"]
    # node addresses from Slurm at run time
    assert 'scontrol show hostnames "${SLURM_JOB_NODELIST_HET_GROUP_1:?' in script
    # successor: after 24 h - 20 min, excluding this job's nodes plus the spec's exclusions
    assert "( sleep 85200; kill -USR1 $$ ) &" in script
    assert '--exclude="$(IFS=,; echo "${DCTL_NODES[*]}"),bad[1-2]"' in script
    assert out.units == {"slurm": ["decode-0", "prefill-0", "prefill-1", "router"]}


def test_addresses_become_variables_everywhere() -> None:
    _desired, out = rendered()
    script = script_of(out).content
    launch = {Path(f.path).name: f.content for f in out.files if f.host != "slurm"}
    # NIXL side channel host of each process is its node's address
    assert 'export VLLM_NIXL_SIDE_CHANNEL_HOST="${DCTL_ADDR_0}"' in launch["decode-0.sh"]
    assert 'export VLLM_NIXL_SIDE_CHANNEL_HOST="${DCTL_ADDR_1}"' in launch["prefill-1.sh"]
    # the router's upstreams
    assert '"url": "http://\' "${DCTL_ADDR_1}" \':8101",' in script
    assert '"url": "http://\' "${DCTL_ADDR_0}" \':8100",' in script
    # health waits and the endpoint
    assert 'dctl_wait decode-0 "${DCTL_ADDR_0}" 8100' in script
    assert 'dctl_state ready http://"${DCTL_ADDR_1}":8000' in script
    # no literal slot name is left where an address goes
    assert "slot-a:" not in script and "//slot-b" not in script


def test_lmcache_peer_and_proxy_hosts_are_run_time_addresses() -> None:
    text = BASE.replace("kv_transfer: {kind: nixl}", "kv_transfer: {kind: lmcache}").replace(
        "decode: {replicas: 1, tensor_parallel: 2,", "decode: {replicas: 1,")
    _, out = rendered(text)
    script = script_of(out).content
    assert "pd_peer_host: ' \"${DCTL_ADDR_0}\" '" in script
    assert "pd_proxy_host: ' \"${DCTL_ADDR_1}\" '" in script
    assert '"lmcache_host": "\' "${DCTL_ADDR_0}" \'",' in script


def test_split_text_only_replaces_host_positions() -> None:
    addrs = {"models": "A", "10.0.0.1": "B"}
    assert split_text("/models/x", addrs) == ["/models/x"]  # a path is not a host
    assert split_text("http://models:80/v1", addrs) == ["http://", Var("A"), ":80/v1"]
    assert split_text('{"h": "10.0.0.1", "g": "10.0.0.11"}', addrs) == ['{"h": "', Var("B"), '", "g": "10.0.0.11"}']
    assert split_text("pd_peer_host: 10.0.0.1\nx: 10.0.0.1x\n", addrs) == ["pd_peer_host: ", Var("B"),
                                                                           "\nx: 10.0.0.1x\n"]


def test_hash_is_stable_and_changes_with_the_spec() -> None:
    _, a = rendered()
    _, b = rendered()
    _, c = rendered(BASE.replace("port: 8000", "port: 8001"))
    ha, hb, hc = (script_hash(script_of(x).content) for x in (a, b, c))
    assert ha == hb != hc
    assert f"DCTL_HASH={ha}" in script_of(a).content


def test_single_slot_is_a_plain_job() -> None:
    text = BASE.replace("  - {name: slot-b, gpus: 4}\n", "").replace("[slot-b]", "[slot-a]").replace(
        "prefill: {replicas: 2,", "prefill: {replicas: 1,")
    _, out = rendered(text)
    script = script_of(out).content
    assert "hetjob" not in script and "--het-group" not in script
    assert '"${SLURM_JOB_NODELIST:?' in script


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "examples").glob("*.yaml")))
def test_every_example_renders_a_clean_script_for_slurm(example: str, tmp_path: Path) -> None:
    """Examples of other targets are re-targeted to Slurm: every rendered script passes bash -n and shellcheck."""
    loaded = load_spec(REPO / "examples" / example)
    if loaded.spec.target.kind != "slurm":
        from disaggctl.spec import SlurmTarget

        loaded.spec = loaded.spec.model_copy(update={"target": SlurmTarget(kind="slurm")})
    desired = compile_spec(loaded)
    out = render_slurm(desired, loaded.spec)
    for i, f in enumerate(out.files):
        p = tmp_path / f"{i}.sh"
        p.write_text(f.content)
        shellcheck(p)


def test_container_image_and_mounts() -> None:
    text = BASE + "  container_image: nvcr.io#nvidia/vllm:25.10\n  container_mounts: [/lustre:/lustre:ro]\n"
    _, out = rendered(text)
    script = script_of(out).content
    assert "'--container-image=nvcr.io#nvidia/vllm:25.10' " \
           "--container-mounts=/tmp/disaggctl:/tmp/disaggctl,/lustre:/lustre:ro" in script


@pytest.mark.parametrize(("patch", "field"), [
    ('  workdir: "/tmp/my jobs"\n', "target.workdir"),
    ('  workdir: "/tmp/%j"\n', "target.workdir"),
    ('  container_image: img\n  container_mounts: ["/a b:/c"]\n', "target.container_mounts"),
])
def test_rejects_what_an_sbatch_line_cannot_hold(patch: str, field: str) -> None:
    with pytest.raises(DisaggError, match=field):
        rendered(BASE + patch)


def _state(processes: list[Process], files: dict[str, list[ConfigFile]] | None = None) -> DesiredState:
    return DesiredState(
        name="pd", vllm_version="0.32.0", model_name="m", kv_kind="nixl", config_dir="/tmp/disaggctl/pd",
        processes=processes, files=files or {}, router_url="http://a:8000",
        placement=Placement(name="pd", instances=[], router_host="a", router_address="a", router_port=8000),
    )


def test_hand_built_state_and_newline_rejected() -> None:
    spec = load_text(BASE, "spec.yaml").spec
    router = Process(name="router", instance="router", role=Role.ROUTER, host="a", address="10.1.0.1",
                     argv=["python3", "-m", "disaggctl.router"], http_port=8000, start_order=2)
    ok = Process(name="decode-0", instance="decode-0", role=Role.DECODE, host="b", address="10.1.0.2",
                 argv=["vllm", "serve", "m", "--master-addr", "10.1.0.2"], gpus=[1], http_port=8100)
    out = render_slurm(_state([ok, router]), spec)
    launch = next(f.content for f in out.files if f.path.endswith("decode-0.sh"))
    assert 'exec vllm serve m --master-addr "${DCTL_ADDR_0}"' in launch
    bad = ok.model_copy(update={"argv": ["vllm", "serve", "m\nrm -rf /"]})
    with pytest.raises(DisaggError, match="newline"):
        render_slurm(_state([bad, router]), spec)
    # two slots may not share an address: under Slurm each is a node of its own
    twin = router.model_copy(update={"address": "10.1.0.2"})
    with pytest.raises(DisaggError, match="share the address"):
        render_slurm(_state([ok, twin]), spec)
    # IPv6 / bracketed slot addresses cannot be swapped for the run-time IPv4 address
    v6 = ok.model_copy(update={"address": "fd00::2"})
    with pytest.raises(DisaggError, match="node slot"):
        render_slurm(_state([v6, router]), spec)
    # the same config file name with two contents on two slots cannot share the job folder
    files = {"a": [ConfigFile(name="x.json", content="1")], "b": [ConfigFile(name="x.json", content="2")]}
    with pytest.raises(DisaggError, match=r"x\.json"):
        render_slurm(_state([ok, router], files), spec)
