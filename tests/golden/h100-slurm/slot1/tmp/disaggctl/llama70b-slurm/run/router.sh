#!/bin/bash
# disaggctl launcher: router (router) on node slot slot1. Written by the batch job; run by srun.
set -euo pipefail
export PYTHONHASHSEED=0
# shellcheck disable=SC2088  # every argument is passed byte for byte, a leading ~ included
exec python3 -m disaggctl.router --config /tmp/disaggctl/llama70b-slurm/router.json
