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
    from disaggctl.sizing.inputs import load_model

    return load_model(name)


def _from_topology(path: Path) -> tuple[str, int, int, bool, list[tuple[str, int]]]:
    """(gpu key, usable GPUs, GPUs per host, multi-node NVLink domain, host names) of a topology file."""
    from pydantic import ValidationError

    from disaggctl.sizing.errors import SizingInputError
    from disaggctl.sizing.hardware import gpu_key_from_name
    from disaggctl.topology import load_topology

    try:
        topo = load_topology(path)
    except (OSError, ValueError, ValidationError) as e:
        raise SizingInputError(f"--topology {path}: not a topology file ({str(e).splitlines()[0]})") from None
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
        raise SizingInputError(f"--topology {path}: no usable GPUs")
    if len(keys) != 1:
        found = ", ".join(sorted(keys)) or "no known GPU type"
        raise SizingInputError(f"--topology {path}: found {found}; pass --gpu to say which GPU type to size for")
    return keys.pop(), sum(n for _, n in hosts), per_host, nvl, hosts


def _workload_profile(name: str) -> dict[str, Any]:
    import yaml

    from disaggctl.resources import data_dir
    from disaggctl.sizing.errors import SizingInputError

    path = data_dir("profiles") / f"{name}.yaml"
    data = yaml.safe_load(path.read_text()) if path.is_file() else None
    wl = data.get("workload") if isinstance(data, dict) else None
    if not isinstance(wl, dict):
        known = sorted(p.stem for p in data_dir("profiles").glob("*.yaml")
                       if "workload:" in p.read_text())
        raise SizingInputError(f"--workload {name!r} is not a workload profile; known: {', '.join(known)}")
    return wl


def _calibrate(file: Path, store: Path, cluster: str | None, gpu_key: str, defaults: dict[str, Any],
               model: ModelInfo | None, output: Output) -> None:
    from disaggctl.sizing import calibrate
    from disaggctl.sizing.errors import SizingInputError
    from disaggctl.sizing.hardware import load_gpu

    ms = calibrate.read_measurements(file, defaults)
    models: dict[str, ModelInfo] = {}
    for m in ms:
        if m.gpu != gpu_key:
            raise SizingInputError(f"--calibrate: {m.source} ran on {m.gpu}, but this calibration is for {gpu_key}")
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
    gpus: Annotated[int | None, typer.Option(min=1, max=100000, help="Number of GPUs to size for.")] = None,
    inventory: Annotated[
        str | None, typer.Option(help="Mixed fleet: GPU types and counts, e.g. 8xb200,16xh200.")
    ] = None,
    prefill_gpu: Annotated[
        str | None, typer.Option(help="Mixed fleet: prefill GPUs, e.g. 8xb200 (or a type of --inventory).")
    ] = None,
    decode_gpu: Annotated[
        str | None, typer.Option(help="Mixed fleet: decode GPUs, e.g. 16xh200 (or a type of --inventory).")
    ] = None,
    topology: Annotated[Path | None, typer.Option(help="Probed topology file: GPU type, count, hosts.")] = None,
    workload: Annotated[str | None, typer.Option(help="Workload profile for ISL/OSL (chat, summarization).")] = None,
    isl: Annotated[int | None, typer.Option(min=1, max=10_000_000, help="Input (prompt) tokens [1024].")] = None,
    osl: Annotated[int | None, typer.Option(min=1, max=10_000_000, help="Output length, tokens [256].")] = None,
    ttft: Annotated[float, typer.Option(min=1, max=1e7, help="TTFT target, ms.")] = 2000.0,
    tpot: Annotated[float, typer.Option(min=0.1, max=1e6, help="TPOT (time per output token) target, ms.")] = 50.0,
    percentile: Annotated[float, typer.Option(min=1, max=99.99, help="SLA percentile (TTFT and ITL).")] = 90.0,
    itl: Annotated[
        float | None, typer.Option(min=0.1, max=1e6, help="Inter-token latency target (percentile), ms.")
    ] = None,
    rate: Annotated[float | None, typer.Option(min=0.0001, max=1e7, help="Requests/s to serve (open loop).")] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, max=10_000_000, help="Concurrent clients (closed loop).")
    ] = None,
    multi_round_share: Annotated[
        float | None, typer.Option(min=0, max=1, help="Share of requests reusing an earlier round's prompt.")
    ] = None,
    nic_gbps: Annotated[
        float | None, typer.Option(min=0.1, max=1e6, help="Scale-out NIC rate per GPU, Gb/s.")
    ] = None,
    nvlink_domain_gpus: Annotated[
        int | None, typer.Option(min=1, max=100000, help="GPUs in one NVLink domain.")
    ] = None,
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
    """Size aggregated, replicated-aggregated and disaggregated serving; recommend the layout.

    Exit codes: 0 a layout meets the SLA; 2 bad input; 3 the model does not fit; 4 the SLA is
    unreachable; 5 the SLA is reachable but not at the requested load (docs/sizing.md).
    """
    params = dict(locals())
    from disaggctl.errors import DisaggError

    try:
        _size(**params)
    except DisaggError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None


