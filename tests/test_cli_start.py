"""The start-up shortcuts of the `disaggctl` process (issue 16 item 2, bench/cli_start): each must
leave the command line's behaviour exactly as it was."""

from __future__ import annotations

import gc
import importlib
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import typer
import typer.main
from pydantic import BaseModel
from typer.testing import CliRunner

from disaggctl import cli, defaults, distinfo, gcpause, topology

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


# -- distinfo: dist-info folders read without importlib.metadata ----------------------------------


def _dist(root: Path, folder: str, metadata: str = "", entry_points: str | None = None) -> None:
    d = root / folder
    d.mkdir(parents=True)
    if metadata:
        (d / ("PKG-INFO" if folder.endswith(".egg-info") else "METADATA")).write_text(metadata)
    if entry_points is not None:
        (d / "entry_points.txt").write_text(entry_points)


def test_nixl_version_agrees_with_importlib_metadata() -> None:
    try:
        expected = metadata.version("nixl")
    except metadata.PackageNotFoundError:
        expected = ""
    assert distinfo.version("nixl") == expected
    assert distinfo.installed_version("nixl") == (expected or None)
    assert distinfo.version("no-such-distribution-here") == ""


def test_version_follows_importlib_metadata_on_a_fake_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _dist(a, "Fake_Dist-2.0.dist-info", "Metadata-Version: 2.1\nName: fake.dist\nVersion: 2.0\n\nVersion: 9\n")
    _dist(b, "fake_dist-1.0.dist-info", "Metadata-Version: 2.1\nName: fake-dist\nVersion: 1.0\n")
    _dist(b, "old_egg-0.3.egg-info", "Metadata-Version: 1.0\nName: old-egg\nVersion: 0.3rc1\n")
    paths = [str(tmp_path / "missing"), str(a), str(b)]
    for name in ("fake-dist", "Fake.Dist", "old_egg", "nothere"):
        try:
            expected = _importlib_version(name, paths)
        except metadata.PackageNotFoundError:
            expected = ""
        assert distinfo.version(name, paths) == expected, name
    assert distinfo.version("fake-dist", paths) == "2.0"  # first on the path wins, header only


def _importlib_version(name: str, paths: list[str]) -> str:
    dists = list(metadata.distributions(name=name, path=paths))
    if not dists:
        raise metadata.PackageNotFoundError(name)
    return dists[0].version


