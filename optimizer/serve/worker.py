"""One engine in one process, as a `kiln serve` replica or a `kiln batch` actor holds it: loaded and run once
before it takes work (so ready means ready), tensor requests checked and batched by shape, and jobs run
through the frame pipeline. Nothing here knows Ray; the callers run it one call at a time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kiln.calibration import DataError, check_finite
from kiln.optimizer.serve.job_requests import Roots, run_job
from kiln.optimizer.serve.protocol import ProtocolError
from kiln.targets import EngineError


def batch_dim(engine) -> str | None:
    """The dynamic dim that is axis 0 of every input and every output, which requests can be stacked along
    (engine: an Engine, or the BuildConfig of one)."""
    firsts = {spec.shape[0] if spec.shape else None for spec in (*engine.inputs, *engine.outputs)}
    (first,) = firsts if len(firsts) == 1 else (None,)
    return first if isinstance(first, str) else None


class EngineWorker:
    def __init__(self, engine_dir: Path, roots: Roots | None = None):
        from kiln.optimizer.serve.jobs import open_backend

        start = time.perf_counter()
        self.backend = open_backend(engine_dir)
        loaded = time.perf_counter()
        self.engine, self.roots = self.backend.engine, roots
        self.batch_dim = batch_dim(self.engine)
        self.batch_max = self.engine.profile.dims[self.batch_dim].max if self.batch_dim else 1
        profile = self.engine.profile
        shapes = profile.shapes(profile.sizes("opt"))
        self.backend.infer({s.name: np.zeros(shapes[s.name], s.dtype) for s in self.engine.inputs})
        self.startup = {"load_s": loaded - start, "first_run_s": time.perf_counter() - loaded}
        self.runs = self.items = 0

    def check(self, feeds: Mapping[str, np.ndarray]) -> None:
        """ProtocolError for inputs the engine cannot take or was not verified at, or that hold NaN."""
        try:
            warnings = self.engine.check_feeds(feeds, "the request")
            check_finite(dict(feeds), "the request")
        except (EngineError, DataError) as exc:
            raise ProtocolError(str(exc).replace("\n  hint: ", "; ")) from None
        if warnings:
            raise ProtocolError(f"{warnings[0]}; kiln serve runs only the shapes the engine was verified at")

    def infer(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Each request's outputs. Requests of one shape are stacked along the batch dim, up to its max,
        and run together; the others run alone."""
        results: list[dict | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, feeds in enumerate(requests):
            key = tuple((name, a.dtype.str, a.shape[1:] if self.batch_dim else a.shape) for name, a in sorted(feeds.items()))
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            for run in self._runs(requests, members):
                first = requests[run[0]]
                stacked = first if len(run) == 1 else {name: np.concatenate([requests[i][name] for i in run]) for name in first}
                outputs = self.backend.infer(stacked)
                self.runs, self.items = self.runs + 1, self.items + len(run)
                start = 0
                for i in run:
                    count = self._items(requests[i])
                    results[i] = {k: v[start : start + count] for k, v in outputs.items()} if self.batch_dim else outputs
                    start += count
        return results

    def _items(self, feeds: Mapping[str, np.ndarray]) -> int:
        """How many items a request holds along the batch dim (1 for an engine without one)."""
        return len(next(iter(feeds.values()))) if self.batch_dim else 1

    def _runs(self, requests, members: list[int]) -> list[list[int]]:
        """members packed in order into runs of at most batch_max items."""
        if not self.batch_dim:
            return [[i] for i in members]
        runs, size = [], self.batch_max + 1
        for i in members:
            count = self._items(requests[i])
            if size + count > self.batch_max:
                runs.append([])
                size = 0
            runs[-1].append(i)
            size += count
        return runs

    def job(self, kind: str, spec: dict, reuse: bool = False) -> dict:
        if self.roots is None:
            raise ProtocolError("this server runs no jobs: it was started without --input-root and --output-root", status=404)
        return run_job(self.backend, kind, spec, self.roots, reuse)
