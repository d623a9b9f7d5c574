"""A tiny random-weight Llama with an offline BPE tokenizer: the model of the local CPU demo and the e2e tests.

Nothing is downloaded. The tokenizer is trained on a corpus generated here from a fixed word
list and seed, so every machine builds the same vocabulary; the weights come from a fixed
torch seed. The output is garbage text, but it is deterministic and vLLM serves it like any
Llama (2 layers, hidden 128, 2 KV heads: KV per token = 2 x 2 x 2 x 32 x 2 B = 512 B).

torch, transformers and tokenizers come with vLLM; they are imported inside `build` so the
CLI stays fast.
"""

from __future__ import annotations

import importlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from disaggctl.errors import DisaggError

MARKER = "disaggctl-demo-model.json"
VERSION = 1

_WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the quick brown fox jumps over lazy dog a an of to in is it that for on with as was at by from "
    "prefill decode cache token model server request response router instance pool cluster host node "
    "memory transfer block prompt output input batch queue latency throughput first time per second "
    "one two three four five six seven eight nine ten hundred thousand many few more less all none "
    "system service process file config state health metric error retry restart start stop run wait "
    "hello world good morning evening night day week year please thank you yes no maybe sure "
    "water fire earth air light dark red green blue yellow white black small large long short fast slow "
    "city river mountain forest ocean island road bridge house garden window door table chair book "
    "write read speak listen think know learn teach build make find give take send receive open close "
    "user assistant question answer explain describe summarize translate compute count list show tell"
).split()
_PUNCT = [".", ",", "!", "?", ":", ";"]


def corpus(sentences: int = 4000, seed: int = 0) -> Iterator[str]:
    """Deterministic English-like text plus digits, code-ish lines and the canary sentence."""
    rng = random.Random(seed)
    for i in range(sentences):
        n = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(n)]
        words[0] = words[0].capitalize()
        yield " ".join(words) + rng.choice(_PUNCT) + " "
        if i % 50 == 0:
            yield f"{i} + {i * 7 % 97} = {i + i * 7 % 97}\n"
            yield f"def f_{i}(x):\n    return x * {i} # {rng.choice(_WORDS)}\n"
    yield "The quick brown fox jumps over the lazy dog. " * 20
    yield json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 8})


_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + "
    "(message['content'] if message['content'] is string else '') + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def is_built(out: Path) -> bool:
    """True when `out` holds a complete model of this VERSION (so callers can cache it)."""
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return bool(info.get("version") == VERSION) and (out / "model.safetensors").is_file()


def build(out: Path, *, vocab_size: int = 2048, force: bool = False) -> dict[str, object]:
    """Write the tokenizer and model to `out`; returns facts about them. Reuses a finished build."""
    if is_built(out) and not force:
        info: dict[str, object] = json.loads((out / MARKER).read_text())
        return info
    if out.exists() and not out.is_dir():
        raise DisaggError(f"{out} exists and is not a folder")
    try:
        # Typed as Any: these libraries' stubs are partial and not worth fighting for a build script.
        torch: Any = importlib.import_module("torch")
        tk: Any = importlib.import_module("tokenizers")
        tf: Any = importlib.import_module("transformers")
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DisaggError(
            f"demo-model needs torch, transformers and tokenizers (installed with vllm): {e}; "
            "run scripts/bootstrap.sh first"
        ) from e

    Tokenizer, models, trainers = tk.Tokenizer, tk.models, tk.trainers
    pre_tokenizers, decoders, processors = tk.pre_tokenizers, tk.decoders, tk.processors
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    hf_tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|pad|>",
        model_max_length=2048,
    )
    hf_tok.chat_template = _CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out))

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        bos_token_id=bos,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    info = {
        "version": VERSION,
        "vocab_size": len(hf_tok),
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": 2,
        "hidden_size": 128,
    }
    # Written last: its presence means the build finished.
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return info