def _pools(gpu_key: str | None, gpus: int | None, inventory: str | None, prefill_gpu: str | None,
           decode_gpu: str | None) -> tuple[list[tuple[str, int | None]], str | None]:
    """[(GPU type, count)] of the budget (one or two types) and the type prefill must run on."""
    from disaggctl.sizing.errors import SizingInputError
    from disaggctl.sizing.inputs import parse_gpu_count, parse_inventory

    inv: list[tuple[str, int | None]] = list(parse_inventory(inventory)) if inventory else []
    roles = [parse_gpu_count(v, o) if v else None for v, o in ((prefill_gpu, "--prefill-gpu"),
                                                               (decode_gpu, "--decode-gpu"))]
    if (roles[0] is None) != (roles[1] is None):
        raise SizingInputError("give --prefill-gpu and --decode-gpu together")
    if roles[0] is None or roles[1] is None:
        return (inv or [(gpu_key or "", gpus)]), None
    if (gpu_key or gpus) and not inv:
        raise SizingInputError("--prefill-gpu/--decode-gpu carry the GPU counts: drop --gpu/--gpus")
    counts = dict(inv)
    sized: dict[str, int] = {}
    for role, opt in zip(roles, ("--prefill-gpu", "--decode-gpu"), strict=True):
        assert role is not None
        key, count = role
        n = count if count is not None else counts.get(key)
        if n is None:
            raise SizingInputError(f"{opt}: give a count (e.g. 8x{key}) or list {key} in --inventory")
        sized[key] = sized.get(key, 0) + n
    out: list[tuple[str, int | None]] = list(sized.items())
    return out, roles[0][0] if len(out) == 2 else None


def _problem_fleet(args: dict[str, Any], store: Path, notes: list[str]) -> tuple[Any, Any, int, Any, Any]:
    """(first pool GpuSpec, its efficiency, its count, second Pool or None, prefill GPU type or None)."""
    from disaggctl.sizing import calibrate
    from disaggctl.sizing.errors import SizingInputError
    from disaggctl.sizing.hardware import load_gpu
    from disaggctl.sizing.plan import Pool

    fleet, prefill_on = _pools(args["gpu_key"], args["gpus"], args["inventory"], args["prefill_gpu"],
                               args["decode_gpu"])
    specs = []
    for i, (key, count) in enumerate(fleet):
        if not key:
            raise SizingInputError("--gpu is required (h100 h200 b200 b300 gb200 gb300), or --topology, "
                                   "--inventory or --prefill-gpu/--decode-gpu")
        if count is None:
            raise SizingInputError("--gpus is required (or --topology to count them)")
        hw = load_gpu(key).with_links(nic_gbps=args["nic_gbps"], nvlink_domain_gpus=args["nvlink_domain_gpus"])
        eff, note = calibrate.efficiency_for(key, args["cluster"] if i == 0 else None, store)
        if note:
            notes.append(note)
        specs.append((hw, eff, count))
    second = Pool(specs[1][0], specs[1][2], specs[1][1]) if len(specs) == 2 else None
    return specs[0][0], specs[0][1], specs[0][2], second, prefill_on


