"""The `disaggctl` command line. The one error boundary: user errors print without a traceback.

Bad input (a `SpecError`, exit 2) prints its first problem on the first line, located
(`error: spec.yaml:3:5 hosts[0].address: ...`), then the others and "nothing was changed".
Any other exception is a bug in disaggctl: one line "internal error" with where to report it;
`--debug` (or DISAGGCTL_DEBUG=1) prints the traceback instead.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys
import traceback
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from disaggctl import __version__

if TYPE_CHECKING:
    from typer.models import CommandInfo

    from disaggctl.errors import SpecError

# At exit, the collector's last passes walk every object the imports made (pydantic schemas,
# paramiko, jinja2): ~0.15 s of a no-op apply. Frozen objects are skipped; atexit handlers and
# the flush of stdout/stderr still run (registered first, so this runs after every other handler).
atexit.register(gc.freeze)

# Command groups register themselves; each module imports only typer and the standard library.
COMMAND_MODULES = ["core", "probe", "size", "demo", "router"]
# The module that registers each top-level command (tests/test_cli_start.py keeps this true).
COMMAND_OWNERS = {
    **dict.fromkeys(["validate", "schema", "render", "plan", "apply", "status", "destroy", "logs"], "core"),
    "probe": "probe",
    "topology": "probe",
    "size": "size",
    "demo-model": "demo",
    "router": "router",
}
# Root options that may come before the command name (flags: they take no value).
ROOT_FLAGS = {"--debug"}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"disaggctl {__version__}")
        raise typer.Exit()


REPORT_URL = "https://github.com/disaggctl/disaggctl/issues"
_debug = {"on": False}


def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Print the traceback of an internal error."),
) -> None:
    """disaggctl: one cluster spec -> prefill, decode and router processes on systemd, Slurm or this machine."""
    _debug["on"] = debug


def _new_app() -> typer.Typer:
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
    app.callback()(_root)
    return app


def _command_name(info: CommandInfo) -> str:
    if info.name:
        return info.name
    assert info.callback is not None
    return info.callback.__name__.replace("_", "-")


@cache
def full_app() -> typer.Typer:
    """Every command: `disaggctl --help`, usage errors and tests (`cli.app`)."""
    app = _new_app()
    for name in COMMAND_MODULES:
        importlib.import_module(f"disaggctl.commands.{name}").register(app)
    return app


@cache
def command_app(command: str) -> typer.Typer:
    """The root options and the one command `command`: its module only is imported, and typer builds
    the click command of that command only. Its help, parsing and errors are the full app's."""
    app = _new_app()
    importlib.import_module(f"disaggctl.commands.{COMMAND_OWNERS[command]}").register(app)
    app.registered_commands = [c for c in app.registered_commands if _command_name(c) == command]
    app.registered_groups = [g for g in app.registered_groups if g.name == command]
    return app


def command_of(argv: list[str]) -> str | None:
    """The command argv (without the program name) runs, when it names one after root flags only."""
    for arg in argv:
        if arg not in ROOT_FLAGS:
            return arg if arg in COMMAND_OWNERS else None
    return None


def app_for(argv: list[str]) -> typer.Typer:
    """The app that runs argv: one command's app when argv names a known command, else the full
    app (no arguments, --help, --version, an unknown command: the same help and usage errors)."""
    command = command_of(argv)
    return full_app() if command is None else command_app(command)


def __getattr__(name: str) -> typer.Typer:
    """`cli.app`: the full app, built on first use (the console script builds only what it runs)."""
    if name == "app":
        return full_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def format_spec_error(e: SpecError) -> str:
    """The first problem on the first line, located; the rest below it."""
    n = len(e.issues)
    where = f" in {e.file}" if e.file else ""
    text = str(e)
    if not text:
        return f"error: invalid input{where}; nothing was changed\n"
    return f"error: {text}\n{n} problem{'s' if n != 1 else ''}{where}; nothing was changed\n"


def _debugging() -> bool:
    return _debug["on"] or "--debug" in sys.argv[1:] or os.environ.get("DISAGGCTL_DEBUG", "") not in ("", "0")


def _internal(e: BaseException) -> None:
    if _debugging():
        traceback.print_exception(e)
    else:
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
        first = (str(e).splitlines() or [""])[0][:200]
        sys.stderr.write(
            f"internal error (a bug in disaggctl {__version__}): {type(e).__name__}{at}: {first}; "
            f"nothing more was done. Please report it at {REPORT_URL} with the output of the same command "
            "run with --debug\n"
        )
    sys.exit(70)


def main(one_shot: bool = True) -> None:
    """The `disaggctl` command. one_shot: the process ends after this command (the console script);
    tests that call main() in-process pass False (disaggctl/gcpause.py)."""
    from disaggctl.errors import DisaggError, SpecError

    argv = sys.argv[1:]
    command = command_of(argv)
    if one_shot:
        from disaggctl.gcpause import one_shot_process, parse_without_gc

        one_shot_process()
        if command is not None:  # a command's options are coerced through pydantic; help is not
            from disaggctl.distinfo import no_pydantic_plugins

            parse_without_gc(command, argv)
            no_pydantic_plugins()  # none declared: skip pydantic's entry-point scan (distinfo.py)
    try:
        app_for(argv)()
    except SpecError as e:
        sys.stderr.write(format_spec_error(e))
        sys.exit(e.exit_code)
    except DisaggError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as e:  # the boundary: a bug in disaggctl, never a user's input
        _internal(e)


if __name__ == "__main__":
    main()
