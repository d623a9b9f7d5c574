"""Property tests: hostile strings in the free-text fields that reach Slurm scripts (extra_args, env
values, the model path, config file contents) come out of bash byte for byte, with node addresses
replaced by the run-time variables, or are rejected (newlines)."""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disaggctl.deployment import DesiredState, Placement, Process
from disaggctl.errors import DisaggError
from disaggctl.loader import load_text
from disaggctl.render.slurm import render_slurm, shell_args, split_text
from disaggctl.spec import Role

SPEC = load_text("""
name: q
model: {path: /m}
hosts: [{name: a, gpus: 2}, {name: b, gpus: 2}]
kv_transfer: {kind: nixl}
target: {kind: slurm}
""", "q.yaml").spec

HOSTILE = st.text(
    alphabet=st.sampled_from([*list(" '\"$`%;\\|&*?~!#(){}[]<>=,:/.-_aZ09\t"), "é", "\u2028"]),
    min_size=0, max_size=24,
)
# What compile writes where an address goes; at run time DCTL_ADDR_0/1 hold the real ones.
ADDRS = {"10.9.0.1": "198.51.100.7", "node-b": "198.51.100.8"}
DUMP = "printf '%s\\0' \"$@\"; printf '%s\\0' \"$HOSTILE\" \"$SIDE\" \"$URL\""


def _state(argv_tail: list[str], env_value: str, model: str) -> DesiredState:
    decode = Process(
        name="decode-0", instance="decode-0", role=Role.DECODE, host="b", address="node-b",
        argv=["/bin/bash", "-c", DUMP, "dump", model, *argv_tail, "http://node-b:8100/v1", "--master-addr", "node-b"],
        env={"HOSTILE": env_value, "SIDE": "node-b", "URL": "http://10.9.0.1:8000"}, http_port=8100,
    )
    router = Process(name="router", instance="router", role=Role.ROUTER, host="a", address="10.9.0.1",
                     argv=["python3", "-m", "disaggctl.router"], http_port=8000, start_order=2)
    return DesiredState(
        name="q", vllm_version="0.32.0", model_name="m", kv_kind="nixl", config_dir="/tmp/q",
        processes=[decode, router], files={}, router_url="http://10.9.0.1:8000",
        placement=Placement(name="q", instances=[], router_host="a", router_address="10.9.0.1", router_port=8000),
    )


def _run_launcher(text: str) -> list[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(text)
    try:
        env = {"PATH": os.environ["PATH"], "DCTL_ADDR_0": "198.51.100.8", "DCTL_ADDR_1": "198.51.100.7",
               "HOME": "/nonexistent"}
        r = subprocess.run(["bash", f.name], capture_output=True, env=env, timeout=30)
    finally:
        os.unlink(f.name)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().split("\0")[:-1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.lists(HOSTILE, max_size=4), env_value=HOSTILE, model=HOSTILE)
def test_launcher_passes_hostile_words_byte_for_byte(extra: list[str], env_value: str, model: str) -> None:
    out = render_slurm(_state(extra, env_value, model), SPEC)
    launcher = next(f.content for f in out.files if f.path.endswith("/decode-0.sh"))
    got = _run_launcher(launcher)
    # argv after `bash -c DUMP dump`, then the three env values
    assert got == [model, *extra, "http://198.51.100.8:8100/v1", "--master-addr", "198.51.100.8",
                   env_value, "198.51.100.8", "http://198.51.100.7:8000"]


@settings(max_examples=60, deadline=None)
@given(content=st.text(min_size=0, max_size=80))
def test_config_file_contents_survive_printf(content: str) -> None:
    """What the batch script's `dctl_write PATH MODE <args>` writes: printf '%s' of the args."""
    content = content.replace("\0", "")
    text = content + '\n"url": "http://10.9.0.1:8100"\npd_peer_host: node-b\n'
    args = shell_args(split_text(text, {a: v for a, v in zip(ADDRS, ["DCTL_ADDR_1", "DCTL_ADDR_0"], strict=True)}))
    env = {"PATH": os.environ["PATH"], "DCTL_ADDR_0": "198.51.100.8", "DCTL_ADDR_1": "198.51.100.7"}
    r = subprocess.run(["bash", "-c", f"printf '%s' {args}"], capture_output=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    want = content + '\n"url": "http://198.51.100.7:8100"\npd_peer_host: 198.51.100.8\n'
    assert r.stdout.decode() == want


@pytest.mark.parametrize("bad", ["a\nb", "a\rb"])
def test_newlines_are_rejected(bad: str) -> None:
    with pytest.raises(DisaggError, match="newline"):
        render_slurm(_state([bad], "x", "m"), SPEC)
    with pytest.raises(DisaggError, match="newline"):
        render_slurm(_state([], bad, "m"), SPEC)


def test_spec_rejects_newlines_in_free_text() -> None:
    """The spec itself refuses newlines in extra_args, env values and the model path (exit code 2)."""
    from disaggctl.errors import SpecError

    base = "name: q\nhosts: [{name: a, gpus: 2}]\nkv_transfer: {kind: nixl}\ntarget: {kind: slurm}\n"
    for bad in ('model: {path: "/m\\nx"}\n', 'model: {path: /m}\nprefill: {extra_args: ["a\\nb"]}\n',
                'model: {path: /m}\nengine: {env: {X: "a\\nb"}}\n'):
        with pytest.raises(SpecError):
            load_text(base + bad, "q.yaml")
