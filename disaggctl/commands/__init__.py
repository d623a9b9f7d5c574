"""CLI command groups. Each module has `register(app)`; it imports only typer and the standard
library at module level so `disaggctl --help` stays fast; real work is imported inside commands."""
