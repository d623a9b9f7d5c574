"""The local target: the deployment's processes on this machine under disaggctl's supervisor.

backend      the Backend: diff the process table, write files, start or SIGHUP the supervisor
supervisor   `python -m disaggctl.targets.local.supervisor STATE_DIR` (standard library only)

This package imports nothing at import time: the supervisor runs without rich/typer/paramiko.
"""
