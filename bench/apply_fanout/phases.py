"""Where one disaggctl apply spends its time: per phase, per host (run.py prints the summary).

`Recorder.instrument()` wraps the systemd backend's own functions (module attributes, so the
backend's calls go through the wrappers; nothing in disaggctl changes) and records, per call,
(phase, host, start, end) in seconds since the process's interpreter started (the parent passes
its clock in BENCH_T0). Phases, in order:

    interp    interpreter start-up until dctl_once.py's first line
    import    importing disaggctl (pydantic, paramiko, jinja2, rich, the spec models)
    setup     spec + hand-built DesiredState until apply() is called
    connect   per host: SSH connect + key exchange + auth (background, overlaps render/observe)
    render    units and files for every host (while the connections come up)
    observe   per host: the observe command (files' sha256/mode, unit states)
    peek      a no-op's read-only look at the deployment lock (one command on the lock host, sent
              after every observation answered, while the plan is made)
    plan      diff + printing the plan
    lock      taking the deployment lock on the lock host (one command; a changing apply only)
    files     per host: pending manifest, uploads, reload, enable, start of decode (one command)
    health    /health of every started instance (the gate), liveness checks
    manifest  per host: the final manifest
    unlock    releasing the deployment lock (one command)
    exit      after apply() returns: closing connections, interpreter exit (parent's clock)
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PHASES = [
    "interp", "import", "setup", "connect", "render", "observe", "peek", "plan", "lock", "files", "health", "manifest",
    "unlock", "exit",
]  # fmt: skip
PER_HOST = {"connect", "observe", "files", "manifest"}

Span = tuple[str, str, float, float]  # phase, host ("" for the whole run), start, end (s since T0)


class Recorder:
    def __init__(self, t_main: float, t_imported: float) -> None:
        self.t0 = float(os.environ.get("BENCH_T0", t_main))
        self.spans: list[Span] = [
            ("interp", "", 0.0, t_main - self.t0),
            ("import", "", t_main - self.t0, t_imported - self.t0),
        ]
        self.t_imported = t_imported
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.time() - self.t0

    def add(self, phase: str, host: str, start: float) -> None:
        with self.lock:
            self.spans.append((phase, host, start, self.now()))

    def wrap(self, obj: Any, name: str, phase: str, host_of: Callable[..., str]) -> None:
        fn = getattr(obj, name)

        def wrapped(*a: Any, **kw: Any) -> Any:
            start = self.now()
            try:
                return fn(*a, **kw)
            finally:
                self.add(phase, host_of(*a, **kw), start)

        setattr(obj, name, wrapped)

    def instrument(self) -> None:
        from disaggctl.targets.systemd import backend as b

        self.spans.append(("setup", "", self.t_imported - self.t0, self.now()))
        whole = lambda *a, **kw: ""  # noqa: E731
        self.wrap(b, "connect", "connect", lambda target, *a, **kw: target.name)
        b.SystemdBackend.connector = staticmethod(vars(b)["connect"])  # the wrapped one
        self.wrap(b, "build_context", "render", whole)
        self.wrap(b, "observe", "observe", lambda conn, *a, **kw: conn.name)
        self.wrap(b, "compute_plan", "plan", whole)
        self.wrap(b, "push_files", "files", lambda conn, *a, **kw: conn.name)
        self.wrap(b.SystemdBackend, "_wait", "health", whole)
        self.wrap(b, "write_manifest", "manifest", lambda conn, *a, **kw: conn.name)
        from disaggctl import hostlock

        self.wrap(hostlock, "take", "lock", whole)
        from disaggctl.targets.systemd import access

        self.wrap(access, "peek", "peek", whole)
        self.wrap(hostlock, "release", "unlock", whole)
        from disaggctl.targets.systemd import ui

        self.wrap(ui, "print_plan", "plan", whole)

    def write(self, path: Path) -> None:
        end = self.now()
        path.write_text(json.dumps({"spans": self.spans, "apply_end": end}))


def summarize(runs: list[dict[str, Any]], total: list[float]) -> list[str]:
    """Per phase, medians over runs: its wall span (first start to last end) and, for per-host
    phases, the median and slowest host's own duration. `total`: the parent's wall times."""
    rows: dict[str, dict[str, list[float]]] = {p: {"span": [], "start": [], "med": [], "max": []} for p in PHASES}
    for run, tot in zip(runs, total, strict=True):
        by: dict[str, list[Span]] = {}
        for sp in run["spans"]:
            by.setdefault(sp[0], []).append((sp[0], sp[1], sp[2], sp[3]))
        by["exit"] = [("exit", "", run["apply_end"], tot)]
        for phase, sps in by.items():
            if phase not in rows:
                continue
            lo, hi = min(s[2] for s in sps), max(s[3] for s in sps)
            r = rows[phase]
            r["span"].append(hi - lo)
            r["start"].append(lo)
            if phase in PER_HOST:
                per_host: dict[str, float] = {}
                for s in sps:
                    per_host[s[1]] = per_host.get(s[1], 0.0) + s[3] - s[2]
                r["med"].append(statistics.median(per_host.values()))
                r["max"].append(max(per_host.values()))
    out = [f"  {'phase':<9} {'starts':>7} {'wall':>7} {'host med':>9} {'host max':>9}   (s, medians over runs)"]
    for phase in PHASES:
        r = rows[phase]
        if r["span"]:
            cols = [statistics.median(r[k]) if r[k] else None for k in ("start", "span", "med", "max")]
            out.append(
                f"  {phase:<9} "
                + " ".join(
                    f"{c:>{w}.3f}" if c is not None else " " * w for c, w in zip(cols, (7, 7, 9, 9), strict=True)
                )
            )
    return out
