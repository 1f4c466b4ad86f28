"""Activation statistics over a calibration set, and the clipping threshold each method takes from them.

`collect` runs the model on ONNX Runtime with the tensors to quantize added as outputs, and keeps,
per tensor: the largest magnitude, the largest magnitude per channel of the last axis (SmoothQuant
needs it), and, for the percentile and entropy methods, a histogram of magnitudes over [0, amax].

Methods:
- max: the largest magnitude seen.
- percentile: the magnitude below which that percentage of all values lies (default 99.99).
- entropy: the threshold whose 8-bit quantized histogram is closest to the full one in KL divergence,
  the search TensorRT's entropy calibrator does (searching every 16th bin).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from kiln.calibration.samples import CalibrationSet
from kiln.targets.engine import session_options

METHODS = ("max", "percentile", "entropy")
BINS = 2048
DEFAULT_PERCENTILE = 99.99
_ENTROPY_STEP = 16


@dataclasses.dataclass
class TensorStats:
    amax: float
    channel_amax: np.ndarray  # |x| max per index of the last axis
    hist: np.ndarray | None = None  # counts of |x| in BINS equal bins over [0, amax]


def collect(
    model: ir.Model, tensors: Sequence[str], data: CalibrationSet, histograms: bool,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict[str, TensorStats]:  # fmt: skip
    """Statistics of the named tensors of model (left as it was) over every sample of data. With
    histograms, the set runs twice: once for each tensor's range, once to fill its histogram."""
    values = _values(model, tensors)
    with tempfile.TemporaryDirectory(prefix="kiln-calib-") as tmp:
        path = Path(tmp) / "augmented.onnx"
        outputs = list(model.graph.outputs)
        model.graph.outputs.extend(v for v in values if v not in outputs)
        try:
            ir.save(model, path, external_data="augmented.onnx.data", size_threshold_bytes=1024)
        finally:
            model.graph.outputs[:] = outputs
        options = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        session = ort.InferenceSession(os.fspath(path), options, providers=list(providers))
        names = [v.name for v in values]
        stats: dict[str, TensorStats] = {}
        torch = _torch()
        for sample in data.samples:
            for name, x in zip(names, session.run(names, sample.feeds)):
                per_channel = _channel_amax(x)
                s = stats.get(name)
                if s is None:
                    stats[name] = TensorStats(float(per_channel.max()), per_channel)
                else:
                    s.amax = max(s.amax, float(per_channel.max()))
                    s.channel_amax = np.maximum(s.channel_amax, per_channel)
        if histograms:
            for s in stats.values():
                s.hist = np.zeros(BINS, np.int64)
            for sample in data.samples:
                for name, x in zip(names, session.run(names, sample.feeds)):
                    s = stats[name]
                    if s.amax > 0:
                        s.hist += _histogram(x, s.amax, torch)
        del session
    return stats


def _torch():
    """torch where it is installed: its histograms use every core, numpy's one. On DiT-XL/2 at 256²
    batch 8 (470 million activation values a sample), numpy's histograms took most of the 752 s of a
    128-sample INT8 calibration on the H200 machine's host (benchmarks/calib_stats.py)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _channel_amax(x: np.ndarray) -> np.ndarray:
    """|x| max per index of the last axis (one zero for an empty or 0-d tensor), as max(max x, -min x):
    three times faster than reducing |x|, which must be made first."""
    if not np.ndim(x) or not np.size(x):
        return np.zeros(1, np.float32)
    x = np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1])
    return np.maximum(x.max(axis=0), -x.min(axis=0))


_HISTC_CHUNK = 1 << 24  # torch.histc counts in float32, exact up to 2^24 per bin


def _histogram(x: np.ndarray, amax: float, torch) -> np.ndarray:
    """Counts of |x| in BINS equal bins over [0, amax] (the last bin closed, as numpy's)."""
    if torch is None:
        return np.histogram(np.abs(x), bins=BINS, range=(0.0, amax))[0]
    flat = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32).reshape(-1)).abs()
    counts = np.zeros(BINS, np.int64)
    for chunk in flat.split(_HISTC_CHUNK):
        counts += torch.histc(chunk, bins=BINS, min=0.0, max=amax).numpy().astype(np.int64)
    return counts


def _values(model: ir.Model, tensors: Sequence[str]) -> list[ir.Value]:
    found = {v.name: v for node in model.graph for v in node.outputs}
    found.update({v.name: v for v in model.graph.inputs})
    missing = [t for t in tensors if t not in found]
    if missing:
        raise KeyError(f"the model has no tensor(s) {missing}")
    return [found[t] for t in tensors]


def threshold(stats: TensorStats, method: str, percentile: float = DEFAULT_PERCENTILE, levels: int = 128) -> float:
    """The magnitude to clip to (amax of the quantized range). levels: positive quantization levels the
    entropy search assumes (128 for int8)."""
    if method == "max" or stats.amax == 0:
        return stats.amax
    if stats.hist is None:
        raise ValueError(f"the {method} method needs histograms")
    width = stats.amax / BINS
    if method == "percentile":
        cdf = np.cumsum(stats.hist) / max(1, stats.hist.sum())
        return float(min(stats.amax, (np.searchsorted(cdf, percentile / 100.0) + 1) * width))
    if method == "entropy":
        return float(min(stats.amax, (_entropy_bins(stats.hist, levels) + 0.5) * width))
    raise ValueError(f"unknown calibration method {method!r}")


def _entropy_bins(hist: np.ndarray, levels: int) -> int:
    """The number of histogram bins to keep so that the quantized distribution loses least information."""
    hist = hist.astype(np.float64)
    best, best_i = np.inf, len(hist)
    for i in range(levels, len(hist) + 1, _ENTROPY_STEP):
        candidate = hist[:i]
        p = candidate.copy()
        p[-1] += hist[i:].sum()  # the reference clips what lies beyond the threshold onto it
        # The candidate: the bins below the threshold (without the clipped mass) merged into `levels`
        # quantized bins, each spread back evenly over the bins where the reference has mass.
        group = np.arange(i) * levels // i
        held = p > 0
        mass = np.bincount(group, weights=candidate, minlength=levels)
        count = np.bincount(group, weights=held, minlength=levels)
        q = np.where(held, mass[group] / np.maximum(count[group], 1), 0.0)
        divergence = _kl(_smooth(p), _smooth(q))
        if divergence < best:
            best, best_i = divergence, i
    return best_i


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """p normalized, with eps moved onto its empty bins so that the divergence stays finite."""
    p = p / max(p.sum(), 1e-300)
    zeros = p == 0
    n_zero = int(zeros.sum())
    if n_zero == 0 or n_zero == p.size:
        return p
    return np.where(zeros, eps, np.maximum(p - eps * n_zero / (p.size - n_zero), 1e-12))


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / np.maximum(q[keep], 1e-300))))
