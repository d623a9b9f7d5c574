#!/bin/bash
# Heterogeneous-TP P/D on real GPUs, for the day a GPU machine is lent (this repository's CI has none).
#
# Needs: >= 3 NVIDIA GPUs on this machine, CUDA vLLM 0.32.0 + nixl in .venv (or VLLM_BIN), a
# model with 2 KV heads reachable offline (default Qwen/Qwen2.5-0.5B-Instruct: 14 heads, 2 KV heads,
# in the Hugging Face cache, or MODEL=/path).
# Runs through disaggctl itself (local target): for each layout it validates, applies (the canary
# must see KV arrive at decode: vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}),
# prints the Transfer plan vLLM logged, and destroys. Then it checks that the layout vLLM refuses
# (prefill TP 4 > decode TP 1 with only 2 KV heads: replicated heads) is refused by `validate`.
#   scripts/gpu_hetero_tp_check.sh            # prefill TP 2 -> decode TP 1, then TP 1 -> TP 2
set -u
cd "$(dirname "$0")/.."
DCTL=${DCTL:-$PWD/.venv/bin/disaggctl}
VLLM_BIN=${VLLM_BIN:-$PWD/.venv/bin/vllm}
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
OUT=${OUT:-/tmp/dctl-gpu-hetero}
GPUS=$(nvidia-smi -L | wc -l)
[ "$GPUS" -ge 3 ] || { echo "need >= 3 GPUs, found $GPUS"; exit 1; }
mkdir -p "$OUT"

spec() {  # NAME PREFILL_TP DECODE_TP
  cat >"$OUT/$1.yaml" <<EOF
name: $1
model: {path: $MODEL, max_model_len: 4096, architecture: {layers: 24, hidden_size: 896, attention_heads: 14,
        kv_heads: 2, head_dim: 64, params_b: 0.5}}
hosts: [{name: localhost, address: 127.0.0.1, gpus: $GPUS}]
prefill: {tensor_parallel: $2, gpu_memory_utilization: 0.5}
decode: {tensor_parallel: $3, gpu_memory_utilization: 0.5}
kv_transfer: {kind: nixl, kv_lease_s: 120}
router: {port: 8000, bind: 127.0.0.1, local_prefill_threshold: 0}
engine: {host_bind: 127.0.0.1}
target: {kind: local, vllm_bin: $VLLM_BIN, state_dir: $OUT/state-$1}
EOF
  echo "$OUT/$1.yaml"
}

fail=0
for layout in "p2d1 2 1" "p1d2 1 2"; do
  set -- $layout
  f=$(spec "$1" "$2" "$3")
  echo "== $1: prefill TP $2 -> decode TP $3"
  "$DCTL" validate "$f" && "$DCTL" plan --offline "$f" | grep -A3 "KV transfer" || fail=1
  if timeout 900 "$DCTL" apply "$f" -y; then
    echo "$1: OK (canary saw KV transferred)"
  else
    echo "$1: FAILED"; fail=1
  fi
  grep -rh "Transfer plan\|compatibility check passed\|hash mismatch" "$OUT/state-$1" 2>/dev/null | head -4
  "$DCTL" destroy "$f" -y >/dev/null 2>&1
done

f=$(spec p4d1 4 1)
if "$DCTL" validate "$f" 2>"$OUT/p4d1.err"; then
  echo "p4d1: validate accepted a pair vLLM refuses"; fail=1
else
  grep -q "replicates the model's 2 KV heads" "$OUT/p4d1.err" && echo "p4d1: refused as vLLM would" || fail=1
fi
exit $fail
