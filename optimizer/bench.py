"""Latency of an engine at each corner of its profile."""

from __future__ import annotations

import time

import numpy as np

from kiln import targets
from kiln.optimizer.errors import first_line
from kiln.targets import Engine, EngineSet, Profile
from kiln.targets.cost import RunWork, cost_rows
from kiln.targets.work import tensor_bytes


def samples_ms(fn, runs: int, warmup: int) -> list[float]:
    """Wall time of each of runs calls of fn after warmup calls, in ms; fn must wait for its device itself."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn, runs: int, warmup: int = 1) -> float:
    return float(np.median(samples_ms(fn, runs, warmup)))


def measure(engine: Engine, feeds, runs: int, warmup: int) -> dict[str, float]:
    """Latency of one run. A GPU engine is timed on device-resident inputs and outputs (the copies are
    the serving pipeline's job); a CPU engine from host arrays to host arrays."""
    run = engine.device_runner(feeds) if engine.device_resident else lambda: engine.run(feeds)
    times = samples_ms(run, runs, warmup)
    return {
        "io": "device" if engine.device_resident else "host",
        "runs": runs,
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "min_ms": float(np.min(times)),
    }


def bench_profile(engine: Engine, runs: int, warmup: int, seed: int = 0) -> list[dict]:
    """A row per corner of the engine's profile; of an engine of several profiles, per corner of each
    (EngineSet.label), run on that profile's session."""
    if isinstance(engine, EngineSet):
        return [{**row, "corner": engine.label(i, row["corner"])} for i, member in enumerate(engine.members)
                for row in bench_profile(member, runs, warmup, seed)]  # fmt: skip
    results, profile = [], engine.profile
    for corner, shapes in profile.corners():
        feeds = engine.as_input_types(profile.random_inputs(shapes, seed))
        results.append({"corner": corner, "shapes": {k: list(v) for k, v in shapes.items()}, **measure(engine, feeds, runs, warmup)})
    return results


def compute_format(report: dict) -> str:
    """The format an engine's matrix products run in, from its report: its precision, or FP8 where the
    FP8 GEMMs were lowered to GemmFloat8. ONNX Runtime's CUDA provider runs Q/DQ (INT8 or FP8) matrix
    products as a dequantize and a float GEMM, and its CPU provider INT8 as INT8."""
    ran = {r["name"] for r in report.get("passes", []) if r.get("modified")}
    quantized = (report.get("quantization") or {}).get("format")
    if quantized == "fp8" and "lower-fp8-gemm" in ran:
        return "fp8"
    if quantized == "int8" and report.get("target", {}).get("family") == "cpu":
        return "int8"
    return report.get("precision", "fp32")


def opt_row(latency: list[dict], profile: Profile) -> dict | None:
    """The latency row at the profile's opt shape: the "opt" corner, a static engine's one row, or of an
    engine of several profiles the row at the opt shape of them all (the most frequent request's),
    whichever profile's corner it is."""
    opt = {name: list(shape) for name, shape in profile.shapes(profile.sizes("opt")).items()}
    return next((r for r in latency if r["corner"] == "opt"), None) or next((r for r in latency if r["shapes"] == opt), None) \
        or (latency[0] if len(latency) == 1 else None)  # fmt: skip


def bench_or_note(engine: Engine, runs: int, warmup: int, seed: int, notes: list[str]) -> list[dict]:
    """bench_profile's rows, or none and a note when the engine cannot run on random inputs (the model
    may need valid indices or scales; see --int-range)."""
    try:
        return bench_profile(engine, runs, warmup, seed)
    except Exception as exc:  # onnxruntime's errors on data the model cannot take
        notes.append(f"the benchmark was not run: the engine fails on random inputs ({type(exc).__name__}: {first_line(exc)})")
        return []


def cost_section(work: dict | None, latency: list[dict], engine: Engine, compute_format: str) -> dict:
    """Cost per 1,000 results at the opt shape, from latency rows of bench_profile and the build's work
    (corner -> FLOPs and weight bytes; None: no report): measured on this machine's GPU, estimated for
    the others. A result is one item of the batch (the size of the dim named batch; 1 without one)."""
    device, gpu = targets.gpu_here()
    measured = opt_row(latency, engine.profile) if latency else None  # a deferred build has no engine here
    if measured is None or gpu is None or measured.get("io") != "device":
        why = ("the engine was not benchmarked" if measured is None else "it ran on the CPU" if measured.get("io") != "device"
               else f"kiln has no price for {device}")  # fmt: skip
        return {"measured_on": None, "reason": f"no cost figures: {why}", "rows": []}
    if work is None:
        return {"measured_on": None, "reason": "no cost figures: the engine has no report.json beside it (the build's FLOP count is there)", "rows": []}
    corner = work.get(measured["corner"]) or work.get("opt")  # of several profiles, the row is one's corner
    if not corner:
        return {"measured_on": None, "reason": "no cost figures: the build counted no FLOPs (an older kiln, or a graph it could not count)", "rows": []}
    profile = engine.profile
    sizes = profile.sizes("opt")
    try:
        io_bytes = tensor_bytes((*engine.inputs, *engine.outputs), sizes)
    except (KeyError, TypeError, ValueError):  # an output dim derived from the inputs': inputs alone
        io_bytes = tensor_bytes(engine.inputs, sizes)
    run = RunWork(flops=corner["flops"], bytes=corner["weight_bytes"] + io_bytes,
                  results=sizes.get("batch", 1),
                  compute_format=compute_format)  # fmt: skip
    rows = cost_rows(run, measured["median_ms"], gpu, list(targets.GPUS.values()))
    shape = "static" if profile.is_static() else "opt"
    return {"measured_on": gpu.name, "gpu": device, "shape": shape, "results_per_run": run.results,
            "flops_per_run": run.flops, "bytes_per_run": run.bytes, "compute_format": run.compute_format, "rows": rows}  # fmt: skip
