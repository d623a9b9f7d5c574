"""`disaggctl router serve --config FILE`: run the builtin P/D router in the foreground."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    router = typer.Typer(help="The builtin prefill/decode router.", no_args_is_help=True)

    @router.command("serve")
    def serve(
        config: str = typer.Option(..., "--config", help="Router JSON (router.json, written by compile)."),
        log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
    ) -> None:
        """Serve OpenAI completions through prefill and decode instances (same as `python -m disaggctl.router`)."""
        from disaggctl.router.__main__ import main

        code = main(["--config", config, "--log-level", log_level.upper()])
        if code:
            raise typer.Exit(code)

    app.add_typer(router, name="router")
