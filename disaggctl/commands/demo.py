"""`disaggctl demo-model DIR`: build the tiny offline model the local CPU demo serves."""

from __future__ import annotations

import time

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo-model")
    def demo_model(
        out: str = typer.Argument(..., help="Folder to write the model to (created; reused when already built)."),
        force: bool = typer.Option(False, "--force", help="Rebuild even when DIR already holds the model."),
    ) -> None:
        """Build a tiny random-weight Llama and a BPE tokenizer offline (no download, ~10 s)."""
        from pathlib import Path

        from disaggctl import demo_model as dm

        path = Path(out).expanduser().resolve()
        reused = dm.is_built(path) and not force
        t0 = time.monotonic()
        info = dm.build(path, force=force)
        verb = "already built" if reused else f"built in {time.monotonic() - t0:.1f} s"
        typer.echo(f"{path}: {verb} (vocab {info['vocab_size']}, {info['parameters']} parameters)")
