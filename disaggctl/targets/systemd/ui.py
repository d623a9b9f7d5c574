"""The systemd plan on a terminal: Terraform-style per host, with symbols, reasons and optional diffs.

(Progress of apply is the shared disaggctl.targets.ui.Phases; status is disaggctl.targets.status.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from disaggctl.targets.base import Action
from disaggctl.targets.systemd.changes import Plan

if TYPE_CHECKING:
    from rich.console import Console

SYMBOL = {
    Action.CREATE: ("+", "green"),
    Action.UPDATE: ("~", "yellow"),
    Action.RESTART: ("↻", "cyan"),
    Action.DELETE: ("-", "red"),
    Action.UNCHANGED: ("=", "dim"),
}


class _Lines:
    """Markup lines printed in as few console.print calls as possible (one per run of lines with
    the same highlighting): a print costs ~0.3 ms of rich's pipeline, a 32-host plan has ~200 lines."""

    def __init__(self) -> None:
        self.runs: list[tuple[bool, list[str]]] = []

    def add(self, markup: str, highlight: bool = True) -> None:
        if self.runs and self.runs[-1][0] == highlight:
            self.runs[-1][1].append(markup)
        else:
            self.runs.append((highlight, [markup]))

    def print(self, console: Console) -> None:
        for highlight, lines in self.runs:
            console.print("\n".join(lines), highlight=highlight)


def _line(out: _Lines, action: Action, what: str, reason: str = "") -> None:
    from rich.markup import escape

    sym, style = SYMBOL[action]
    tail = f"  [dim]({escape(reason)})[/dim]" if reason else ""
    out.add(f"  [{style}]{sym} {action.value:<9}[/{style}] {escape(what)}{tail}", highlight=False)


def print_plan(console: Console, plan: Plan, diffs: Mapping[tuple[str, str], str] | None = None) -> None:
    """The plan, host by host. diffs: (host, path) -> unified diff (secrets are never diffed)."""
    from rich.markup import escape

    out = _Lines()
    for h in plan.hosts:
        if h.error:
            out.add(f"[bold]{escape(h.host)}[/bold]  [red]cannot plan: {escape(h.error)}[/red]")
            continue
        out.add(f"[bold]{escape(h.host)}[/bold]")
        unchanged = 0
        for f in h.files:
            if f.action is Action.UNCHANGED:
                unchanged += 1
                continue
            _line(out, f.action, f.path, ("secret, content hidden; " if f.secret else "") + f.reason)
            d = (diffs or {}).get((h.host, f.path))
            if d and not f.secret:
                for dl in d.splitlines():
                    style = "green" if dl.startswith("+") else "red" if dl.startswith("-") else "dim"
                    out.add(f"      [{style}]{escape(dl)}[/{style}]", highlight=False)
        for u in h.units:
            if u.action is Action.UNCHANGED:
                unchanged += 1
                continue
            _line(out, u.action, u.unit, u.reason)
        if unchanged:
            out.add(f"  [dim]= {unchanged} unchanged[/dim]")
    c = plan.counts()
    if not plan.changed:
        out.add("[green]No changes.[/green] The hosts match the spec.")
    else:
        out.add(
            f"Plan: {c['create']} to create, {c['update']} to update, {c['restart']} to restart, "
            f"{c['delete']} to delete."
        )
    out.print(console)
