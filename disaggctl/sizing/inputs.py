"""Checked inputs of `disaggctl size`: the model, GPU inventories, the request's length.

Every problem is a SizingInputError (exit 2) that names the option or the file and key.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from disaggctl.sizing.errors import SizingInputError
from disaggctl.sizing.hardware import PROFILE_OF
from disaggctl.sizing.perf import MAX_CONTEXT, ModelInfo

_GPU_COUNT = re.compile(r"^\s*(?:(\d+)\s*[x*]\s*)?([a-z0-9-]+)\s*$", re.IGNORECASE)
# config.json keys that must be positive integers when present (text_config for multimodal models)
_POSITIVE_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "head_dim",
                  "vocab_size", "intermediate_size", "max_position_embeddings")
_REQUIRED_KEYS = ("hidden_size", "num_attention_heads", "num_hidden_layers")


def parse_gpu_count(text: str, option: str) -> tuple[str, int | None]:
    """`b200` or `8xb200` -> ("b200", 8); the count is None when not given."""
    m = _GPU_COUNT.match(text)
    key = m.group(2).lower() if m else ""
    if not m or key not in PROFILE_OF:
        raise SizingInputError(f"{option} {text!r}: expected a GPU type ({' '.join(PROFILE_OF)}) "
                               "optionally with a count, e.g. 8xb200")
    count = int(m.group(1)) if m.group(1) else None
    if count is not None and count < 1:
        raise SizingInputError(f"{option} {text!r}: the GPU count must be at least 1")
    return key, count


def parse_inventory(text: str) -> list[tuple[str, int]]:
    """`8xb200,16xh200` -> [("b200", 8), ("h200", 16)]: at most two GPU types, each with a count."""
    out: list[tuple[str, int]] = []
    for part in (p for p in text.split(",") if p.strip()):
        key, count = parse_gpu_count(part, "--inventory")
        if count is None:
            raise SizingInputError(f"--inventory {part.strip()!r}: give a count, e.g. 8x{key}")
        if any(k == key for k, _ in out):
            raise SizingInputError(f"--inventory: {key} is listed twice; give one count per GPU type")
        out.append((key, count))
    if not 1 <= len(out) <= 2:
        raise SizingInputError("--inventory: give one or two GPU types, e.g. 8xb200,16xh200")
    return out


def _config_error(path: Path, key: str, msg: str) -> SizingInputError:
    return SizingInputError(f"{path}: {key}: {msg}\n    hint: --model takes a Hugging Face config.json "
                            "(or a folder holding one) or a catalog name such as llama-3.1-70b")


def _check_config(path: Path, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _config_error(path, "(top level)", "must be a JSON object")
    cfg = data.get("text_config", data)
    if not isinstance(cfg, dict):
        raise _config_error(path, "text_config", "must be a JSON object")
    for key in _REQUIRED_KEYS:
        if key not in cfg:
            raise _config_error(path, key, "is missing")
    for key in _POSITIVE_KEYS:
        v = cfg.get(key)
        if v is None and key not in _REQUIRED_KEYS:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _config_error(path, key, f"must be a positive integer (got {json.dumps(v)})")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    if heads % kv:
        raise _config_error(path, "num_key_value_heads", f"{kv} does not divide num_attention_heads {heads}")
    return cfg


def load_config_model(p: Path, name: str) -> ModelInfo:
    from pydantic import ValidationError

    from disaggctl.catalog import from_hf_config, lookup

    file = p / "config.json" if p.is_dir() else p
    try:
        data = json.loads(file.read_text())
    except OSError as e:
        raise SizingInputError(f"--model {name}: cannot read {file}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SizingInputError(f"{file}: not JSON ({e})") from None
    cfg = _check_config(file, data)
    try:
        arch = from_hf_config(data)
    except (ValueError, KeyError, TypeError, ZeroDivisionError, ValidationError) as e:
        raise _config_error(file, "(model)", f"not a usable transformer config ({str(e).splitlines()[0]})") from None
    entry = lookup(name)
    folder = p.parent if p.is_file() else p
    return ModelInfo(name=str(folder), path=str(folder), arch=arch, catalog=entry.key if entry else None,
                     max_context=cfg.get("max_position_embeddings"))


def load_model(name: str) -> ModelInfo:
    from disaggctl.catalog import CATALOG, lookup

    p = Path(name).expanduser()
    if p.exists():
        return load_config_model(p, name)
    entry = lookup(name)
    if entry is None:
        raise SizingInputError(
            f"--model {name!r} is not in the built-in catalog and is not a config.json path; "
            f"known: {', '.join(sorted(CATALOG))}"
        )
    return ModelInfo(name=entry.key, path=entry.hub_id, arch=entry.architecture, catalog=entry.key,
                     max_context=MAX_CONTEXT.get(entry.key))


def check_context(model: ModelInfo, isl: int, osl: int) -> None:
    """Refuse a request longer than the model's context (max_position_embeddings)."""
    if model.max_context is not None and isl + osl > model.max_context:
        raise SizingInputError(
            f"--isl {isl} + --osl {osl} = {isl + osl} tokens exceeds {model.name}'s context of "
            f"{model.max_context} tokens (max_position_embeddings)"
        )


def finite_positive(value: Any, where: str, integer: bool = False) -> float:
    """`value` as a finite positive number (an integer when asked), else a located SizingInputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SizingInputError(f"{where}: must be a number (got {json.dumps(value)})")
    try:
        x = float(value)
    except OverflowError:  # an integer beyond any float
        raise SizingInputError(f"{where}: must be finite and > 0 (got a {len(str(value))}-digit number)") from None
    if not math.isfinite(x) or x <= 0:
        raise SizingInputError(f"{where}: must be finite and > 0 (got {value!r})")
    if integer and not x.is_integer():
        raise SizingInputError(f"{where}: must be a whole number (got {value!r})")
    return x