def test_a_zip_on_the_path_is_left_to_importlib_metadata(tmp_path: Path) -> None:
    (tmp_path / "lib.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    paths = [str(tmp_path / "lib.zip")]
    assert distinfo.version("nixl", paths) is None
    assert distinfo.declares_entry_point_group("pydantic", paths) is None


PLUGIN = '''
class Plugin:
    def new_schema_validator(self, *args, **kwargs):
        print("plugin called")
        return None, None, None


plugin = Plugin()
'''


def test_entry_point_groups_agree_with_importlib_metadata(tmp_path: Path) -> None:
    _dist(tmp_path, "tool-1.0.dist-info", "Version: 1.0\n", "[console_scripts]\ntool = tool:main\n")
    _dist(tmp_path, "other-1.0.dist-info", "Version: 1.0\n")
    paths = [str(tmp_path)]
    for group in ("pydantic", "console_scripts"):
        expected = bool(metadata.entry_points(group=group))
        assert distinfo.declares_entry_point_group(group) is expected
        assert distinfo.declares_entry_point_group(group, paths) is (group == "console_scripts")
    _dist(tmp_path, "plug-1.0.dist-info", "Version: 1.0\n", "[x]\na = b\n\n [pydantic] \nplug = plug:plugin\n")
    assert distinfo.declares_entry_point_group("pydantic", paths) is True


def _run_console(code: str, path: Path | None = None) -> list[str]:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return r.stdout.split()


CHECK = """
import sys
from disaggctl import distinfo
placed = distinfo.no_pydantic_plugins()
import pydantic
class M(pydantic.BaseModel):
    x: int
M(x=1)
print(placed, getattr(sys.modules[distinfo.LOADER], "STAND_IN", False), "importlib.metadata" in sys.modules)
"""


def test_the_plugin_stand_in_is_used_only_when_no_plugin_is_declared(tmp_path: Path) -> None:
    """No distribution declares a `pydantic` entry point group: the stand-in answers, importlib.metadata
    is never imported. One does: pydantic's own loader loads and calls the plugin."""
    declared = bool(metadata.entry_points(group="pydantic"))
    assert _run_console(CHECK) == ([str(not declared), str(not declared), str(declared)])
    _dist(tmp_path, "plug-1.0.dist-info", "Version: 1.0\n", "[pydantic]\nplug = plug:plugin\n")
    (tmp_path / "plug.py").write_text(PLUGIN)
    assert _run_console(CHECK, tmp_path) == ["plugin", "called", "False", "False", "True"]


def test_the_console_script_skips_importlib_metadata_and_help_skips_the_scan() -> None:
    code = (
        "import sys, atexit; from disaggctl import cli, distinfo;"
        "atexit.register(lambda: print('importlib.metadata' in sys.modules, distinfo.LOADER in sys.modules));"
        "sys.argv[1:] = {argv!r}; cli.main()"
    )
    declared = bool(metadata.entry_points(group="pydantic"))  # then pydantic's own loader scans, as it should
    spec = str(Path(__file__).resolve().parents[1] / "examples" / "local-cpu.yaml")
    assert _run_console(code.format(argv=["validate", spec]))[-2:] == [str(declared), "True"]
    assert _run_console(code.format(argv=["--help"]))[-2:] == ["False", "False"]


# -- gcpause: no collector while a one-shot command's process parses its command line -------------


@pytest.mark.parametrize(
    "argv,off",
    [
        (["validate", "s.yaml"], True),
        (["render", "s.yaml", "-o", "out"], True),
        (["schema"], True),
        (["plan", "--offline", "s.yaml"], True),
        (["plan", "s.yaml"], False),
        (["apply", "s.yaml"], False),
        (["logs", "s.yaml", "-f"], False),
        (["router", "serve", "--config", "r.json"], False),
        (["probe", "s.yaml"], False),
        (["size", "--model", "m"], False),
    ],
)
def test_parse_without_gc_only_for_commands_that_leave_it_off(argv: list[str], off: bool) -> None:
    assert gc.isenabled()
    try:
        gcpause.parse_without_gc(argv[0], argv)
        assert gc.isenabled() is not off
    finally:
        gc.enable()


GC_CHECK = """
import atexit, gc, sys
import disaggctl.demo_model as dm, disaggctl.docgen as docgen
from disaggctl import cli
seen = []
docgen.spec_json_schema = lambda: seen.append(gc.isenabled()) or dict()
dm.is_built = lambda path: seen.append(gc.isenabled())
dm.build = lambda path, force: dict(vocab_size=0, parameters=0)
atexit.register(lambda: print("collector", *seen))
sys.argv = ["disaggctl", *sys.argv[1:]]
cli.main(ONE_SHOT)
"""


@pytest.mark.parametrize("one_shot", [True, False])
@pytest.mark.parametrize("argv,on", [(["schema"], False), (["demo-model", "/nonexistent/m"], True)])
def test_the_console_script_runs_one_shot_commands_without_the_collector(
    one_shot: bool, argv: list[str], on: bool
) -> None:
    code = GC_CHECK.replace("ONE_SHOT", str(one_shot))
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert r.stdout.split()[-2:] == ["collector", str(on or not one_shot)]


# -- model modules: no string annotations to evaluate, no `list` default factory ------------------

MODEL_MODULES = ["disaggctl.spec", "disaggctl.deployment", "disaggctl.topology", "disaggctl.compat.report",
                 "disaggctl.catalog"]


@pytest.mark.parametrize("name", MODEL_MODULES)
def test_model_modules_build_cheaply(name: str) -> None:
    module = importlib.import_module(name)
    assert "annotations" not in vars(module), "pydantic would evaluate every field's annotation string"
    models = [m for m in vars(module).values()
              if isinstance(m, type) and issubclass(m, BaseModel) and m.__module__ == name]
    assert models
    for model in models:
        for field, info in model.model_fields.items():
            assert info.default_factory is not list, f"{model.__name__}.{field}: use defaults.empty_list"


def test_empty_list_is_a_new_list_each_time() -> None:
    a, b = topology.HostTopology(), topology.HostTopology()
    assert a.gpus == [] and a.gpus is not b.gpus and defaults.empty_list() is not defaults.empty_list()
