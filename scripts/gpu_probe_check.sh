#!/usr/bin/env bash
# Real-GPU check of the probe agent (issue 3, item 7). Run from the repository root on a machine
# with an NVIDIA GPU and a python3 that has nvidia-ml-py (the lent device image has both):
#   OUT=/tmp/probe scripts/gpu_probe_check.sh
# Writes: nvml.json (agent through real NVML), smi.json (the nvidia-smi fallback), the raw
# nvidia-smi captures, and check.txt (the two JSONs compared). Installs nothing.
set -u
OUT=${OUT:-/tmp/gpu-probe}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi -q -x >"$OUT/nvidia-smi-q-x.xml" 2>&1
nvidia-smi topo -m >"$OUT/topo-m.txt" 2>&1
nvidia-smi nvlink --status >"$OUT/nvlink-status.txt" 2>&1
"$PY" -c 'import pynvml; print("nvidia-ml-py", getattr(pynvml, "__version__", "?"))' >"$OUT/pynvml.txt" 2>&1
# the agent's modules use only the standard library; run them from the checkout
PYTHONPATH=. "$PY" -m disaggctl.probe.agent --mode nvml >"$OUT/nvml.json" 2>"$OUT/nvml.err"
PYTHONPATH=. "$PY" -m disaggctl.probe.agent --mode smi >"$OUT/smi.json" 2>"$OUT/smi.err"
"$PY" - "$OUT" >"$OUT/check.txt" 2>&1 <<'PYEOF'
import json, sys
out = sys.argv[1]
a, b = (json.load(open(f"{out}/{n}.json")) for n in ("nvml", "smi"))
print("nvml:", len(a["gpus"]), "GPU, driver", a.get("driver_version"), "warnings", a.get("warnings"))
print("smi: ", len(b["gpus"]), "GPU, driver", b.get("driver_version"), "warnings", b.get("warnings"))
keys = ("uuid", "name", "architecture", "compute_capability", "memory_total_mib", "pci_bus_id", "numa_node",
        "cpu_affinity", "mig_enabled", "fabric_state", "clique_id", "nvlink_peers")
for ga, gb in zip(a["gpus"], b["gpus"]):
    for k in keys:
        flag = "" if ga.get(k) == gb.get(k) else "   <-- differs"
        print(f"GPU{ga['index']} {k}: nvml={ga.get(k)!r} smi={gb.get(k)!r}{flag}")
PYEOF
cat "$OUT/check.txt"