def _size(
    model: str | None, gpu: GpuName | None, gpus: int | None, inventory: str | None, prefill_gpu: str | None,
    decode_gpu: str | None, topology: Path | None, workload: str | None,
    isl: int | None, osl: int | None, ttft: float, tpot: float, percentile: float, itl: float | None,
    rate: float | None,
    concurrency: int | None, multi_round_share: float | None, nic_gbps: float | None, nvlink_domain_gpus: int | None,
    quantization: Quant, kv_cache_dtype: KvDtype, mode: Mode, output: Output, top: int, spec_out: Path | None,
    calibrate_file: Path | None, cluster: str | None, calibration_file: Path | None,
) -> None:
    from disaggctl.sizing import calibrate
    from disaggctl.sizing.errors import SizingInputError
    from disaggctl.sizing.inputs import check_context

    store = calibration_file or calibrate.default_store_path()
    if spec_out is not None and not spec_out.expanduser().resolve().parent.is_dir():
        raise SizingInputError(f"--spec-out {spec_out}: the folder {spec_out.parent} does not exist")
    host_names: list[tuple[str, int]] | None = None
    gpu_key = gpu.value if gpu is not None else None
    if topology is not None:
        t_gpu, t_count, per_host, nvl, host_names = _from_topology(topology)
        gpu_key = gpu_key or t_gpu
        gpus = gpus or t_count
        if not nvl and nvlink_domain_gpus is None:
            nvlink_domain_gpus = per_host
    info = _model(model) if model else None

    if calibrate_file is not None:
        if gpu_key is None:
            raise SizingInputError("--calibrate needs --gpu (the GPU type the runs used)")
        defaults: dict[str, Any] = {"gpu": gpu_key, "model": model, "isl": isl, "osl": osl,
                                    "concurrency": concurrency}
        _calibrate(calibrate_file, store, cluster, gpu_key, defaults, info, output)
        return

    if info is None:
        raise SizingInputError("--model is required (a catalog name such as llama-3.1-70b, or a config.json path)")
    if rate is not None and concurrency is not None:
        raise SizingInputError("give --rate or --concurrency, not both")
    prof = _workload_profile(workload) if workload else {}
    wl_isl, wl_osl = isl or int(prof.get("isl", 1024)), osl or int(prof.get("osl", 256))
    check_context(info, wl_isl, wl_osl)
    notes: list[str] = []
    args = {"gpu_key": gpu_key, "gpus": gpus, "inventory": inventory, "prefill_gpu": prefill_gpu,
            "decode_gpu": decode_gpu, "nic_gbps": nic_gbps, "nvlink_domain_gpus": nvlink_domain_gpus,
            "cluster": cluster}
    hw, eff, count, second, prefill_on = _problem_fleet(args, store, notes)
    share = multi_round_share if multi_round_share is not None else float(prof.get("multi_round_share", 0.0))
    problem = _make_problem(info, hw, count, eff, second, prefill_on, (wl_isl, wl_osl, share),
                            (ttft, tpot, percentile, itl), rate, concurrency, quantization, kv_cache_dtype, mode)
    _run(problem, notes, output, top, spec_out, host_names)


def _make_problem(info: ModelInfo, hw: Any, count: int, eff: Any, second: Any, prefill_on: str | None,
                  wl: tuple[int, int, float], sla: tuple[float, float, float, float | None], rate: float | None,
                  concurrency: int | None, quantization: Quant, kv_cache_dtype: KvDtype, mode: Mode) -> Any:
    from disaggctl.sizing.candidates import precisions
    from disaggctl.sizing.errors import SizingInputError
    from disaggctl.sizing.search import Problem, Sla, Workload

    problem = Problem(
        model=info, gpu=hw, gpus=count, workload=Workload(*wl), sla=Sla(*sla), efficiency=eff,
        rate=rate, concurrency=concurrency,
        weights=() if quantization is Quant.auto else (quantization.value,),
        kv_dtypes=("bf16", "fp8") if kv_cache_dtype is KvDtype.auto else (kv_cache_dtype.value,),
        modes=("aggregated", "disaggregated") if mode is Mode.auto else (mode.value,),
        second=second, prefill_on=prefill_on,
    )
    if not precisions(problem):
        kinds = ", ".join(sorted({p.gpu.key for p in problem.pools}))
        raise SizingInputError(f"--quantization {quantization.value}: no such weights precision for "
                               f"{info.name} on {kinds} (NVFP4 needs Blackwell on every role)")
    return problem


def _run(problem: Any, notes: list[str], output: Output, top: int, spec_out: Path | None,
         host_names: list[tuple[str, int]] | None) -> None:
    from disaggctl.sizing.outcome import check_outcome
    from disaggctl.sizing.report import print_table, to_json
    from disaggctl.sizing.search import search

    result = search(problem)
    result.notes.extend(notes)
    check_outcome(problem, result)
    if spec_out is not None:
        _write_spec(result, spec_out, host_names)
    if output is Output.json:
        print(json.dumps(to_json(result), indent=2))
    else:
        print_table(result, top, spec_out)


def _write_spec(result: Result, path: Path, host_names: list[tuple[str, int]] | None) -> None:
    from disaggctl.compile import compile_spec
    from disaggctl.errors import DisaggError, SpecError
    from disaggctl.loader import load_text
    from disaggctl.sizing.errors import SizingInputError
    from disaggctl.sizing.fragment import build_spec, render

    best = result.best
    if best is None:
        raise DisaggError("--spec-out: no layout meets the SLA, nothing to write")
    p = result.problem
    kinds = {r.gpu for r in (best.prefill, best.decode, best.also) if r is not None}
    if len(kinds) > 1:
        raise SizingInputError(f"--spec-out: the recommendation spans two GPU types ({', '.join(sorted(kinds))}); "
                               "writing mixed-fleet specs is not supported yet: size each pool, or drop --spec-out")
    gpu = next(pool.gpu for pool in p.pools if pool.gpu.key in kinds)
    spec = build_spec(p.model, gpu, p.workload, best, host_names)
    text = render(spec, f"Written by `disaggctl size` for {p.model.name} on {best.gpus_used} x {gpu.key}.\n"
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
