"""`disaggctl size` errors: each with its exit code, located, never a traceback, nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from disaggctl.commands.size import register

BASE = ("--model", "llama-3.1-70b", "--gpu", "b200", "--gpus", "16")


@pytest.fixture(autouse=True)
def _own_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DISAGGCTL_CALIBRATION", str(tmp_path / "store.json"))


@pytest.fixture
def app() -> typer.Typer:
    a = typer.Typer()

    @a.callback()
    def main() -> None:
        """Keep `size` a subcommand."""

    register(a)
    return a


def run(app: typer.Typer, *args: str) -> Any:
    r = CliRunner().invoke(app, ["size", *args])
    assert "Traceback" not in r.output
    return r


def test_sla_unreachable_names_the_best_achievable(app: typer.Typer) -> None:
    r = run(app, *BASE, "--ttft", "1", "--tpot", "0.5")
    assert r.exit_code == 4, r.output
    assert "SLA unreachable" in r.output and "best achievable for one 1024-token prompt is TTFT" in r.output


def test_load_beyond_capacity_names_the_capacity(app: typer.Typer) -> None:
    r = run(app, *BASE, "--rate", "100000")
    assert r.exit_code == 5, r.output
    assert "load beyond capacity: --rate 100000 req/s, but 16 x b200 serve at most" in r.output
    r = run(app, *BASE, "--concurrency", "5000000")
    assert r.exit_code == 5, r.output
    assert "concurrent clients" in r.output


def test_a_model_that_fits_is_never_called_too_big(app: typer.Typer) -> None:
    # these used to say "does not fit" although the model fits
    for args in (("--isl", "32000", "--osl", "16", "--ttft", "30000", "--mode", "aggregated"),
                 ("--rate", "100000"), ("--concurrency", "5000000")):
        r = run(app, *BASE, *args)
        assert "does not fit" not in r.output and r.exit_code in (0, 4, 5), r.output


def test_a_request_longer_than_the_context_is_refused(app: typer.Typer) -> None:
    r = run(app, *BASE, "--isl", "130000", "--osl", "2000")
    assert r.exit_code == 2
    assert "132000 tokens exceeds llama-3.1-70b's context of 131072" in r.output


def test_spec_out_into_a_missing_folder(app: typer.Typer, tmp_path: Path) -> None:
    out = tmp_path / "nope" / "sized.yaml"
    r = run(app, *BASE, "--spec-out", str(out))
    assert r.exit_code == 2 and "does not exist" in r.output and not out.exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"hidden_size": 4096, "num_attention_heads": 0, "num_hidden_layers": 32},
         "num_attention_heads: must be a positive integer (got 0)"),
        ({"hidden_size": "big", "num_attention_heads": 32, "num_hidden_layers": 32},
         'hidden_size: must be a positive integer (got "big")'),
        ({"hidden_size": 4096, "num_attention_heads": 32}, "num_hidden_layers: is missing"),
        ({"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 5},
         "num_key_value_heads: 5 does not divide num_attention_heads 32"),
        ([1, 2], "(top level): must be a JSON object"),
        ({"hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 1e400}, "num_hidden_layers: must be"),
    ],
)
def test_a_bad_config_json_is_located(app: typer.Typer, tmp_path: Path, config: Any, message: str) -> None:
    f = tmp_path / "config.json"
    f.write_text(json.dumps(config).replace("Infinity", "1e400"))
    r = run(app, "--model", str(f), "--gpu", "h100", "--gpus", "8")
    assert r.exit_code == 2, r.output
    assert f"{f}: {message}" in r.output


def test_a_config_json_that_is_not_json(app: typer.Typer, tmp_path: Path) -> None:
    f = tmp_path / "config.json"
    f.write_text("{not json")
    r = run(app, "--model", str(f), "--gpu", "h100", "--gpus", "8")
    assert r.exit_code == 2 and "not JSON" in r.output


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"max_concurrency": 1e400}, "concurrency: must be finite"),
        ({"tp": 0}, "tp: must be finite and > 0"),
        ({"tp": "8"}, None),  # a numeric string is accepted
        ({"mean_tpot_ms": -3}, "mean_tpot_ms: must be finite and > 0"),
        ({"tp": 10**30}, "beyond any real run"),
        ({"tp": 10**400}, "must be finite and > 0 (got a 401-digit number)"),
    ],
)
def test_calibrate_validates_every_input_before_saving(app: typer.Typer, tmp_path: Path, record: dict[str, Any],
                                                       message: str | None) -> None:
    base = {"model_id": "meta-llama/Llama-3.1-70B-Instruct", "gpu": "b200", "tp": 8, "max_concurrency": 16,
            "completed": 10, "total_input_tokens": 10240, "total_output_tokens": 2560, "mean_ttft_ms": 300.0,
            "mean_tpot_ms": 20.0, "output_throughput": 700.0, "quantization": "fp8"}
    f = tmp_path / "run.json"
    f.write_text(json.dumps({**base, **record}).replace("Infinity", "1e400"))
    store = tmp_path / "cal.json"
    r = run(app, "--calibrate", str(f), "--gpu", "b200", "--calibration-file", str(store))
    if message is None:
        assert r.exit_code == 0, r.output
        assert store.exists()
        return
    assert r.exit_code == 2, r.output
    assert message in r.output and not store.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--inventory", "8xb200,16xa100"), "--inventory '16xa100': expected a GPU type"),
        (("--inventory", "b200"), "give a count, e.g. 8xb200"),
        (("--inventory", "8xb200,8xb200"), "listed twice"),
        (("--inventory", "1xb200,1xh200,1xh100"), "one or two GPU types"),
        (("--prefill-gpu", "8xb200"), "give --prefill-gpu and --decode-gpu together"),
        (("--prefill-gpu", "b200", "--decode-gpu", "h200"), "--prefill-gpu: give a count"),
        (("--prefill-gpu", "0xb200", "--decode-gpu", "8xh200"), "at least 1"),
    ],
)
def test_fleet_options_are_checked(app: typer.Typer, args: tuple[str, ...], message: str) -> None:
    r = run(app, "--model", "llama-3.1-70b", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_mixed_fleet_through_the_cli(app: typer.Typer, tmp_path: Path) -> None:
    r = run(app, "--model", "llama-3.1-70b", "--prefill-gpu", "8xb200", "--decode-gpu", "16xh200",
            "--isl", "8192", "--osl", "512", "--mode", "disaggregated", "-o", "json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    rec = d["recommendation"]
    assert d["budget_gpus"] == 24 and [f["gpu"] for f in d["fleet"]] == ["b200", "h200"]
    assert rec["prefill"]["gpu"] == "b200" and rec["decode"]["gpu"] == "h200"
    assert any("disaggctl validate" in n for n in d["notes"])
    assert d["arms"]["disaggregated"]["layout"] == rec["layout"]
    out = tmp_path / "mixed.yaml"
    r = run(app, "--model", "llama-3.1-70b", "--prefill-gpu", "8xb200", "--decode-gpu", "16xh200",
            "--isl", "8192", "--osl", "512", "--mode", "disaggregated", "--spec-out", str(out))
    assert r.exit_code == 2 and "two GPU types" in r.output and not out.exists()


def test_inventory_sizes_both_types(app: typer.Typer) -> None:
    r = run(app, "--model", "llama-3.1-70b", "--inventory", "8xb200,16xh200", "--isl", "4096", "--osl", "512",
            "-o", "json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["budget_gpus"] == 24
    assert set(d["arms"]) >= {"aggregated", "replicated_aggregated", "disaggregated", "verdict"}
    assert d["arms"]["verdict"]
