"""P/D compatibility for the pinned vLLM 0.32 and LMCache 0.5.6, in one place.

- `nixl`: which prefill/decode shapes vLLM's NixlConnector accepts (TP ratio, replicated KV,
  PP, block sizes), each rule naming its vLLM source;
- `fingerprint`: what vLLM's NIXL compatibility hash covers, plus what it leaves out,
  computed from a compiled process (a pure function of the compiled config);
- `spec_rules`: those rules applied to a spec, as located issues;
- `transfer`: the KV transfer plan shown by `plan` (TP ratio, ranks read, bytes, link, time).

See docs/compat.md.
"""
