"""Latency of an engine at each corner of its profile."""

from __future__ import annotations

import time

import numpy as np

from kiln.targets import Engine, Profile


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


def bench_profile(engine: Engine, profile: Profile, runs: int, warmup: int, seed: int = 0) -> list[dict]:
    results = []
    for corner, shapes in profile.corners():
        feeds = engine.as_input_types(profile.random_inputs(shapes, seed))
        results.append({"corner": corner, "shapes": {k: list(v) for k, v in shapes.items()}, **measure(engine, feeds, runs, warmup)})
    return results
