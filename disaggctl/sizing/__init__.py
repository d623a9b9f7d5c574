"""The sizing planner behind `disaggctl size`.

- `hardware`: GPU numbers read from the hardware profiles (profiles/*.yaml), never typed twice.
- `perf`: the explicit performance model (roofline step times, KV transfer, memory fit).
- `search`: candidate layouts (aggregated or xPyD with TP/PP/DP per role), SLA filter, Pareto front.
- `calibrate`: efficiency factors fitted from measured benchmark results, stored per cluster.
- `fragment`: the recommendation written as a spec that `disaggctl validate` accepts.

docs/sizing.md gives every formula; keep it in step with `perf`.
"""
