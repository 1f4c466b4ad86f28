"""The on-disk statistics cache: one .npz file per (model, calibration data, method) key.

An entry is written to a temporary file and renamed into place. It records its key and a sha256 of its
arrays; an entry that does not read back whole, or whose key or checksum differs, is not trusted: the
statistics are computed again and the entry replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from kiln.calibration.arrays import DataError, read_npz
from kiln.calibration.stats import TensorStats

FORMAT = 1  # bump when what is cached, or how it is computed, changes
ENV = "KILN_CACHE_DIR"


def kiln_cache_root() -> Path:
    """Where kiln caches things (engines, calibration statistics, trained examples), each in a folder of
    its own: $KILN_CACHE_DIR, else ~/.cache/kiln ($XDG_CACHE_HOME/kiln if set)."""
    return Path(os.environ.get(ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln")


def default_dir() -> Path:
    return kiln_cache_root() / "calibration"


def cache_key(model_hash: str, data_hash: str, method: str, tensors: list[str]) -> str:
    text = json.dumps({"format": FORMAT, "model": model_hash, "data": data_hash, "method": method, "tensors": sorted(tensors)})
    return hashlib.sha256(text.encode()).hexdigest()


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class StatsCache:
    def __init__(self, directory: Path | None = None):
        self.directory = directory or default_dir()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def load(self, key: str) -> tuple[dict[str, TensorStats] | None, str]:
        """(statistics, "hit") or (None, why not: "miss", or what was wrong with the entry)."""
        path = self.path(key)
        if not path.exists():
            return None, "miss"
        try:
            arrays = read_npz(path)
            meta = json.loads(bytes(arrays.pop("meta")).decode())
            if meta.get("key") != key or meta.get("checksum") != _checksum(arrays):
                raise ValueError("its key or checksum does not match")
            stats = {}
            for i, name in enumerate(meta["tensors"]):
                hist = arrays.get(f"hist_{i}")
                stats[name] = TensorStats(float(arrays[f"amax_{i}"]), arrays[f"channels_{i}"], hist)
            return stats, "hit"
        except (DataError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            return None, f"corrupt entry {path.name} recomputed ({exc})"

    def store(self, key: str, stats: dict[str, TensorStats]) -> str | None:
        """Write the entry; returns why it could not be written (the cache is an optimization), or None."""
        arrays: dict[str, np.ndarray] = {}
        names = list(stats)
        for i, name in enumerate(names):
            s = stats[name]
            arrays[f"amax_{i}"] = np.asarray(s.amax, np.float64)
            arrays[f"channels_{i}"] = np.asarray(s.channel_amax)
            if s.hist is not None:
                arrays[f"hist_{i}"] = s.hist
        meta = {"key": key, "tensors": names, "checksum": _checksum(arrays)}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        tmp = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".entry-", suffix=".npz")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, self.path(key))
            return None
        except OSError as exc:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return f"the statistics cache could not be written to {self.directory}: {exc.strerror or exc}"
