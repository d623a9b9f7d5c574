"""Hostile values in every spec field that reaches a generated file, through every renderer.

For each (renderer, field) a value built around hostile characters (newline, CR, NUL, `|;&$\\`'"%`,
U+0085/U+2028/U+2029, ...) is put into a valid spec. The property: the spec loader refuses it with a
located error, or `validate` passes and then `render` succeeds and the real consumer sees the same
structure as with a benign value:
  - systemd: every unit parses into the same sections and keys, ExecStart= and Environment= split
    (by systemd's rules) into the same number of words, and `systemd-analyze verify` is silent;
  - Slurm: `bash -n` accepts the batch script and every launcher, the `#SBATCH` lines carry the same
    options, and the command skeleton (bash's own `declare -f` of the script, tokenized, with the words
    holding the value replaced by a placeholder) is unchanged;
  - local: the process table is JSON the supervisor reads back, with the same processes and words.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disaggctl.compile import compile_spec
from disaggctl.errors import SpecError
from disaggctl.input_checks import desired_checks, render_check
from disaggctl.loader import load_text
from disaggctl.render import render
from disaggctl.render.local import Table
from tests.test_systemd_quoting import split_words

REPO = Path(__file__).resolve().parents[1]
VERIFY = REPO / "tests" / "infra" / "verify_unit.sh"

TROUBLE = [
    "\n",
    "\r",
    "\0",
    "|",
    ";",
    "&",
    "$",
    "`",
    "'",
    '"',
    "%",
    "\\",
    "\u2028",
    "\u2029",
    "\x85",
    " ",
    "\t",
    "#",
    "*",
    "(",
    ")",
    "{",
    "}",
    "<",
    ">",
    "!",
    "~",
    "=",
    ",",
    ":",
    "/",
    ".",
    "-",
    "_",
    "[",
    "]",
    "@",
]
CORE = st.text(alphabet=st.sampled_from([*TROUBLE, "a", "Z", "9", "é"]), min_size=1, max_size=12) | st.sampled_from(
    ["\n", "|touch pwned|", "$(touch pwned)", "`touch pwned`", "a\nb", "x\r", "\u2028", "%n", "a b", "'\"", ";rm -f x;"]
)

SYSTEMD = {
    "name": "h",
    "model": {"path": "/models/tiny", "served_name": "tiny"},
    "hosts": [{"name": "s1", "address": "10.0.0.1", "gpus": 2}, {"name": "s2", "address": "10.0.0.2", "gpus": 2}],
    "prefill": {"replicas": 1, "extra_args": ["--x"], "env": {"PV": "1"}},
    "decode": {"replicas": 1},
    "kv_transfer": {"kind": "nixl", "ucx_tls": ["rc"], "ucx_net_devices": ["mlx5_0:1"], "backends": ["UCX"]},
    "engine": {"env": {"EV": "1"}},
    "router": {"host": "s1"},
    "target": {
        "kind": "systemd",
        "vllm_bin": "/opt/v/bin/vllm",
        "python_bin": "/opt/v/bin/python",
        "secrets": ["HF_TOKEN"],
        "run_as": "svc",
    },
}
SLURM = {
    "name": "h",
    "model": {"path": "/models/tiny", "served_name": "tiny"},
    "hosts": [{"name": "s1", "gpus": 2}, {"name": "s2", "gpus": 2}],
    "prefill": {"replicas": 1, "hosts": {"names": ["s1"]}, "extra_args": ["--x"], "env": {"PV": "1"}},
    "decode": {"replicas": 1, "hosts": {"names": ["s2"]}},
    "kv_transfer": {"kind": "nixl", "ucx_tls": ["rc"], "backends": ["UCX"]},
    "engine": {"env": {"EV": "1"}},
    "router": {"host": "s1"},
    "target": {
        "kind": "slurm",
        "partition": "gpu",
        "account": "acct",
        "qos": "normal",
        "constraint": "h100",
        "exclude": "n[1-2]",
        "container_image": "nvcr.io#nvidia/vllm:1",
        "container_mounts": ["/d:/d"],
        "workdir": "/tmp/dj",
        "successor": {"enabled": True},
    },
}
LOCAL = {
    "name": "h",
    "model": {"path": "/models/tiny", "served_name": "tiny"},
    "hosts": [{"name": "localhost", "address": "127.0.0.1", "gpus": 2}],
    "prefill": {"replicas": 1, "extra_args": ["--x"], "env": {"PV": "1"}},
    "decode": {"replicas": 1},
    "kv_transfer": {"kind": "shared-storage", "path": "/tmp/kvx"},
    "engine": {"env": {"EV": "1"}},
    "target": {"kind": "local", "state_dir": "/tmp/dctl-h", "vllm_bin": "/opt/v/bin/vllm"},
}

Setter = Callable[[dict[str, Any], str], None]


def at(*path: str | int) -> Setter:
    def put(spec: dict[str, Any], value: str) -> None:
        node: Any = spec
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value

    return put


def key_of(*path: str) -> Setter:
    """Replace the only key of the mapping at `path` (an environment variable name)."""

    def put(spec: dict[str, Any], value: str) -> None:
        node: Any = spec
        for p in path:
            node = node[p]
        (old,) = list(node)
        node[value] = node.pop(old)

    return put


def rename_host(spec: dict[str, Any], value: str) -> None:
    """Rename host s1 and every reference to it (router.host, pool host names)."""
    spec["hosts"][0]["name"] = value
    if spec.get("router", {}).get("host") == "s1":
        spec["router"]["host"] = value
    for role in ("prefill", "decode"):
        names = spec.get(role, {}).get("hosts", {}).get("names")
        if names:
            spec[role]["hosts"]["names"] = [value if n == "s1" else n for n in names]


# field -> (setter, how a value is built around the hostile core)
def _plain(core: str) -> str:
    return f"ZQ{core}QZ"


def _path(core: str) -> str:
    return f"/ZQ{core}QZ"


def _lower(core: str) -> str:
    return f"zq{core}qz"


COMMON: dict[str, tuple[Setter, Callable[[str], str]]] = {
    "model.path": (at("model", "path"), _path),
    "model.served_name": (at("model", "served_name"), _plain),
    "prefill.extra_args": (at("prefill", "extra_args", 0), _plain),
    "prefill.env value": (at("prefill", "env", "PV"), _plain),
    "prefill.env name": (key_of("prefill", "env"), _plain),
    "engine.env value": (at("engine", "env", "EV"), _plain),
    "engine.env name": (key_of("engine", "env"), _plain),
    "engine.host_bind": (at("engine", "host_bind"), _lower),
    "name": (at("name"), _lower),
}
FIELDS: dict[str, dict[str, tuple[Setter, Callable[[str], str]]]] = {
    "systemd": {
        **COMMON,
        "hosts[0].address": (at("hosts", 0, "address"), _lower),
        "hosts[0].name": (rename_host, _lower),
        "router.bind": (at("router", "bind"), _lower),
        "kv_transfer.ucx_tls": (at("kv_transfer", "ucx_tls", 0), _plain),
        "kv_transfer.ucx_net_devices": (at("kv_transfer", "ucx_net_devices", 0), _plain),
        "kv_transfer.backends": (at("kv_transfer", "backends", 0), _plain),
        "target.install_dir": (at("target", "install_dir"), _path),
        "target.state_dir": (at("target", "state_dir"), _path),
        "target.router_bin": (at("target", "router_bin"), _path),
        "target.vllm_bin": (at("target", "vllm_bin"), _path),
        "target.python_bin": (at("target", "python_bin"), _path),
        "target.unit_prefix": (at("target", "unit_prefix"), _lower),
        "target.run_as": (at("target", "run_as"), _lower),
        "target.secrets": (at("target", "secrets", 0), _plain),
    },
    "slurm": {
        **COMMON,
        "hosts[0].name": (rename_host, _lower),
        "target.partition": (at("target", "partition"), _plain),
        "target.account": (at("target", "account"), _plain),
        "target.qos": (at("target", "qos"), _plain),
        "target.constraint": (at("target", "constraint"), _plain),
        "target.exclude": (at("target", "exclude"), _plain),
        "target.container_image": (at("target", "container_image"), _plain),
        "target.container_mounts": (at("target", "container_mounts", 0), _path),
        "target.workdir": (at("target", "workdir"), _path),
        "target.vllm_bin": (at("target", "vllm_bin"), _plain),
        "target.python_bin": (at("target", "python_bin"), _plain),
        "target.router_bin": (at("target", "router_bin"), _plain),
        "target.time_limit": (at("target", "time_limit"), lambda c: "12:00:00" if c == BENIGN else f"12:00{c}"),
        "kv_transfer.ucx_tls": (at("kv_transfer", "ucx_tls", 0), _plain),
    },
    "local": {
        **COMMON,
        "target.vllm_bin": (at("target", "vllm_bin"), _path),
        "target.python_bin": (at("target", "python_bin"), _path),
        "kv_transfer.path": (at("kv_transfer", "path"), _path),
    },
}
BASES = {"systemd": SYSTEMD, "slurm": SLURM, "local": LOCAL}
BENIGN = "b9"


def _spec_text(kind: str, field: str, value: str) -> str:
    spec = copy.deepcopy(BASES[kind])
    FIELDS[kind][field][0](spec, value)
    return yaml.safe_dump(spec)


def _outcome(kind: str, field: str, value: str) -> dict[str, str] | None:
    """The rendered files, or None when the input boundary refused the value (with a location)."""
    try:
        loaded = load_text(_spec_text(kind, field, value), "h.yaml")
        desired = compile_spec(loaded)
        desired_checks(loaded, desired)
        render_check(loaded, desired)  # what `validate` runs
    except SpecError as e:
        assert e.issues and all(i.location is not None for i in e.issues), e
        assert e.issues[0].location is not None and e.issues[0].location.file == "h.yaml"
        return None
    # validate passed: render must too (no render-time refusal left)
    secrets = {k: "t" for k in getattr(loaded.spec.target, "secrets", [])}
    rendered = render(desired, loaded.spec, secrets)
    return {f"{f.host}:{f.path}": f.content for f in rendered.files}


# --------------------------------------------------------------------------- systemd


def _unit_shape(text: str) -> list[tuple[str, str, int]]:
    """(section, key, words) per line; words of ExecStart=/Environment= split by systemd's rules."""
    section, out = "", []
    for line in text.split("\n"):
        if not line or line.startswith("#"):
            continue
        if re.fullmatch(r"\[[A-Za-z]+\]", line):
            section = line
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z]+", key), f"not a unit line: {line!r}"
        words = len(split_words(value)) if key in ("ExecStart", "Environment") else 0
        out.append((section, key, words))
    return out


