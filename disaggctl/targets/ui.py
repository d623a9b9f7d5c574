"""Progress of apply on a terminal, shared by every target.

Phases   per host (or per job, or `local`) and phase progress with elapsed times: live on a TTY,
         one line per finished step otherwise (logs and tests read those lines)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class _Step:
    host: str
    phase: str
    start: float
    task: Any = None


class Phases:
    """Progress of per-host phases with elapsed times; thread safe (hosts run in threads)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._progress: Any = None
        if console.is_terminal:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
            )

    def __enter__(self) -> Phases:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextmanager
    def step(self, host: str, phase: str) -> Iterator[None]:
        s = _Step(host, phase, time.monotonic())
        if self._progress is not None:
            with self._lock:
                s.task = self._progress.add_task(f"{host:<16} {phase}", total=None)
        ok = False
        try:
            yield
            ok = True
        finally:
            self._finish(s, ok)

    def _finish(self, s: _Step, ok: bool) -> None:
        from rich.markup import escape

        took = time.monotonic() - s.start
        mark = "[green]ok[/green]" if ok else "[red]FAILED[/red]"
        with self._lock:
            if self._progress is not None and s.task is not None:
                self._progress.remove_task(s.task)
            self.console.print(
                f"[dim]{time.monotonic() - self.t0:6.1f}s[/dim] {escape(s.host):<16} {escape(s.phase):<22} "
                f"{mark} [dim]{took:.2f}s[/dim]",
                highlight=False,
            )

    def note(self, text: str) -> None:
        from rich.markup import escape

        with self._lock:
            self.console.print(f"[dim]{time.monotonic() - self.t0:6.1f}s[/dim] {escape(text)}", highlight=False)
