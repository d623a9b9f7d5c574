"""The `disaggctl` command line. The one error boundary: user errors print without a traceback."""

from __future__ import annotations

import atexit
import gc
import importlib
import sys

import typer

from disaggctl import __version__

# At exit, the collector's last passes walk every object the imports made (pydantic schemas,
# paramiko, jinja2): ~0.15 s of a no-op apply. Frozen objects are skipped; atexit handlers and
# the flush of stdout/stderr still run (registered first, so this runs after every other handler).
atexit.register(gc.freeze)

app = typer.Typer(
    name="disaggctl",
    help="Deploy disaggregated prefill/decode vLLM serving on your own GPU clusters from one spec.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain (click) help and usage errors: typer's rich formatter imports rich, markdown-it and
    # rich.traceback (~80 ms) and renders panels (~60 ms of CPU), 2.5x a bare `import typer`
    # (bench/cli_start); the help texts carry no markup
    rich_markup_mode=None,
)

# Command groups register themselves; each module imports only typer and the standard library.
COMMAND_MODULES = ["core", "probe", "size", "demo", "router"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"disaggctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """disaggctl: one cluster spec -> prefill, decode and router processes on systemd, Slurm or this machine."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"disaggctl.commands.{_name}").register(app)


def main() -> None:
    from disaggctl.errors import DisaggError, SpecError

    try:
        app()
    except SpecError as e:
        n = len(e.issues)
        where = f" in {e.file}" if e.file else ""
        sys.stderr.write(f"error: {n} problem{'s' if n != 1 else ''}{where}; nothing was changed\n{e}\n")
        sys.exit(e.exit_code)
    except DisaggError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
