"""A catalog of bad inputs across every command: each is refused with exit 2, a located first line
(`error: FILE:LINE:COL FIELD: ...`, or click's usage error naming the flag), no traceback, and
nothing written. Run through cli.main in-process (the real error boundary).

A case is data: the files to create (name -> text or bytes), the command line (`{d}` is the case's
folder), and a regex the first line of stderr must match (`{d}` again).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.input_cli import run_main, snapshot
from tests.plugins.paths import FIXTURES

SMI = FIXTURES / "nvidia-smi"

BASE = """\
name: demo
model:
  path: meta-llama/Llama-3.1-8B-Instruct
hosts:
  - name: node1
    address: 10.0.0.1
    gpus: 8
prefill:
  tensor_parallel: 2
decode:
  tensor_parallel: 2
kv_transfer:
  kind: nixl
target:
  kind: systemd
"""
SLURM = BASE.replace("    address: 10.0.0.1\n", "").replace("  kind: systemd\n", "  kind: slurm\n  partition: gpu\n")
LOCAL = BASE.replace("  kind: systemd\n", "  kind: local\n  state_dir: /tmp/dctl-cat\n")

PLAN_HEAD = (
    '{"format": "disaggctl-plan", "version": 2, "changed": false, '
    '"meta": {"target": "local", "deployment": "x", "spec_hash": "h", '
)


@dataclass
class Case:
    id: str
    args: list[str]
    first: str  # regex for stderr's first line ({d}: the case folder)
    files: dict[str, str | bytes] = field(default_factory=dict)
    code: int = 2
    anywhere: str | None = None  # a regex that must match somewhere in stderr


def spec_case(id: str, text: str | bytes, where: str, cmd: str = "validate", extra: list[str] | None = None) -> Case:
    """A bad spec: `where` is the location and field of the first problem, e.g. `14:3 kv_transfer.bogus`."""
    return Case(id, [cmd, "{d}/s.yaml", *(extra or [])], rf"^error: {{d}}/s\.yaml:{where}: ", {"s.yaml": text})


def sub(base: str, old: str, new: str) -> str:
    assert old in base, old
    return base.replace(old, new, 1)


TOPO = '{"version": 1, "hosts": {"node1": {"gpus": [{"index": 0}]}}}'
LAUGHS = "\n".join(
    ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
)

SPECS: list[Case] = [
    # bytes and YAML
    spec_case("non-utf8", b"name: \xff\xfe\n", r"1:7 spec"),
    spec_case("nul-byte", b"name: demo\x00\n", r"1:11 spec"),
    spec_case("binary-garbage", bytes(range(256)), r"2:118 spec"),
    spec_case("utf16", "name: demo\n".encode("utf-16"), r"1:1 spec"),
    spec_case("vault-tag", sub(BASE, "path: meta-llama/Llama-3.1-8B-Instruct", "path: !vault x"), r"3:9 model\.path"),
    spec_case(
        "int-tag-bad",
        sub(BASE, "tensor_parallel: 2\ndecode", "tensor_parallel: !!int two\ndecode"),
        r"9:20 prefill\.tensor_parallel",
    ),
    spec_case("python-tag", "name: !!python/object:os.system x\n", r"1:7 name"),
    spec_case("recursive-alias", "a: &a [*a]\n", r"1:4 a\[0\]\[0\]\[0\]"),
    spec_case("deep-nesting", "a: " + "[" * 500 + "]" * 500 + "\n", r"1:\d+ \(spec\)"),
    spec_case(
        "deep-mapping", "".join("  " * i + f"k{i}:\n" for i in range(100)) + "  " * 100 + "v: 1\n", r"\d+:\d+ \(spec\)"
    ),
    spec_case("billion-laughs", LAUGHS, r"\d+:\d+ a\d(\[\d\])*"),
    spec_case("empty", "", r"1:1 spec"),
    spec_case("comments-only", "# nothing\n", r"1:1 spec"),
    spec_case("top-level-list", "- a\n- b\n", r"1:1 \(spec\)"),
    spec_case("top-level-scalar", "hello\n", r"1:1 \(spec\)"),
    spec_case("list-as-key", "[a, b]: 1\n" + BASE, r"1:1 \(spec\)"),
    spec_case("map-as-key", "? {a: 1}\n: 2\n" + BASE, r"1:3 \(spec\)"),
    spec_case("duplicate-key", BASE + "name: again\n", r"16:1 name"),
    spec_case(
        "tab-indent", sub(BASE, "  tensor_parallel: 2\ndecode", "\ttensor_parallel: 2\ndecode"), r"\d+:\d+ \(spec\)"
    ),
    spec_case("unclosed-quote", sub(BASE, "name: demo", 'name: "demo'), r"\d+:\d+ \(spec\)"),
    spec_case(
        "unclosed-bracket", sub(BASE, "tensor_parallel: 2\ndecode", "tensor_parallel: [2\ndecode"), r"\d+:\d+ \(spec\)"
    ),
    spec_case("too-big", "name: demo\n" + "#" * (5 * 1024 * 1024) + "\n", r"1:1 spec"),
    # schema
    spec_case("missing-name", sub(BASE, "name: demo\n", ""), r"1:1 name"),
    spec_case("missing-kind", sub(BASE, "  kind: nixl\n", "  backends: [UCX]\n"), r"12:1 kv_transfer\.kind"),
    spec_case("unknown-kind", sub(BASE, "kind: nixl", "kind: rdma"), r"13:3 kv_transfer\.kind"),
    spec_case("unknown-key", sub(BASE, "kind: nixl", "kind: nixl\n  bogus: 1"), r"14:3 kv_transfer\.bogus"),
    spec_case("model-string", sub(BASE, "model:\n  path: meta-llama/Llama-3.1-8B-Instruct", "model: x"), r"2:1 model"),
    spec_case(
        "hosts-empty",
        sub(BASE, "hosts:\n  - name: node1\n    address: 10.0.0.1\n    gpus: 8", "hosts: []"),
        r"4:1 hosts",
    ),
    spec_case(
        "hosts-string",
        sub(BASE, "hosts:\n  - name: node1\n    address: 10.0.0.1\n    gpus: 8", "hosts: node1"),
        r"4:1 hosts",
    ),
    spec_case(
        "tp-string",
        sub(BASE, "tensor_parallel: 2\ndecode", "tensor_parallel: two\ndecode"),
        r"9:3 prefill\.tensor_parallel",
    ),
    spec_case(
        "tp-zero",
        sub(BASE, "tensor_parallel: 2\ndecode", "tensor_parallel: 0\ndecode"),
        r"9:3 prefill\.tensor_parallel",
    ),
    spec_case(
        "tp-not-divisor",
        sub(BASE, "tensor_parallel: 2\ndecode", "tensor_parallel: 3\ndecode"),
        r"9:3 prefill\.tensor_parallel",
    ),
    spec_case("replicas-negative", sub(BASE, "prefill:\n", "prefill:\n  replicas: -1\n"), r"9:3 prefill\.replicas"),
    spec_case("decode-zero", sub(BASE, "decode:\n", "decode:\n  replicas: 0\n"), r"11:3 decode\.replicas"),
    spec_case("port-too-big", BASE + "router: {port: 70000}\n", r"16:\d+ router\.port"),
    spec_case("timeout-inf", BASE + "health: {startup_timeout_s: .inf}\n", r"16:\d+ health\.startup_timeout_s"),
    spec_case("timeout-nan", BASE + "health: {interval_s: .nan}\n", r"16:\d+ health\.interval_s"),
    spec_case("timeout-huge", BASE + "health: {request_timeout_s: 1e400}\n", r"16:\d+ health\.request_timeout_s"),
    spec_case("timeout-1e300", BASE + "health: {startup_timeout_s: 1e300}\n", r"16:\d+ health\.startup_timeout_s"),
    spec_case(
        "unit-timeout-huge",
        sub(BASE, "kind: systemd", "kind: systemd\n  start_timeout_s: 1000000000000000000000000000000"),
        r"16:3 target\.start_timeout_s",
    ),
    spec_case("hbm-inf", BASE + "hardware: {hbm_gb: .inf}\n", r"16:\d+ hardware\.hbm_gb"),
    spec_case("gpus-huge", sub(BASE, "gpus: 8", "gpus: 2000"), r"7:5 hosts\[0\]\.gpus"),
    spec_case(
        "time-limit-words",
        sub(SLURM, "partition: gpu", "partition: gpu\n  time_limit: 4h"),
        r"\d+:3 target\.time_limit",
    ),
    # names, addresses, strings that reach files
    spec_case("name-newline", sub(BASE, "name: demo", 'name: "demo\\n"'), r"1:1 name"),
    spec_case("name-upper", sub(BASE, "name: demo", "name: Demo"), r"1:1 name"),
    spec_case("address-300", sub(BASE, "10.0.0.1", "10.10.0.300"), r"6:5 hosts\[0\]\.address"),
    spec_case("address-space", sub(BASE, "10.0.0.1", '"10.0.0.1 x"'), r"6:5 hosts\[0\]\.address"),
    spec_case("address-newline", sub(BASE, "10.0.0.1", '"10.0.0.1\\n"'), r"6:5 hosts\[0\]\.address"),
    spec_case("address-bad-ipv6", sub(BASE, "10.0.0.1", '"fe80::zz"'), r"6:5 hosts\[0\]\.address"),
    spec_case("address-label", sub(BASE, "10.0.0.1", "bad_-.example"), r"6:5 hosts\[0\]\.address"),
    spec_case("host-name-newline", sub(BASE, "name: node1", 'name: "node1\\n"'), r"5:5 hosts\[0\]\.name"),
    spec_case("host-name-space", sub(BASE, "name: node1", 'name: "node 1"'), r"5:5 hosts\[0\]\.name"),
    spec_case(
        "env-name-space", sub(BASE, "decode:\n", 'decode:\n  env: {"A B": "1"}\n'), r"11:\d+ decode\.env\['A B'\]"
    ),
    spec_case(
        "env-name-newline", sub(BASE, "decode:\n", 'decode:\n  env: {"A\\n": "1"}\n'), r"11:\d+ decode\.env\['A\\n'\]"
    ),
    spec_case("env-value-nul", sub(BASE, "decode:\n", 'decode:\n  env: {A: "x\\0y"}\n'), r"11:\d+ decode\.env\.A"),
    spec_case(
        "env-value-u2028", sub(BASE, "decode:\n", 'decode:\n  env: {A: "x\\u2028y"}\n'), r"11:\d+ decode\.env\.A"
    ),
    spec_case("env-value-cr", BASE + 'engine: {env: {A: "x\\ry"}}\n', r"16:\d+ engine\.env\.A"),
    spec_case(
        "extra-args-newline",
        sub(BASE, "decode:\n", 'decode:\n  extra_args: ["--x", "a\\nb"]\n'),
        r"11:\d+ decode\.extra_args\[1\]",
    ),
    spec_case(
        "extra-args-nel",
        sub(BASE, "decode:\n", 'decode:\n  extra_args: ["a\\x85b"]\n'),
        r"11:\d+ decode\.extra_args\[0\]",
    ),
    spec_case("model-path-cr", sub(BASE, "path: meta-llama/Llama-3.1-8B-Instruct", 'path: "m\\r"'), r"3:3 model\.path"),
    spec_case(
        "served-name-u2029",
        sub(
            BASE,
            "path: meta-llama/Llama-3.1-8B-Instruct",
            'path: meta-llama/Llama-3.1-8B-Instruct\n  served_name: "a\\u2029b"',
        ),
        r"4:3 model\.served_name",
    ),
    spec_case(
        "secret-space",
        sub(BASE, "kind: systemd", 'kind: systemd\n  secrets: ["HF TOKEN"]'),
        r"16:\d+ target\.secrets\[0\]",
    ),
    spec_case(
        "secret-newline",
        sub(BASE, "kind: systemd", 'kind: systemd\n  secrets: ["HF_TOKEN\\n"]'),
        r"16:\d+ target\.secrets\[0\]",
    ),
    spec_case(
        "install-dir-relative",
        sub(BASE, "kind: systemd", "kind: systemd\n  install_dir: etc/x"),
        r"16:3 target\.install_dir",
    ),
    spec_case(
        "vllm-bin-quote",
        sub(BASE, "kind: systemd", "kind: systemd\n  vllm_bin: /opt/v'x/vllm"),
        r"16:3 target\.vllm_bin",
    ),
    spec_case("run-as-upper", sub(BASE, "kind: systemd", "kind: systemd\n  run_as: Root"), r"16:3 target\.run_as"),
    spec_case(
        "unit-prefix-upper", sub(BASE, "kind: systemd", "kind: systemd\n  unit_prefix: X"), r"16:3 target\.unit_prefix"
    ),
    spec_case("router-bind-newline", BASE + 'router: {bind: "0.0.0.0\\n"}\n', r"16:\d+ router\.bind"),
    spec_case("host-bind-999", BASE + "engine: {host_bind: 999.1.1.1}\n", r"16:\d+ engine\.host_bind"),
    spec_case("ssh-user-upper", sub(BASE, "gpus: 8", "gpus: 8\n    ssh: {user: Root}"), r"8:\d+ hosts\[0\]\.ssh\.user"),
    spec_case("ssh-port-zero", sub(BASE, "gpus: 8", "gpus: 8\n    ssh: {port: 0}"), r"8:\d+ hosts\[0\]\.ssh\.port"),
    spec_case(
        "jump-unknown", sub(BASE, "gpus: 8", "gpus: 8\n    ssh: {jump: nowhere}"), r"8:\d+ hosts\[0\]\.ssh\.jump"
    ),
    spec_case(
        "label-newline", sub(BASE, "gpus: 8", 'gpus: 8\n    labels: {a: "b\\nc"}'), r"8:\d+ hosts\[0\]\.labels\.a"
    ),
    spec_case("router-host-unknown", BASE + "router: {host: nowhere}\n", r"16:\d+ router\.host"),
    spec_case(
        "shared-path-relative", sub(BASE, "kind: nixl", "kind: shared-storage\n  path: kv"), r"14:3 kv_transfer\.path"
    ),
    spec_case(
        "offload-disk-relative", BASE + "kv_offload: {enabled: true, disk_path: x}\n", r"16:\d+ kv_offload\.disk_path"
    ),
    # Slurm fields (the injection of issue 11 and the render-time refusals)
    spec_case(
        "slurm-partition-newline", sub(SLURM, "partition: gpu", 'partition: "gpu\\n"'), r"\d+:3 target\.partition"
    ),
    spec_case(
        "slurm-account-pipe",
        sub(SLURM, "partition: gpu", 'partition: gpu\n  account: "x|touch pwned|"'),
        r"\d+:3 target\.account",
    ),
    spec_case("slurm-qos-space", sub(SLURM, "partition: gpu", 'partition: gpu\n  qos: "a b"'), r"\d+:3 target\.qos"),
    spec_case(
        "slurm-constraint-newline",
        sub(SLURM, "partition: gpu", 'partition: gpu\n  constraint: "a\\nb"'),
        r"\d+:3 target\.constraint",
    ),
    spec_case(
        "slurm-exclude-subst",
        sub(SLURM, "partition: gpu", 'partition: gpu\n  exclude: "$(id)"'),
        r"\d+:3 target\.exclude",
    ),
    spec_case(
        "slurm-workdir-space",
        sub(SLURM, "partition: gpu", 'partition: gpu\n  workdir: "/tmp/a b"'),
        r"\d+:3 target\.workdir",
    ),
    spec_case(
        "slurm-workdir-relative",
        sub(SLURM, "partition: gpu", "partition: gpu\n  workdir: tmp/x"),
        r"\d+:3 target\.workdir",
    ),
    spec_case(
        "slurm-workdir-newline",
        sub(SLURM, "partition: gpu", 'partition: gpu\n  workdir: "/tmp/x\\n"'),
        r"\d+:3 target\.workdir",
    ),
    spec_case(
        "slurm-mount-comma",
        sub(SLURM, "partition: gpu", 'partition: gpu\n  container_mounts: ["/a:/a,/b:/b"]'),
        r"\d+:\d+ target\.container_mounts\[0\]",
    ),
    spec_case(
        "slurm-mount-newline",
        sub(SLURM, "partition: gpu", 'partition: gpu\n  container_mounts: ["/a:/a\\n"]'),
        r"\d+:\d+ target\.container_mounts\[0\]",
    ),
    spec_case(
        "slurm-image-space",
        sub(SLURM, "partition: gpu", 'partition: gpu\n  container_image: "a b"'),
        r"\d+:3 target\.container_image",
    ),
    spec_case("slurm-ipv6-host", sub(SLURM, "gpus: 8", 'gpus: 8\n    address: "fe80::1"'), r"7:5 hosts\[0\]\.address"),
    spec_case(
        "slurm-shared-address",
        sub(SLURM, "gpus: 8", "gpus: 8\n    address: n1\n  - {name: node2, address: n1}"),
        r"\d+:\d+ hosts\[1\]\.address",
    ),
    # profiles
    spec_case("profiles-mapping", "profiles: {a: 1}\n" + BASE, r"1:1 profiles"),
    spec_case("profiles-unknown", "profiles: [b20]\n" + BASE, r"1:12 profiles\[0\]"),
    spec_case("profiles-newline", 'profiles: ["h100\\n"]\n' + BASE, r"1:12 profiles\[0\]"),
    spec_case("profiles-too-many", "profiles: [" + ", ".join(["h100"] * 40) + "]\n" + BASE, r"1:1 profiles"),
    # semantic checks
    spec_case(
        "lmcache-buffer-small",
        sub(BASE, "kind: nixl", "kind: lmcache\n  buffer_size_mb: 64").replace(
            "  path: meta-llama/Llama-3.1-8B-Instruct",
            "  path: meta-llama/Llama-3.1-8B-Instruct\n  max_model_len: 8192",
        ),
        r"\d+:3 kv_transfer\.buffer_size_mb",
    ),
    spec_case(
        "gpu-pin-past-host",
        sub(BASE, "prefill:\n", "prefill:\n  hosts: {gpus: [8, 9]}\n"),
        r"9:\d+ prefill\.hosts\.gpus\[0\]",
    ),
    spec_case(
        "gpu-pin-negative",
        sub(BASE, "prefill:\n", "prefill:\n  hosts: {gpus: [-1]}\n"),
        r"9:\d+ prefill\.hosts\.gpus\[0\]",
    ),
    spec_case(
        "local-tmpdir-too-long",
        sub(LOCAL, "decode:\n", "decode:\n  env: {VLLM_RPC_BASE_PATH: /tmp/" + "x" * 80 + "}\n"),
        r"11:\d+ decode\.env\.VLLM_RPC_BASE_PATH",
    ),
]

# the same refusals through the other commands that read a spec
SPECS += [
    spec_case(
        "render-bad-spec", sub(BASE, "10.0.0.1", "10.10.0.300"), r"6:5 hosts\[0\]\.address", "render", ["-o", "{d}/out"]
    ),
    spec_case("plan-bad-spec", sub(BASE, "name: demo", 'name: "demo\\n"'), r"1:1 name", "plan", ["--offline"]),
    spec_case("apply-bad-spec", "", r"1:1 spec", "apply", ["--yes"]),
    spec_case("status-bad-spec", b"\xff", r"1:1 spec", "status"),
    spec_case("destroy-bad-spec", "a: &a [*a]\n", r"1:4 a(\[0\])+", "destroy", ["--yes"]),
    spec_case("logs-bad-spec", "- x\n", r"1:1 \(spec\)", "logs"),
    spec_case("probe-bad-spec", "name: [\n", r"\d+:\d+ \(spec\)", "probe", ["-o", "{d}/t.json"]),
]

FILES: list[Case] = [
    Case("spec-missing", ["validate", "{d}/nope.yaml"], r"^error: {d}/nope\.yaml:1:1 spec: cannot read"),
    Case("spec-folder", ["validate", "{d}"], r"^error: {d}:1:1 spec: is a folder"),
    Case("spec-dev-zero", ["validate", "/dev/zero"], r"^error: /dev/zero:1:1 spec: is not a regular file"),
    Case("spec-dev-urandom", ["validate", "/dev/urandom"], r"^error: /dev/urandom:1:1 spec: is not a regular file"),
    Case(
        "profile-flag-missing",
        ["validate", "{d}/s.yaml", "-p", "nope"],
        r"^error: {d}/s\.yaml:\d+:\d+ profiles: unknown",
        {"s.yaml": BASE},
    ),
    Case(
        "profile-file-binary",
        ["validate", "{d}/s.yaml", "-p", "{d}/p.yaml"],
        r"^error: {d}/p\.yaml:1:1 profile: ",
        {"s.yaml": BASE, "p.yaml": b"\xff\xfe"},
    ),
    Case(
        "profile-file-list",
        ["validate", "{d}/s.yaml", "-p", "{d}/p.yaml"],
        r"^error: {d}/p\.yaml:1:1 \(spec\): ",
        {"s.yaml": BASE, "p.yaml": "- a\n"},
    ),
    Case(
        "profile-file-tag",
        ["validate", "{d}/s.yaml", "-p", "{d}/p.yaml"],
        r"^error: {d}/p\.yaml:1:\d+ hardware: ",
        {"s.yaml": BASE, "p.yaml": "hardware: !secret x\n"},
    ),
    # topology files
    Case(
        "topology-missing",
        ["validate", "{d}/s.yaml", "-t", "{d}/t.json"],
        r"^error: {d}/t\.json:1:1 topology file: cannot read",
        {"s.yaml": BASE},
    ),
    Case(
        "topology-not-json",
        ["validate", "{d}/s.yaml", "-t", "{d}/t.json"],
        r"^error: {d}/t\.json:2:1 topology file: is not valid JSON",
        {"s.yaml": BASE, "t.json": "{\n]"},
    ),
    Case(
        "topology-list",
        ["validate", "{d}/s.yaml", "-t", "{d}/t.json"],
        r"^error: {d}/t\.json:1:1 topology file: must be a JSON object",
        {"s.yaml": BASE, "t.json": "[]"},
    ),
    Case(
        "topology-wrong-shape",
        ["validate", "{d}/s.yaml", "-t", "{d}/t.json"],
        r"^error: {d}/t\.json:1:1 topology file hosts",
        {"s.yaml": BASE, "t.json": '{"hosts": 3}'},
    ),
    Case(
        "topology-nan",
        ["validate", "{d}/s.yaml", "-t", "{d}/t.json"],
        r"^error: {d}/t\.json:1:1 topology file: is not valid JSON: NaN",
        {"s.yaml": BASE, "t.json": '{"a": NaN}'},
    ),
    Case(
        "topology-deep",
        ["validate", "{d}/s.yaml", "-t", "{d}/t.json"],
        r"^error: {d}/t\.json:1:1 topology file: ",
        {"s.yaml": BASE, "t.json": "[" * 5000 + "]" * 5000},
    ),
    Case(
        "topology-binary",
        ["validate", "{d}/s.yaml", "-t", "{d}/t.json"],
        r"^error: {d}/t\.json:1:1 topology file: is not UTF-8",
        {"s.yaml": BASE, "t.json": b"\x80\x81"},
    ),
    Case(
        "topology-dev-zero",
        ["validate", "{d}/s.yaml", "-t", "/dev/zero"],
        r"^error: /dev/zero:1:1 topology file: is not a regular file",
        {"s.yaml": BASE},
    ),
    Case(
        "topology-folder",
        ["render", "{d}/s.yaml", "-t", "{d}", "-o", "{d}/out"],
        r"^error: {d}:1:1 topology file: is a folder",
        {"s.yaml": BASE},
    ),
    Case(
        "topology-cpu-affinity-injection",
        ["validate", "{d}/s.yaml", "-t", "{d}/t.json"],
        r"^error: {d}/t\.json:1:1 topology file hosts\.node1\.gpus\.0\.cpu_affinity: ",
        {"s.yaml": BASE, "t.json": TOPO.replace('"index": 0', '"index": 0, "cpu_affinity": "0\\nExecStartPre=/bin/x"')},
    ),
    Case(
        "topology-memory-negative",
        ["validate", "{d}/s.yaml", "-t", "{d}/t.json"],
        r"^error: {d}/t\.json:1:1 topology file hosts\.node1\.gpus\.0\.memory_total_mib: ",
        {"s.yaml": BASE, "t.json": TOPO.replace('"index": 0', '"index": 0, "memory_total_mib": -5')},
    ),
    Case(
        "topology-power-huge",
        ["validate", "{d}/s.yaml", "-t", "{d}/t.json"],
        r"^error: {d}/t\.json:1:1 topology file hosts\.node1\.gpus\.0\.power_limit_w: ",
        {"s.yaml": BASE, "t.json": TOPO.replace('"index": 0', '"index": 0, "power_limit_w": 1e400')},
    ),
    Case(
        "topology-gpu-index-negative",
        ["validate", "{d}/s.yaml", "-t", "{d}/t.json"],
        r"^error: {d}/t\.json:1:1 topology file hosts\.node1\.gpus\.0\.index: ",
        {"s.yaml": BASE, "t.json": TOPO.replace('"index": 0', '"index": -1')},
    ),
    Case(
        "capture-memory-negative",
        ["topology", "{d}/x.xml"],
        r"^error: {d}/x\.xml:1:1 capture: gpus\.0\.memory_total_mib: ",
        {
            "x.xml": (SMI / "nvidia-smi-q-x_b200.xml")
            .read_text()
            .replace("<total>183359 MiB</total>", "<total>-5 MiB</total>", 1)
        },
    ),
    # captures (disaggctl topology)
    Case("capture-missing", ["topology", "{d}/x.xml"], r"^error: {d}/x\.xml:1:1 capture: cannot read"),
    Case(
        "capture-bad-xml",
        ["topology", "{d}/x.xml"],
        r"^error: {d}/x\.xml:1:1 capture: cannot parse",
        {"x.xml": "<?xml version='1.0'?>\n<nvidia_smi_log><gpu>"},
    ),
    Case("capture-dev-urandom", ["topology", "/dev/urandom"], r"^error: /dev/urandom:1:1 capture: is not a regular"),
    Case("capture-folder", ["topology", "{d}"], r"^error: {d}:1:1 capture: is a folder"),
    # saved plans (apply PLAN.json, apply --plan)
    Case("plan-missing", ["apply", "{d}/p.json"], r"^error: {d}/p\.json:1:1 saved plan: cannot read"),
    Case(
        "plan-not-json",
        ["apply", "{d}/p.json"],
        r"^error: {d}/p\.json:1:2 saved plan: is not valid JSON",
        {"p.json": "{x"},
    ),
    Case(
        "plan-list",
        ["apply", "{d}/p.json"],
        r"^error: {d}/p\.json:1:1 saved plan: must be a JSON object",
        {"p.json": "[1]"},
    ),
    Case(
        "plan-no-spec-file",
        ["apply", "{d}/p.json"],
        r"^error: {d}/p\.json:1:1 saved plan: is not a saved plan",
        {"p.json": '{"name": "x"}'},
    ),
    Case(
        "plan-spec-file-int",
        ["apply", "{d}/p.json"],
        r"^error: {d}/p\.json:1:1 saved plan meta\.spec_file: ",
        {"p.json": PLAN_HEAD + '"spec_file": 3}}'},
    ),
    Case(
        "plan-profiles-string",
        ["apply", "{d}/p.json"],
        r"^error: {d}/p\.json:1:1 saved plan meta\.profiles: .*valid list",
        {"p.json": PLAN_HEAD + '"spec_file": "s.yaml", "profiles": "b200"}}'},
    ),
    Case(
        "plan-topology-int",
        ["apply", "{d}/p.json"],
        r"^error: {d}/p\.json:1:1 saved plan meta\.topology_file: ",
        {"p.json": PLAN_HEAD + '"spec_file": "s.yaml", "topology_file": 7}}'},
    ),
    Case(
        "plan-flag-missing",
        ["apply", "{d}/s.yaml", "--plan", "{d}/p.json"],
        r"^error: {d}/p\.json:1:1 saved plan: cannot read",
        {"s.yaml": BASE},
    ),
    Case(
        "plan-flag-binary",
        ["apply", "{d}/s.yaml", "--plan", "{d}/p.json"],
        r"^error: {d}/p\.json:1:1 saved plan: is not UTF-8",
        {"s.yaml": BASE, "p.json": b"\xfe"},
    ),
    Case(
        "plan-dev-zero",
        ["apply", "{d}/s.yaml", "--plan", "/dev/zero"],
        r"^error: /dev/zero:1:1 saved plan: is not a regular",
        {"s.yaml": BASE},
    ),
    # output paths
    Case(
        "render-out-is-file",
        ["render", "{d}/s.yaml", "-o", "{d}/s.yaml"],
        r"^error: {d}/s\.yaml:1:1 render output folder: exists and is not a folder",
        {"s.yaml": BASE},
    ),
    Case(
        "render-out-under-file",
        ["render", "{d}/s.yaml", "-o", "{d}/s.yaml/x"],
        r"^error: {d}/s\.yaml/x:1:1 render output folder: cannot create it",
        {"s.yaml": BASE},
    ),
    Case(
        "render-out-proc",
        ["render", "{d}/s.yaml", "-o", "/proc/dctl-nope"],
        r"^error: /proc/dctl-nope:1:1 render output folder: cannot (write|create)",
        {"s.yaml": BASE},
    ),
    Case(
        "plan-offline-out",
        ["plan", "{d}/s.yaml", "--offline", "-o", "{d}/p.json"],
        r"^error: {d}/p\.json:1:1 --out: --offline cannot save a plan",
        {"s.yaml": BASE},
    ),
    Case(
        "plan-out-missing-folder",
        ["plan", "{d}/s.yaml", "-o", "{d}/no/p.json"],
        r"^error: {d}/no/p\.json:1:1 plan file: cannot write: the folder",
        {"s.yaml": BASE},
    ),
    Case(
        "topology-out-missing-folder",
        ["topology", str(SMI / "nvidia-smi-q-x_b200.xml"), "-o", "{d}/no/t.json"],
        r"^error: {d}/no/t\.json:1:1 topology file: cannot write",
    ),
    Case(
        "topology-out-folder",
        ["topology", str(SMI / "nvidia-smi-q-x_b200.xml"), "-o", "{d}"],
        r"^error: {d}:1:1 topology file: is a folder",
    ),
    Case(
        "probe-out-missing-folder",
        ["probe", "--local", "-o", "{d}/no/t.json"],
        r"^error: {d}/no/t\.json:1:1 topology file: cannot write",
    ),
]

FLAGS: list[Case] = [
    Case(
        f"{cmd}-output-yaml",
        [cmd, "{d}/s.yaml", *extra, "--output", "yaml"],
        r"^Usage: ",
        {"s.yaml": BASE},
        anywhere=r"Invalid value for '--output': .*'yaml' is not one of 'text', 'json'",
    )
    for cmd, extra in (("plan", ["--offline"]), ("status", []))
] + [
    Case(
        "topology-output-yaml",
        ["topology", str(SMI / "nvidia-smi-q-x_b200.xml"), "--output", "yaml"],
        r"^Usage: ",
        anywhere=r"'yaml' is not one of 'text', 'json'",
    ),
    Case(
        "topology-gpus-negative",
        ["topology", str(SMI / "nvidia-smi-q-x_b200.xml"), "--gpus", "-1"],
        r"^Usage: ",
        anywhere=r"Invalid value for '--gpus': .*(greater than or equal to 1|not in the range)",
    ),
    Case(
        "topology-gpus-zero",
        ["topology", str(SMI / "nvidia-smi-q-x_b200.xml"), "--gpus", "0"],
        r"^Usage: ",
        anywhere=r"Invalid value for '--gpus'",
    ),
    Case(
        "logs-lines-negative",
        ["logs", "{d}/s.yaml", "-n", "-5"],
        r"^Usage: ",
        {"s.yaml": BASE},
        anywhere=r"Invalid value for '--lines' / '-n'",
    ),
    Case(
        "logs-instance-negative",
        ["logs", "{d}/s.yaml", "--instance", "-1"],
        r"^Usage: ",
        {"s.yaml": BASE},
        anywhere=r"Invalid value for '--instance'",
    ),
    Case(
        "probe-timeout-zero",
        ["probe", "--local", "--timeout", "0", "-o", "{d}/t.json"],
        r"^Usage: ",
        anywhere=r"Invalid value for '--timeout'",
    ),
    Case(
        "logs-role-unknown",
        ["logs", "{d}/s.yaml", "--role", "worker"],
        r"^Usage: ",
        {"s.yaml": BASE},
        anywhere=r"Invalid value for '--role': .*'worker' is not one of 'prefill', 'decode', 'router'",
    ),
    Case("validate-no-spec", ["validate"], r"^Usage: ", anywhere=r"Missing argument 'SPEC'"),
    Case("unknown-command", ["valdate"], r"^Usage: ", anywhere=r"No such command 'valdate'"),
    Case(
        "unknown-flag",
        ["validate", "{d}/s.yaml", "--bogus"],
        r"^Usage: ",
        {"s.yaml": BASE},
        anywhere=r"No such option: --bogus",
    ),
]

CASES = SPECS + FILES + FLAGS


def test_the_catalog_is_large_and_unique() -> None:
    assert len(CASES) >= 100, len(CASES)
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_located_and_changes_nothing(case: Case, tmp_path: Path) -> None:
    d = tmp_path / "case"
    d.mkdir()
    for name, content in case.files.items():
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    before = snapshot(tmp_path)
    r = run_main(*[a.replace("{d}", str(d)) for a in case.args], cwd=d)
    assert r.code == case.code, (r.code, r.err[-2000:])
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err[-2000:]
    pattern = case.first.replace("{d}", re.escape(str(d)))
    assert re.match(pattern, r.first), f"first line {r.first!r} does not match {pattern!r}\n{r.err[:1500]}"
    if case.anywhere:  # click's usage errors come in a rich box, wrapped
        flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.err).split())
        assert re.search(case.anywhere, flat), flat
    if r.first.startswith("error:"):
        assert r.err.rstrip().endswith("nothing was changed") or "nothing was changed" in r.err, r.err[-500:]
    assert snapshot(tmp_path) == before, "a refused command wrote files"
    assert r.out == "" or case.code != 2 or not r.first.startswith("error:") or "OK" not in r.out


def test_many_problems_are_counted_not_all_listed(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(BASE + "".join(f"bogus{i}: 1\n" for i in range(300)))
    r = run_main("validate", str(spec))
    assert r.code == 2
    located = [line for line in r.err.splitlines() if re.match(rf"(error: )?{re.escape(str(spec))}:\d+:\d+ ", line)]
    assert len(located) == 50  # 49 problems and the count of the rest
    assert "251 more problems not listed" in r.err


def test_internal_error_is_one_line_and_debug_shows_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (here: the placement raising a KeyError) is not blamed on the input."""
    spec = tmp_path / "s.yaml"
    spec.write_text(BASE)

    def broken(*a: object, **k: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr("disaggctl.compile.compile_spec", broken)
    r = run_main("validate", str(spec))
    assert r.code == 70
    assert len(r.err.splitlines()) == 1
    assert r.first.startswith("internal error (a bug in disaggctl") and "KeyError" in r.first and "--debug" in r.first
    r = run_main("--debug", "validate", str(spec))
    assert r.code == 70 and "Traceback (most recent call last)" in r.err and "KeyError: 'boom'" in r.err


def test_saved_plan_profiles_string_is_not_split_into_letters(tmp_path: Path) -> None:
    """Issue 11: a plan whose `profiles` is a string said "unknown profile 'b'"."""
    plan = tmp_path / "p.json"
    meta = {"target": "local", "deployment": "x", "spec_hash": "h", "spec_file": str(tmp_path / "s.yaml")}
    doc = {"format": "disaggctl-plan", "version": 2, "changed": False, "meta": {**meta, "profiles": "b200"}}
    plan.write_text(json.dumps(doc))
    r = run_main("apply", str(plan))
    assert r.code == 2 and "unknown profile 'b'" not in r.err and "meta.profiles: " in r.first
