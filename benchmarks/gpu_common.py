"""What the GPU benchmarks share: building a kiln engine the way `kiln optimize` does, and timing."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir


def kiln_engine(model: ir.Model, work: Path, target, precision: str, dims: dict, **target_changes):
    """Run kiln's pass pipeline for target on model (in place) and build and load its engine in work.

    dims maps each dynamic dim to a DimRange; when every range is one size, the shapes are frozen and
    the engine captures a CUDA graph, as `kiln optimize` does for a static profile. target_changes
    override target fields (e.g. provider_options) for a variant. Returns (engine, pass records)."""
    from optimizer.config import Options
    from optimizer.models import save_model
    from optimizer.pipeline import pass_pipeline
    from optimizer.shapes import input_specs
    from passes import PassManager
    from targets import Profile

    target = dataclasses.replace(target, **target_changes)
    static = all(r.min == r.max for r in dims.values())
    sizes = {name: r.min for name, r in dims.items()} if static else None
    start = time.perf_counter()
    model, records = PassManager(pass_pipeline(Options(precision=precision), target, sizes)).run(model)
    passes_s = time.perf_counter() - start
    work.mkdir(parents=True, exist_ok=True)
    save_model(model, work / "model.onnx")
    profile = Profile(input_specs(model), {} if static else dims)
    (work / "engine").mkdir(exist_ok=True)
    start = time.perf_counter()
    target.build(work / "model.onnx", work / "engine", profile, {"precision": precision})  # loads with the same TF32 rule
    engine = target.load(work / "engine")
    print(f"  kiln {target.name} {precision}{' static' if static else ''}: passes {passes_s:.0f} s, build+load {time.perf_counter() - start:.0f} s")
    return engine, records


def session_runner(session, feeds: dict[str, np.ndarray], output: str):
    """(run, result) for an ONNX Runtime session with feeds and output bound on the GPU: run() runs it
    and waits; result() copies the output to the host."""
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    binding.bind_output(output, "cuda", 0)

    def run():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run, lambda: binding.copy_outputs_to_cpu()[0]


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(1e-12, np.abs(want).max()))


def print_table(rows: list[tuple], baseline_name: str | None = None) -> None:
    """rows: (case, runner, ms, err). Ratios are against the fastest baseline runner of each case
    (runners not starting with 'kiln'), so >1 means faster than it."""
    print("\n| case | runner | median ms | speed-up vs fastest baseline | max rel err vs fp32 |\n|---|---|---|---|---|")
    for case in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == case]
        baselines = [r[2] for r in mine if not r[1].startswith("kiln") and (baseline_name is None or baseline_name in r[1])]
        fastest = min(baselines) if baselines else None
        for _, runner, ms, err in mine:
            ratio = f"{fastest / ms:.2f}x" if fastest else "-"
            print(f"| {case} | {runner} | {ms:.2f} | {ratio} | {err:.1e} |")


def profile_kernels(title: str, run, runs: int = 20) -> None:
    """Print the top CUDA kernels of run by total time; torch's profiler (CUPTI) sees every kernel in
    the process, ONNX Runtime's included."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    run()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            run()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time_total / 1e3
    total = sum(totals.values())
    print(f"\n{title}: {total / runs:.2f} ms of kernel time per run")
    print("| kernel | ms per run | share |\n|---|---|---|")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:15]:
        print(f"| {name[:90]} | {ms / runs:.3f} | {ms / total:.1%} |")
