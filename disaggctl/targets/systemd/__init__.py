"""The systemd target: units on hosts reached over SSH.

backend    the Backend: observe hosts, plan, push, start in phases, status, destroy, logs
changes    observed host state -> per-host plan of file and unit actions (pure)
manifest   the per-deployment manifest kept on each host (what disaggctl owns there)
ui         the per-host plan printer
"""
