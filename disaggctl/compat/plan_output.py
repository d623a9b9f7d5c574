"""What `plan` shows about P/D compatibility: one JSON fragment and a few text lines."""

from __future__ import annotations

from typing import Any

from disaggctl.deployment import DesiredState


def plan_fragment(desired: DesiredState) -> dict[str, Any] | None:
    """The `"compat"` entry of `plan --output json`: fingerprints and the KV transfer plan."""
    return desired.compat.model_dump(mode="json") if desired.compat else None


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def plan_rows(desired: DesiredState) -> list[str]:
    """Plain text lines for the text plan (no markup)."""
    report = desired.compat
    if report is None:
        return []
    out: list[str] = []
    prints = sorted({(f.role, f.fingerprint) for f in report.fingerprints})
    out.append("compat fingerprints: " + ", ".join(f"{role} {h}" for role, h in prints))
    t = report.transfer
    if t is None:
        return out
    reads = "; ".join(f"D{r}<-P{','.join(map(str, src))}" for r, src in t.reads.items())
    out.append(f"KV transfer: prefill TP {t.prefill_tp} -> decode TP {t.decode_tp} (tp_ratio {t.tp_ratio}): {reads}")
    if t.kv_bytes_per_token and t.typical_prompt_bytes:
        out.append(
            f"KV per token {_size(t.kv_bytes_per_token)}; a {t.typical_prompt_tokens}-token prompt "
            f"moves {_size(t.typical_prompt_bytes)}"
        )
    for link in t.links:
        speed = f"{link.gb_per_s:g} GB/s per GPU" if link.gb_per_s else "bandwidth unknown"
        time = f", ~{link.transfer_ms:.2f} ms per typical prompt" if link.transfer_ms is not None else ""
        out.append(f"  {link.kind}: {link.pairs} P/D pair(s), {speed}{time} (e.g. {' -> '.join(link.example)})")
    return out
