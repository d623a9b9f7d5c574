"""`disaggctl demo-model`: the tiny offline model is complete, deterministic and cached."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from disaggctl import demo_model


def test_corpus_is_deterministic() -> None:
    a = list(demo_model.corpus(200))
    assert a == list(demo_model.corpus(200)) and len(a) > 200
    assert a != list(demo_model.corpus(200, seed=1))


def test_build_is_complete_reused_and_tokenizes_as_the_demo_expects(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    r = subprocess.run(
        [sys.executable, "-m", "disaggctl.cli", "demo-model", str(out)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "built in" in r.stdout
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", demo_model.MARKER):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 2
    assert demo_model.is_built(out)
    r = subprocess.run(
        [sys.executable, "-m", "disaggctl.cli", "demo-model", str(out)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "already built" in r.stdout

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert cfg["vocab_size"] == len(tok)
    # the canary (default spec prompt) must pass the examples' 32-token threshold and the
    # shared-storage connector's 34-token minimum; a greeting must stay under the threshold
    canary = "The quick brown fox jumps over the lazy dog. " * 8
    assert len(tok(canary).input_ids) >= 40
    assert len(tok("Hello world").input_ids) < 32
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in chat
    assert tok.decode(tok("Hello world").input_ids, skip_special_tokens=True) == "Hello world"


def test_a_half_built_folder_is_not_reused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert not demo_model.is_built(tmp_path)
    (tmp_path / demo_model.MARKER).write_text("not json")
    assert not demo_model.is_built(tmp_path)
