#!/bin/bash
# disaggctl launcher: decode-0 (decode) on node slot slot2. Written by the batch job; run by srun.
set -euo pipefail
# Placement chose GPUs 0,1,2,3 of this slot; Slurm bound the component's GPUs to the step (all of them,
# the step asks for none): pick those positions from what Slurm gave, so the indices follow Slurm's binding.
dctl_bound=${CUDA_VISIBLE_DEVICES:-}
if [ -n "$dctl_bound" ]; then
  IFS=, read -r -a dctl_all <<< "$dctl_bound"
  dctl_want=(0 1 2 3)
  dctl_pick=()
  for i in "${dctl_want[@]}"; do
    if [ "$i" -ge "${#dctl_all[@]}" ]; then
      echo "disaggctl: decode-0: GPU $i of the slot is not among those Slurm bound ($dctl_bound)" >&2
      exit 97
    fi
    dctl_pick+=("${dctl_all[$i]}")
  done
  CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${dctl_pick[*]}")
else
  CUDA_VISIBLE_DEVICES=0,1,2,3
fi
export CUDA_VISIBLE_DEVICES
export PYTHONHASHSEED=0
export VLLM_NIXL_SIDE_CHANNEL_HOST="${DCTL_ADDR_0}"
export VLLM_NIXL_SIDE_CHANNEL_PORT=5600
export UCX_TLS=rc,cuda_copy
# shellcheck disable=SC2088  # every argument is passed byte for byte, a leading ~ included
exec vllm serve /lustre/models/Llama-3.1-70B-Instruct-FP8 --host "${DCTL_ADDR_0}" --port 8100 --enable-prompt-tokens-details --served-model-name llama-3.1-70b --tensor-parallel-size 4 --max-model-len 16384 --quantization fp8 --max-num-batched-tokens 1024 --max-num-seqs 512 --kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_consumer","kv_buffer_device":"cuda","kv_connector_extra_config":{"backends":["UCX"]}}'
