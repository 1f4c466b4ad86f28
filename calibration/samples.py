"""Calibration sets: samples of a model's inputs, read from .npz files and checked against the model.

A sample is one feed of every model input. A folder holds one sample per .npz file (in name order);
one .npz file holds one sample, or a stack of them when every array has one more leading axis than
its input has dims.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kiln.calibration.arrays import DataError, read_npz
from kiln.targets.profile import derived_mismatch


@dataclasses.dataclass
class Sample:
    label: str  # where it came from: "calib/003.npz", "calib.npz[4]", "step 3 of 8, seed 1"
    feeds: dict[str, np.ndarray]


@dataclasses.dataclass
class CalibrationSet:
    samples: list[Sample]
    source: str  # what the set was read or made from, for the report
    # Real inputs kept out of calibration, on which the quality check and the --quality search measure.
    held_out: list[Sample] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def digest(self) -> str:
        """sha256 over every sample's input names, dtypes, shapes and bytes (the statistics cache key)."""
        h = hashlib.sha256()
        for sample in self.samples:
            for name in sorted(sample.feeds):
                a = np.ascontiguousarray(sample.feeds[name])
                h.update(f"{name}:{a.dtype.str}:{a.shape}\n".encode())
                h.update(a.tobytes())
        return h.hexdigest()

    def summary(self) -> dict:
        first = self.samples[0].feeds if self.samples else {}
        return {"source": self.source, "samples": len(self.samples), "held_out": len(self.held_out),
                "inputs": {n: {"dtype": a.dtype.name, "shape": list(a.shape)} for n, a in sorted(first.items())}}  # fmt: skip


def read_calibration(path: Path, inputs: Sequence, limit: int | None = None) -> CalibrationSet:
    """The samples in a folder of .npz files or in one .npz file, at most limit of them. inputs are the
    model's input specs (name, dtype, shape), used to tell a stack of samples from one sample."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not files:
            raise DataError(f"{path} holds no .npz files: a calibration folder holds one sample per .npz file")
        samples = [Sample(f"{path.name}/{f.name}", read_npz(f)) for f in files[:limit]]
    elif path.exists():
        arrays = read_npz(path)
        ranks = {spec.name: len(spec.shape) for spec in inputs}
        stacked = bool(arrays) and all(name in ranks and a.ndim == ranks[name] + 1 for name, a in arrays.items())
        if stacked:
            counts = {name: a.shape[0] for name, a in arrays.items()}
            if len(set(counts.values())) != 1:
                raise DataError(f"{path}: the stacked arrays hold different numbers of samples ({_fmt(counts)})")
            n = next(iter(counts.values()))
            samples = [Sample(f"{path.name}[{i}]", {name: a[i] for name, a in arrays.items()}) for i in range(n)][:limit]
        else:
            samples = [Sample(path.name, arrays)]
    else:
        raise DataError(f"{path}: no such file or folder")
    return CalibrationSet(samples, str(path))


def check_calibration(data: CalibrationSet, inputs: Sequence, dims: Mapping) -> None:
    """Raise DataError, naming the sample and the input, for: an empty set; a sample that misses an
    input, has one the model lacks, or gives one the wrong dtype, rank or size (a static dim, or a
    dynamic one outside dims' min..max); NaN or infinity; and a float input constant across the whole
    set (its range would be zero, and so would its scale)."""
    if not data.samples:
        raise DataError(f"calibration set {data.source} is empty")
    names = {spec.name for spec in inputs}
    takes = ", ".join(f"{s.name} {s.dtype} {list(s.shape)}" for s in inputs)
    for sample in data.samples:
        where = f"calibration sample {sample.label}"
        missing, extra = sorted(names - set(sample.feeds)), sorted(set(sample.feeds) - names)
        if missing or extra:
            what = "; ".join(filter(None, [missing and f"missing input(s) {missing}", extra and f"unknown input(s) {extra}"]))
            raise DataError(f"{where}: {what} (the model takes {takes})")
        for spec in inputs:
            problem = check_array(sample.feeds[spec.name], spec, dims)
            if problem:
                raise DataError(f"{where}: input {spec.name!r} {problem}")
        if mismatch := derived_mismatch(inputs, {name: array.shape for name, array in sample.feeds.items()}):
            raise DataError(f"{where}: {mismatch}")
    for spec in inputs:
        if np.dtype(spec.dtype).kind != "f":
            continue  # integer inputs (labels, steps) are not quantized: a constant one is fine
        lo = min(float(s.feeds[spec.name].min()) for s in data.samples if s.feeds[spec.name].size)
        hi = max(float(s.feeds[spec.name].max()) for s in data.samples if s.feeds[spec.name].size)
        if lo == hi:
            raise DataError(f"calibration set {data.source}: input {spec.name!r} is {lo:g} in every sample, "
                            "so its range and scale would be zero; calibrate on real inputs")  # fmt: skip


def check_array(array: np.ndarray, spec, dims: Mapping) -> str | None:
    """Why array cannot feed spec (dtype, rank, a static size, a dynamic size outside dims, NaN or
    infinity), or None."""
    shape = list(spec.shape)
    if array.dtype.name != spec.dtype:
        return f"is {array.dtype.name}, the model takes {spec.dtype} {shape}"
    if array.ndim != len(shape):
        return f"has shape {list(array.shape)}, the model takes {shape}"
    for axis, (want, got) in enumerate(zip(shape, array.shape)):
        if isinstance(want, int) and want != got:
            return f"has shape {list(array.shape)}, the model takes {shape} (axis {axis} must be {want})"
        r = dims.get(want) if isinstance(want, str) else None
        if r is not None and not r.min <= got <= r.max:
            return f"axis {axis} ({want}) is {got}, outside the profile's {r.min}..{r.max}"
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        return f"holds {int(array.size - np.isfinite(array).sum())} NaN or infinite value(s)"
    return None


def _fmt(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items())
