"""disaggctl: deploy disaggregated prefill/decode vLLM serving on your own GPU clusters."""

__version__ = "0.1.0"
