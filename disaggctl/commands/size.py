"""`disaggctl size`: recommend the prefill/decode layout for a model, GPUs, workload and SLA."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from disaggctl.sizing.perf import ModelInfo
    from disaggctl.sizing.search import Result


class GpuName(StrEnum):
    h100 = "h100"
    h200 = "h200"
    b200 = "b200"
    b300 = "b300"
    gb200 = "gb200"
    gb300 = "gb300"


class Output(StrEnum):
    table = "table"
    json = "json"


class Mode(StrEnum):
    auto = "auto"
    aggregated = "aggregated"
    disaggregated = "disaggregated"


class Quant(StrEnum):
    auto = "auto"
    bf16 = "bf16"
    fp8 = "fp8"
    nvfp4 = "nvfp4"
    mxfp4 = "mxfp4"


class KvDtype(StrEnum):
    auto = "auto"
    bf16 = "bf16"
    fp8 = "fp8"


def _model(name: str) -> ModelInfo:
    from disaggctl.catalog import CATALOG, load_hf_config, lookup
    from disaggctl.errors import DisaggError
    from disaggctl.sizing.perf import ModelInfo

    p = Path(name).expanduser()
    if p.exists():
        try:
            arch = load_hf_config(p)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DisaggError(f"--model {name}: cannot read a Hugging Face config.json there ({e})") from None
        entry = lookup(name)
        folder = p.parent if p.is_file() else p
        return ModelInfo(name=str(folder), path=str(folder), arch=arch, catalog=entry.key if entry else None)
    entry = lookup(name)
    if entry is None:
        raise DisaggError(
            f"--model {name!r} is not in the built-in catalog and is not a config.json path; "
            f"known: {', '.join(sorted(CATALOG))}"
        )
    return ModelInfo(name=entry.key, path=entry.hub_id, arch=entry.architecture, catalog=entry.key)


def _from_topology(path: Path) -> tuple[str, int, int, bool, list[tuple[str, int]]]:
    """(gpu key, usable GPUs, GPUs per host, multi-node NVLink domain, host names) of a topology file."""
    from pydantic import ValidationError

    from disaggctl.errors import DisaggError
    from disaggctl.sizing.hardware import gpu_key_from_name
    from disaggctl.topology import load_topology

    try:
        topo = load_topology(path)
    except (OSError, ValueError, ValidationError) as e:
        raise DisaggError(f"--topology {path}: not a topology file ({str(e).splitlines()[0]})") from None
    keys: set[str] = set()
    hosts: list[tuple[str, int]] = []
    per_host = 0
    nvl = False
    for name, host in topo.hosts.items():
        good = [g for g in host.gpus if g.index not in host.bad_gpus]
        for g in good:
            key = gpu_key_from_name(g.name)
            if key:
                keys.add(key)
            nvl = nvl or g.in_nvl_domain
        if good:
            hosts.append((name, len(good)))
            per_host = max(per_host, len(good))
    if not hosts:
        raise DisaggError(f"--topology {path}: no usable GPUs")
    if len(keys) != 1:
        found = ", ".join(sorted(keys)) or "no known GPU type"
        raise DisaggError(f"--topology {path}: found {found}; pass --gpu to say which GPU type to size for")
    return keys.pop(), sum(n for _, n in hosts), per_host, nvl, hosts


def _workload_profile(name: str) -> dict[str, Any]:
    import yaml

    from disaggctl.errors import DisaggError
    from disaggctl.resources import data_dir

    path = data_dir("profiles") / f"{name}.yaml"
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    wl = data.get("workload") if isinstance(data, dict) else None
    if not isinstance(wl, dict):
        known = sorted(p.stem for p in data_dir("profiles").glob("*.yaml")
                       if "workload:" in p.read_text())
        raise DisaggError(f"--workload {name!r} is not a workload profile; known: {', '.join(known)}")
    return wl


def _row(c: Any, best: Any) -> list[str]:
    pre = f"{c.prefill.replicas}x {c.prefill.shape.label}" if c.prefill else "-"
    mark = "*" if best is not None and c is best else ""
    mode = "disagg" if c.prefill else "agg"
    return [
        mark, mode, pre, f"{c.decode.replicas}x {c.decode.shape.label}", f"{c.weights}/{c.kv_dtype}", str(c.batch),
        f"{c.ttft_ms:.0f}", f"{c.tpot_ms:.1f}", f"{c.itl_ms:.1f}", f"{c.tps_per_gpu:.0f}", f"{c.tps_per_user:.0f}",
        str(c.gpus_used), "yes" if c.meets_sla else "no",
    ]


def _spread(front: list[Any], top: int) -> list[Any]:
    """`top` points of the front, evenly spaced from the most interactive to the most efficient."""
    if len(front) <= top:
        return front
    if top == 1:
        return front[-1:]
    return [front[round(i * (len(front) - 1) / (top - 1))] for i in range(top)]


def _print_table(result: Result, top: int, spec_out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from disaggctl.sizing.fragment import spec_kv_dtype, spec_quantization

    p = result.problem
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))
    title = (f"{p.model.name} on {p.gpus} x {p.gpu.key}: ISL {p.workload.isl} OSL {p.workload.osl}, "
             f"SLA p{p.sla.percentile:g} TTFT <= {p.sla.ttft_ms:g} ms, TPOT <= {p.sla.tpot_ms:g} ms"
             + (f", ITL <= {p.sla.itl_ms:g} ms" if p.sla.itl_ms else ""))
    table = Table(title=f"Pareto front: throughput per GPU vs tokens/s per user\n{title}")
    for col in ("", "mode", "prefill", "decode", "weights/KV", "batch", "TTFT ms", "TPOT ms", "ITL ms",
                "tok/s/GPU", "tok/s/user", "GPUs", "SLA"):
        table.add_column(col, justify="right" if col.endswith(("ms", "GPU", "user", "GPUs", "batch")) else "left")
    shown = _spread(result.pareto, top)
    if result.best is not None and all(c is not result.best for c in shown):
        shown = [*shown, result.best]
    for c in shown:
        table.add_row(*_row(c, result.best))
    console.print(table)
    b = result.best
    e = p.efficiency
    console.print(f"efficiency ({e.source}): compute {e.compute:.2f}, memory {e.memory:.2f}, link {e.link:.2f}")
    if b is not None:
        console.print(f"[bold]Recommendation:[/bold] {b.mode} {b.layout}, weights {b.weights} "
                      f"(quantization: {spec_quantization(p.model, b.weights)}), "
                      f"KV cache {spec_kv_dtype(b.kv_dtype)}")
        if b.prefill is not None:
            r = b.prefill
            console.print(f"  prefill: {r.replicas} x {r.shape.label}, max_num_batched_tokens "
                          f"{r.max_num_batched_tokens}, max_num_seqs {r.max_num_seqs}")
        r = b.decode
        console.print(f"  {'decode' if b.prefill else 'instances'}: {r.replicas} x {r.shape.label}, "
                      f"max_num_batched_tokens {r.max_num_batched_tokens}, max_num_seqs {r.max_num_seqs}")
        if b.prefill is not None:
            console.print(f"  KV transfer: {b.connector} over {b.kv_link}, {b.kv_transfer_ms:.1f} ms per prompt; "
                          f"router local_prefill_threshold {b.local_prefill_threshold}")
        console.print(f"  predicted: TTFT {b.ttft_ms:.0f} ms, TPOT {b.tpot_ms:.1f} ms, ITL {b.itl_ms:.1f} ms, "
                      f"{b.output_tps:.0f} output tok/s ({b.tps_per_gpu:.0f} per GPU, {b.request_rate:.2f} req/s)")
    for n in result.notes:
        console.print(f"[yellow]note:[/yellow] {n}")
    if spec_out is not None:
        console.print(f"wrote {spec_out}")


def _json(result: Result) -> dict[str, Any]:
    from dataclasses import asdict

    from disaggctl.sizing.fragment import spec_kv_dtype, spec_quantization

    p = result.problem
    best = None
    if result.best is not None:
        best = result.best.to_dict()
        best["quantization"] = spec_quantization(p.model, result.best.weights)
        best["kv_cache_dtype"] = spec_kv_dtype(result.best.kv_dtype)
    return {
        "model": p.model.name,
        "gpu": p.gpu.key,
        "hardware_profile": p.gpu.profile,
        "gpus": p.gpus,
        "workload": asdict(p.workload),
        "sla": asdict(p.sla),
        "load": {"rate": p.rate, "concurrency": p.concurrency},
        "efficiency": asdict(p.efficiency),
        "recommendation": best,
        "pareto": [c.to_dict() for c in result.pareto],
        "candidates_evaluated": len(result.candidates),
        "notes": result.notes,
    }


def _calibrate(file: Path, store: Path, cluster: str | None, gpu_key: str, defaults: dict[str, Any],
               model: ModelInfo | None, output: Output) -> None:
    from disaggctl.errors import DisaggError
    from disaggctl.sizing import calibrate
    from disaggctl.sizing.hardware import load_gpu

    ms = calibrate.read_measurements(file, defaults)
    models: dict[str, ModelInfo] = {}
    for m in ms:
        if m.gpu != gpu_key:
            raise DisaggError(f"--calibrate: {m.source} ran on {m.gpu}, but this calibration is for {gpu_key}",)
        if m.model not in models:
            models[m.model] = model if model is not None and m.model == defaults.get("model") else _model(m.model)
    gpu = load_gpu(gpu_key)
    name = cluster or gpu_key
    start, _ = calibrate.efficiency_for(gpu_key, None, Path("/nonexistent/disaggctl-defaults.json"))
    result = calibrate.fit(models, gpu, ms, start)
    calibrate.save(store, name, gpu_key, result)
    e = result.efficiency
    if output is Output.json:
        print(json.dumps({"cluster": name, "gpu": gpu_key, "store": str(store), "compute": e.compute,
                          "memory": e.memory, "samples": result.samples, "rms_log_error_before": result.before,
                          "rms_log_error_after": result.after, "at_limit": result.at_limit}, indent=2))
        return
    print(f"calibrated {name} ({gpu_key}) from {result.samples} measurement(s): compute {e.compute:.3f} "
          f"(was {start.compute:.2f}), memory {e.memory:.3f} (was {start.memory:.2f}); "
          f"RMS log error {result.before:.3f} -> {result.after:.3f}; stored in {store}")
    if result.at_limit:
        print("warning: a factor reached 1.0: the measurements are as fast as the hardware peaks allow; "
              "check the recorded settings (tp, precision, isl/osl)", file=sys.stderr)


def size(
    model: Annotated[str | None, typer.Option(help="Catalog model (llama-3.1-70b, ...) or a config.json path.")] = None,
    gpu: Annotated[GpuName | None, typer.Option(help="GPU type; its numbers come from the hardware profile.")] = None,
    gpus: Annotated[int | None, typer.Option(min=1, help="Number of GPUs to size for.")] = None,
    topology: Annotated[Path | None, typer.Option(help="Probed topology file: GPU type, count, hosts.")] = None,
    workload: Annotated[str | None, typer.Option(help="Workload profile for ISL/OSL (chat, summarization).")] = None,
    isl: Annotated[int | None, typer.Option(min=1, help="Input (prompt) length, tokens [1024].")] = None,
    osl: Annotated[int | None, typer.Option(min=1, help="Output length, tokens [256].")] = None,
    ttft: Annotated[float, typer.Option(min=1, help="TTFT target, ms.")] = 2000.0,
    tpot: Annotated[float, typer.Option(min=0.1, help="TPOT (time per output token) target, ms.")] = 50.0,
    percentile: Annotated[float, typer.Option(min=1, max=99.99, help="SLA percentile (TTFT and ITL).")] = 90.0,
    itl: Annotated[float | None, typer.Option(min=0.1, help="Inter-token latency target (percentile), ms.")] = None,
    rate: Annotated[float | None, typer.Option(min=0.0001, help="Requests/s to serve (open loop).")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Concurrent clients (closed loop).")] = None,
    multi_round_share: Annotated[
        float | None, typer.Option(min=0, max=1, help="Share of requests reusing an earlier round's prompt.")
    ] = None,
    nic_gbps: Annotated[float | None, typer.Option(min=0.1, help="Scale-out NIC rate per GPU, Gb/s.")] = None,
    nvlink_domain_gpus: Annotated[int | None, typer.Option(min=1, help="GPUs in one NVLink domain.")] = None,
    quantization: Annotated[Quant, typer.Option(help="Weights precision to consider.")] = Quant.auto,
    kv_cache_dtype: Annotated[KvDtype, typer.Option(help="KV-cache dtype to consider.")] = KvDtype.auto,
    mode: Annotated[Mode, typer.Option(help="Restrict to aggregated or disaggregated serving.")] = Mode.auto,
    output: Annotated[Output, typer.Option("--output", "-o", help="table or json.")] = Output.table,
    top: Annotated[int, typer.Option(min=1, help="Pareto points the table shows (evenly spread).")] = 12,
    spec_out: Annotated[Path | None, typer.Option(help="Write the recommendation as a spec YAML.")] = None,
    calibrate_file: Annotated[
        Path | None, typer.Option("--calibrate", help="Fit efficiency factors from benchmark results (JSON).")
    ] = None,
    cluster: Annotated[str | None, typer.Option(help="Calibration name (default: the GPU type).")] = None,
    calibration_file: Annotated[
        Path | None, typer.Option(help="Calibration store [~/.config/disaggctl/calibration.json].")
    ] = None,
) -> None:
    """Recommend aggregated or disaggregated serving, xPyD, TP/PP/DP, precision and vLLM limits."""
    params = dict(locals())
    from disaggctl.errors import DisaggError

    try:
        _size(**params)
    except DisaggError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None


def _size(
    model: str | None, gpu: GpuName | None, gpus: int | None, topology: Path | None, workload: str | None,
    isl: int | None, osl: int | None, ttft: float, tpot: float, percentile: float, itl: float | None,
    rate: float | None,
    concurrency: int | None, multi_round_share: float | None, nic_gbps: float | None, nvlink_domain_gpus: int | None,
    quantization: Quant, kv_cache_dtype: KvDtype, mode: Mode, output: Output, top: int, spec_out: Path | None,
    calibrate_file: Path | None, cluster: str | None, calibration_file: Path | None,
) -> None:
    from disaggctl.errors import DisaggError
    from disaggctl.sizing import calibrate
    from disaggctl.sizing.hardware import load_gpu
    from disaggctl.sizing.search import Problem, Sla, Workload, search

    store = calibration_file or calibrate.default_store_path()
    host_names: list[tuple[str, int]] | None = None
    gpu_key = gpu.value if gpu is not None else None
    per_host: int | None = None
    if topology is not None:
        t_gpu, t_count, per_host, nvl, host_names = _from_topology(topology)
        gpu_key = gpu_key or t_gpu
        gpus = gpus or t_count
        if not nvl and nvlink_domain_gpus is None:
            nvlink_domain_gpus = per_host
    if gpu_key is None:
        raise DisaggError("--gpu is required (h100 h200 b200 b300 gb200 gb300), or --topology to read it")
    info = _model(model) if model else None

    if calibrate_file is not None:
        defaults: dict[str, Any] = {"gpu": gpu_key, "model": model, "isl": isl, "osl": osl,
                                    "concurrency": concurrency}
        _calibrate(calibrate_file, store, cluster, gpu_key, defaults, info, output)
        return

    if info is None:
        raise DisaggError("--model is required (a catalog name such as llama-3.1-70b, or a config.json path)")
    if gpus is None:
        raise DisaggError("--gpus is required (or --topology to count them)")
    if rate is not None and concurrency is not None:
        raise DisaggError("give --rate or --concurrency, not both")
    prof = _workload_profile(workload) if workload else {}
    wl = Workload(
        isl=isl or int(prof.get("isl", 1024)),
        osl=osl or int(prof.get("osl", 256)),
        multi_round_share=multi_round_share if multi_round_share is not None
        else float(prof.get("multi_round_share", 0.0)),
    )
    hw = load_gpu(gpu_key).with_links(nic_gbps=nic_gbps, nvlink_domain_gpus=nvlink_domain_gpus)
    eff, note = calibrate.efficiency_for(gpu_key, cluster, store)
    if quantization is Quant.nvfp4 and not hw.blackwell:
        raise DisaggError(f"--quantization nvfp4 needs Blackwell GPUs ({gpu_key} is {hw.arch})",)
    problem = Problem(
        model=info, gpu=hw, gpus=gpus, workload=wl, sla=Sla(ttft, tpot, percentile, itl), efficiency=eff,
        rate=rate, concurrency=concurrency,
        weights=() if quantization is Quant.auto else (quantization.value,),
        kv_dtypes=("bf16", "fp8") if kv_cache_dtype is KvDtype.auto else (kv_cache_dtype.value,),
        modes=("aggregated", "disaggregated") if mode is Mode.auto else (mode.value,),
    )
    result = search(problem)
    if note:
        result.notes.append(note)
    if spec_out is not None:
        _write_spec(result, spec_out, host_names)
    if output is Output.json:
        print(json.dumps(_json(result), indent=2))
    else:
        _print_table(result, top, spec_out)


def _write_spec(result: Result, path: Path, host_names: list[tuple[str, int]] | None) -> None:
    from disaggctl.compile import compile_spec
    from disaggctl.errors import DisaggError, SpecError
    from disaggctl.loader import load_text
    from disaggctl.sizing.fragment import build_spec, render

    best = result.best or (result.pareto[-1] if result.pareto else None)
    if best is None:
        raise DisaggError("--spec-out: no layout fits, nothing to write")
    p = result.problem
    if result.best is None:
        result.notes.append("--spec-out wrote the closest candidate: it does not meet the SLA")
    spec = build_spec(p.model, p.gpu, p.workload, best, host_names)
    text = render(spec, f"Written by `disaggctl size` for {p.model.name} on {p.gpus} x {p.gpu.key}.\n"
                        f"Predicted: TTFT {best.ttft_ms:.0f} ms, TPOT {best.tpot_ms:.1f} ms, "
                        f"{best.tps_per_gpu:.0f} output tok/s per GPU. Hosts are placeholders: rename them.")
    try:
        loaded = load_text(text, str(path))
    except SpecError as e:  # a planner bug, not the user's: say so
        raise DisaggError(f"internal error: the sized spec does not validate:\n{e.format()}") from None
    path.write_text(text)
    try:  # what `disaggctl validate` adds: placement on the placeholder hosts and compilation
        compile_spec(loaded)
    except DisaggError as e:
        result.notes.append(f"`disaggctl validate {path}` reports: {e}")


def register(app: typer.Typer) -> None:
    app.command("size")(size)
