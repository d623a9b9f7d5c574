"""Pause the cyclic garbage collector while a spec is loaded, compiled and rendered.

Loading and compiling 9216 GPUs makes about a million objects that all live on (the plan), and
no garbage cycles worth collecting: the collector's generation passes re-scan that growing heap
and cost 0.15-0.25 s of CPU at 128 racks (measured: plan --offline --output json 0.88 -> 0.65 s
CPU), super-linear in racks. Reference counting still frees everything as usual; the collector
is switched back on (as it was) when the block ends, so a long-running caller keeps its own.

The one-shot commands (validate, plan --offline, render), run as the `disaggctl` process
(`cli.main`), switch it off before their command line is parsed (`parse_without_gc`) and leave
it off: switched back on, the collector's first pass walks that million-object heap once more
(~20-30 ms at 128 racks) right before the process exits; `cli` freezes the heap at exit instead.
Anything else (apply, logs --follow, the router, tests calling the commands in-process) gets its
collector back.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_state = {"one_shot": False}


def one_shot_process() -> None:
    """This process ends after its one command (the `disaggctl` console script)."""
    _state["one_shot"] = True


# The commands whose one-shot process leaves the collector off at its end anyway.
COLLECTOR_OFF = {"validate", "render", "schema"}


def parse_without_gc(command: str, argv: list[str]) -> None:
    """The one-shot process of validate, render, plan --offline or schema runs without the collector
    from the start: while typer parses its command line (importing pydantic, an adapter per option,
    ~1.5% of a `validate`'s instructions) and then its body. Any other command keeps it."""
    if command in COLLECTOR_OFF or (command == "plan" and "--offline" in argv):
        gc.disable()


@contextmanager
def no_cyclic_gc(last: bool = False) -> Iterator[None]:
    """last: the command's final step; in a one-shot process the collector stays off after it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled and not (last and _state["one_shot"]):
            gc.enable()