def _systemd_check(files: dict[str, str], benign: dict[str, str], value: str) -> None:
    def shapes(fs: dict[str, str]) -> list[list[tuple[str, str, int]]]:
        return [_unit_shape(t) for k, t in sorted(fs.items()) if k.endswith((".service", ".target"))]

    assert shapes(files) == shapes(benign)
    units = {k: t for k, t in files.items() if k.endswith((".service", ".target"))}
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, (k, t) in enumerate(sorted(units.items())):
            host = k.split(":", 1)[0]
            p = Path(d) / f"{i}-{host}" / Path(k.split(":", 1)[1]).name
            p.parent.mkdir(exist_ok=True)
            p.write_text(t)
            paths.append(str(p))
        for group in sorted({str(Path(p).parent) for p in paths}):
            mine = [p for p in paths if p.startswith(group + "/")]
            r = subprocess.run(["bash", str(VERIFY), "--allow-missing-exec", *mine], capture_output=True, text=True)
            assert r.returncode == 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- Slurm


def _skeleton(script: str, value: str) -> list[str]:
    """bash's own normal form of the script (`declare -f`), as shell tokens; words holding `value` -> <V>."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(script)
    try:
        r = subprocess.run(["bash", "-n", f.name], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(
            ["bash", "-c", 'eval "dctl_whole() {\n$(cat "$1")\n}" && declare -f dctl_whole', "_", f.name],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
    finally:
        Path(f.name).unlink()
    lex = shlex.shlex(r.stdout, posix=True, punctuation_chars=True)
    lex.commenters = ""
    lex.whitespace_split = True
    # the script's own hash (`--comment=disaggctl:<hash>`) differs with any change of content
    # a launcher's text is itself a word of the batch script: there the value is shell-quoted
    # (in the router's JSON config, JSON-escaped)
    held = (value, shlex.quote(value), json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1])
    return ["<V>" if any(v in tok for v in held) else re.sub(r"\b[0-9a-f]{16}\b", "<HASH>", tok) for tok in lex]


def _sbatch_options(script: str) -> list[list[str]]:
    return [[o.split("=", 1)[0] for o in line.split()[1:]] for line in script.split("\n") if line.startswith("#SBATCH")]


def _slurm_check(files: dict[str, str], benign: dict[str, str], value: str, benign_value: str) -> None:
    scripts = sorted((k, t) for k, t in files.items() if k.startswith("slurm:"))
    bscripts = sorted((k, t) for k, t in benign.items() if k.startswith("slurm:"))
    launchers = sorted(t for k, t in files.items() if not k.startswith("slurm:"))
    blaunchers = sorted(t for k, t in benign.items() if not k.startswith("slurm:"))
    assert len(scripts) == len(bscripts) == 1 and len(launchers) == len(blaunchers)
    script, bscript = scripts[0][1], bscripts[0][1]
    assert _sbatch_options(script) == _sbatch_options(bscript)
    assert _skeleton(script, value) == _skeleton(bscript, benign_value)
    for t, b in zip(launchers, blaunchers, strict=True):
        assert _skeleton(t, value) == _skeleton(b, benign_value)


# --------------------------------------------------------------------------- local


def _local_check(files: dict[str, str], benign: dict[str, str]) -> None:
    def shape(fs: dict[str, str]) -> list[tuple[str, int, int]]:
        (table,) = [t for k, t in fs.items() if k.endswith("/processes.json")]
        tbl = Table.from_json(table)
        json.loads(table)
        return [(p.name, len(p.argv), len(p.env)) for p in tbl.processes]

    assert shape(files) == shape(benign)


# --------------------------------------------------------------------------- the property


def _check(kind: str, field: str, core: str) -> None:
    build = FIELDS[kind][field][1]
    value, benign_value = build(core), build(BENIGN)
    benign = _outcome(kind, field, benign_value)
    assert benign is not None, f"the benign value {benign_value!r} must be accepted in {field}"
    files = _outcome(kind, field, value)
    if files is None:
        return
    if kind == "systemd":
        _systemd_check(files, benign, value)
    elif kind == "slurm":
        _slurm_check(files, benign, value, benign_value)
    else:
        _local_check(files, benign)


@pytest.mark.parametrize("kind", ["systemd", "slurm", "local"])
def test_every_field_refuses_or_keeps_structure_with_trouble_chars(kind: str) -> None:
    """Each field with each single trouble character (deterministic sweep)."""
    for field in FIELDS[kind]:
        for c in ["\n", "\r", "\0", "\u2028", "\u2029", "\x85", "|touch pwned|", "$(touch pwned)", "'\"", "%n", " "]:
            _check(kind, field, c)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_values_refused_or_structure_unchanged(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["systemd", "slurm", "local"]))
    field = data.draw(st.sampled_from(sorted(FIELDS[kind])))
    _check(kind, field, data.draw(CORE))


def test_the_reported_injections_are_refused_where_they_are_written() -> None:
    """The issue's examples: `partition: "gpu\\n"` and `account: "x|touch pwned|"`."""
    for field, value in (("target.partition", "gpu\n"), ("target.account", "x|touch pwned|")):
        spec = copy.deepcopy(SLURM)
        FIELDS["slurm"][field][0](spec, value)
        with pytest.raises(SpecError) as e:
            load_text(yaml.safe_dump(spec), "h.yaml")
        assert str(e.value).startswith("h.yaml:") and field in str(e.value), str(e.value)
