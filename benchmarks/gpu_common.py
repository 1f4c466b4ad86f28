"""What the GPU benchmarks share: building a kiln engine the way `kiln optimize` does, and timing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx_ir as ir


def kiln_engine(model: ir.Model, work: Path, target, precision: str, dims: dict, calibration=None, quantize=None,
                disable=(), **target_changes):  # fmt: skip
    """kiln's engine for target from model (changed in place), built in work through the same function
    as `kiln optimize`. dims maps each dynamic dim to a DimRange; when every range is one size, the shapes
    are frozen and a GPU engine runs as one CUDA graph. quantize ("int8", "fp8") quantizes, calibrated
    on calibration (a kiln.calibration.CalibrationSet). target_changes override target fields (e.g.
    provider_options) for a variant; disable names passes to skip. Returns (engine, pass records)."""
    from kiln.optimizer.build import build_engine
    from kiln.optimizer.config import Options
    from kiln.optimizer.shapes import input_specs
    from kiln.targets import Profile

    target = dataclasses.replace(target, **target_changes)
    work.mkdir(parents=True, exist_ok=True)
    options = Options(precision=precision, quantize=quantize, disable_passes=list(disable))
    built = build_engine(model, work, target, options, Profile(input_specs(model), dims), calibration=calibration)
    static = " static" if built.config.cuda_graph or all(r.min == r.max for r in dims.values()) else ""
    print(f"  kiln {target.name} {precision}{static}: passes {built.passes_s:.0f} s, build+load {built.build_s:.0f} s")
    return built.engine, built.records


def baseline_engine(session):
    """An ONNX Runtime session that kiln did not build, run through the same binding as kiln's engines
    (inputs and outputs on the GPU): `engine.device_runner(feeds)` and `engine.run(feeds)`."""
    from kiln.targets import Engine

    return Engine.from_session(session, "cuda")


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


def kernel_kind(name: str) -> str:
    """attention, GEMM or other, from a CUDA kernel's name (cuDNN's and flash kernels, cuBLAS's nvjet and
    CUTLASS GEMMs, Triton's matmul templates): what bounds a runner that cannot change these kernels."""
    lower = name.lower()
    if lower.startswith("triton_"):  # named after the ops they fuse, attention's neighbours included
        return "GEMM" if lower.startswith(("triton_tem_fused_mm", "triton_tem_fused_addmm")) else "other"
    if any(k in lower for k in ("sdpa", "flash", "fmha", "attention")):
        return "attention"
    if any(k in lower for k in ("gemm", "nvjet", "cutlass", "xmma")):
        return "GEMM"
    return "other"


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
    kinds: dict[str, float] = {}
    for name, ms in totals.items():
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms / runs
    print(f"\n{title}: {total / runs:.2f} ms of kernel time per run: "
          + ", ".join(f"{kind} {ms:.2f} ms" for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])))
    print("| kernel | ms per run | share |\n|---|---|---|")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:15]:
        print(f"| {name[:90]} | {ms / runs:.3f} | {ms / total:.1%} |")
