"""Hostile free text in units: passed through byte for byte, or rejected with a clear error.

A parser that follows systemd's own rules (src/basic/extract-word.c with EXTRACT_UNQUOTE |
EXTRACT_CUNESCAPE, specifier expansion, `$$` in ExecStart=) reads the rendered ExecStart= and
Environment= lines back; hypothesis feeds it spaces, quotes, `$`, `%`, `;`, backslashes, control
characters and unicode in extra_args, env values, model path and served name. The same rules are
checked on a real systemd in test_systemd_quoting_real.py.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disaggctl.errors import DisaggError
from disaggctl.quoting import env_file_line, systemd_env, systemd_exec
from disaggctl.render.systemd import render_systemd
from tests.test_systemd_render import _state

SPECIAL = " \t\"'\\$%;`{}[]()*?~#&|<>!@+:=,-/\x01\x1b\x7fé日🚀"
TROUBLE = [
    ";",
    "",
    "\\;",
    "a;b",
    "$",
    "$$",
    "${HOME}",
    "$HOME",
    "%",
    "%n",
    "%%",
    "'",
    '"',
    "\\",
    "\\\\",
    "\\x41",
    "\\n",
    " ",
    "\t",
    "a b",
    "é",
    "日本",
    "🚀",
    "\x01",
    "\x7f",
    '{"a": "b c", "d": [1, "$x"]}',
    "-",
    "--",
    "@x",
    "+x",
    "!x",
    ":x",
    "-x",
    "`cmd`",
    "$(cmd)",
    "~",
    "*",
    "[a]",
    "#comment",
    "a # b",
    "a\\",
    "'a b'",
]


def random_hostile(rng: random.Random) -> str:
    n = rng.randint(0, 12)
    return "".join(rng.choice(SPECIAL + "abc") for _ in range(n))


hostile = st.text(alphabet=st.sampled_from(list(SPECIAL + "abcXYZ09")), max_size=24) | st.sampled_from(TROUBLE)


# --------------------------------------------------------------------------- systemd's rules


_ESC = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    '"': '"',
    "'": "'",
    "s": " ",
}


def _cunescape_one(s: str, i: int) -> tuple[str, int]:
    """One C escape after a backslash at s[i-1]; returns (text, next index). Subset we emit + common."""
    c = s[i]
    if c in _ESC:
        return _ESC[c], i + 1
    if c == "x":
        return chr(int(s[i + 1 : i + 3], 16)), i + 3
    raise ValueError(f"unsupported escape \\{c}")


def split_words(value: str) -> list[str]:
    """extract_first_word(EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE) over a whole value: the words."""
    words: list[str] = []
    i, n = 0, len(value)
    while True:
        while i < n and value[i] in " \t":
            i += 1
        if i >= n:
            return words
        word, quote = "", None
        while i < n:
            c = value[i]
            if quote is None and c in " \t":
                break
            if c == "\\":
                text, i = _cunescape_one(value, i + 1)
                word += text
                continue
            if quote is None and c in "\"'":
                quote = c
            elif c == quote:
                quote = None
            else:
                word += c
            i += 1
        if quote is not None:
            raise ValueError("unbalanced quote")
        words.append(word)


def specifiers(word: str) -> str:
    """Only `%%` may appear in what we write; any other specifier would be expanded."""
    out, i = "", 0
    while i < len(word):
        if word[i] == "%":
            assert word[i + 1] == "%", f"unescaped specifier in {word!r}"
            out += "%"
            i += 2
        else:
            out += word[i]
            i += 1
    return out


def exec_argv(line: str) -> list[str]:
    """ExecStart= value -> argv as the process sees it (specifiers, unquoting, then `$$` -> `$`)."""
    raw = specifiers(line)
    words = split_words(raw)
    out = []
    for w in words:
        assert "$" not in w.replace("$$", ""), f"unescaped $ in {w!r}"
        out.append(w.replace("$$", "$"))
    return out


def env_assignments(line: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in split_words(specifiers(line)))


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(st.lists(hostile, min_size=1, max_size=6))
def test_exec_start_round_trips(argv: list[str]) -> None:
    full = ["/opt/vllm/bin/vllm", *argv]
    assert exec_argv(systemd_exec(full)) == full


@settings(max_examples=300, deadline=None)
@given(hostile)
def test_environment_round_trips(value: str) -> None:
    assert env_assignments(systemd_env("NAME", value)) == {"NAME": value}


@settings(max_examples=200, deadline=None)
@given(hostile)
def test_environment_file_line_round_trips(value: str) -> None:
    line = env_file_line("TOKEN", value)
    name, _, rest = line.partition("=")
    assert name == "TOKEN" and rest.startswith('"') and rest.endswith('"')
    # EnvironmentFile: inside double quotes, backslash escapes \\ \" \$ \` (and line continuation)
    out, i, body = "", 0, rest[1:-1]
    while i < len(body):
        if body[i] == "\\":
            assert body[i + 1] in '\\"$`', body
            out += body[i + 1]
            i += 2
        else:
            assert body[i] != '"', body
            out += body[i]
            i += 1
    assert out == value


@settings(max_examples=60, deadline=None)
@given(extra=st.lists(hostile, max_size=4), env=hostile, model=hostile.filter(bool), served=hostile.filter(bool))
def test_free_text_fields_reach_the_unit_unchanged(extra: list[str], env: str, model: str, served: str) -> None:
    desired, spec = _state()
    procs = []
    for p in desired.processes:
        if p.role.value == "router":
            procs.append(p)
            continue
        argv = [a if a != "/models/tiny" else model for a in p.argv]
        argv = [served if prev == "--served-model-name" else a for prev, a in zip(["", *argv[:-1]], argv, strict=True)]
        procs.append(p.model_copy(update={"argv": [*argv, *extra], "env": {**p.env, "USER_VAR": env}}))
    state = desired.model_copy(update={"processes": procs})
    r = render_systemd(state, spec, {"HF_TOKEN": "x"})  # type: ignore[arg-type]
    for p in procs:
        unit = next(f.content for f in r.files if f.path.endswith(f"-{p.name}.service"))
        lines = unit.splitlines()
        exec_line = next(line for line in lines if line.startswith("ExecStart="))
        assert exec_argv(exec_line[len("ExecStart=") :]) == p.argv
        env: dict[str, str] = {}
        for line in lines:
            if line.startswith("Environment="):
                env.update(env_assignments(line[len("Environment=") :]))
        assert env == p.env


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "a\0b"])
def test_newlines_are_rejected_with_a_clear_error(bad: str) -> None:
    desired, spec = _state()
    procs = [p.model_copy(update={"argv": [*p.argv, bad]}) if p.name == "prefill-0" else p for p in desired.processes]
    with pytest.raises(DisaggError, match="process prefill-0 on s1: argument must not contain a newline"):
        render_systemd(desired.model_copy(update={"processes": procs}), spec, {"HF_TOKEN": "x"})  # type: ignore[arg-type]
    with pytest.raises(DisaggError, match=r"target\.secrets: the value of HF_TOKEN contains a newline") as e:
        render_systemd(desired, spec, {"HF_TOKEN": "sekrit" + bad})  # type: ignore[arg-type]
    assert "sekrit" not in str(e.value)  # a secret's value is never shown
