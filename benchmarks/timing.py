"""Wall-clock medians for the benchmark scripts."""

from __future__ import annotations

import time

import numpy as np


def median_ms(fn, runs: int, warmup: int = 1) -> float:
    """Median wall time of fn over runs after warmup calls, in ms; fn must wait for its device itself."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return float(np.median(samples))
