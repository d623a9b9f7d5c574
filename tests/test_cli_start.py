"""The start-up shortcuts of the `disaggctl` process (issue 16 item 2, bench/cli_start): each must
leave the command line's behaviour exactly as it was."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from disaggctl import cli

COMMANDS = sorted(cli.COMMAND_OWNERS)


def _names(app: typer.Typer) -> list[str]:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    return list(group.commands)


def test_every_command_has_its_owner_and_no_other() -> None:
    assert sorted(_names(cli.full_app())) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_app_for_builds_only_the_named_command(command: str) -> None:
    assert cli.app_for([command, "--help"]) is cli.command_app(command)
    assert cli.app_for(["--debug", command]) is cli.command_app(command)
    assert _names(cli.command_app(command)) == [command]


@pytest.mark.parametrize(
    "argv", [[], ["--help"], ["--version"], ["--debug"], ["nosuch"], ["--nosuch", "validate"], ["--", "validate"]]
)
def test_app_for_falls_back_to_the_full_app(argv: list[str]) -> None:
    assert cli.app_for(argv) is cli.full_app()
    assert cli.app is cli.full_app()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("args", [["--help"], ["--no-such-option"], []])
def test_one_command_app_answers_as_the_full_app(command: str, args: list[str]) -> None:
    """Help, usage errors and missing arguments: same output, same exit code."""
    full = CliRunner().invoke(cli.full_app(), [command, *args], prog_name="disaggctl", env={"COLUMNS": "100"})
    one = CliRunner().invoke(cli.command_app(command), [command, *args], prog_name="disaggctl", env={"COLUMNS": "100"})
    assert (one.exit_code, one.output) == (full.exit_code, full.output)
    if args == ["--help"]:
        assert one.exit_code == 0 and f"Usage: disaggctl {command}" in one.output


def test_router_subcommand_through_the_one_command_app() -> None:
    full = CliRunner().invoke(cli.full_app(), ["router", "serve", "--help"], prog_name="disaggctl")
    one = CliRunner().invoke(cli.command_app("router"), ["router", "serve", "--help"], prog_name="disaggctl")
    assert one.exit_code == 0 and one.output == full.output and "--config" in one.output


def test_the_console_script_imports_only_the_commands_module_it_runs() -> None:
    code = (
        "import sys; from disaggctl import cli; cli.app_for(sys.argv[1:]);"
        "print(sorted(m for m in sys.modules if m.startswith('disaggctl.commands.')))"
    )
    r = subprocess.run([sys.executable, "-c", code, "validate", "x.yaml"], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "['disaggctl.commands.core']"
    r = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == str(sorted(f"disaggctl.commands.{m}" for m in cli.COMMAND_MODULES))
