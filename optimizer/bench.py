"""Latency of an engine at each corner of its profile."""

from __future__ import annotations

import time

import numpy as np

from targets import Engine, Profile


def measure(engine: Engine, feeds, runs: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        engine.run(feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "runs": runs,
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "min_ms": float(np.min(times)),
    }


def bench_profile(engine: Engine, profile: Profile, runs: int, warmup: int, seed: int = 0) -> list[dict]:
    results = []
    for corner, shapes in profile.corners():
        feeds = profile.random_inputs(shapes, seed)
        results.append({"corner": corner, "shapes": {k: list(v) for k, v in shapes.items()}, **measure(engine, feeds, runs, warmup)})
    return results
