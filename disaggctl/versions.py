"""The one place where the versions disaggctl compiles for are pinned."""

VLLM_VERSION = "0.32.0"
LMCACHE_VERSION = "0.5.6"
VLLM_ROUTER_VERSION = "0.1.17"
# Oldest NVIDIA driver branch that supports Blackwell (R570).
MIN_BLACKWELL_DRIVER_MAJOR = 570
