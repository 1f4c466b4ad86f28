"""Activation statistics and clipping thresholds: max, percentile and entropy on known distributions,
and the statistics cache (hit, miss, corrupt entries recomputed)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from kiln.calibration import CalibrationSet, Sample
from kiln.calibration.cache import StatsCache, cache_key
from kiln.calibration import stats
from kiln.calibration.stats import BINS, TensorStats, collect, threshold


def _model() -> ir.Model:
    """y = relu(x) * 2, with the Relu output named r."""
    proto = onnx.parser.parse_model("""<ir_version: 9, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { r = Relu(x)  two = Constant<value = float {2.0}>()  y = Mul(r, two) }""")
    return ir.serde.deserialize_model(proto)


def _data(n: int = 6) -> CalibrationSet:
    rng = np.random.default_rng(0)
    return CalibrationSet([Sample(str(i), {"x": rng.standard_normal((64, 4)).astype(np.float32)}) for i in range(n)], "normal")


def test_collect_gives_max_channel_max_and_histograms_and_leaves_the_model_alone():
    model, data = _model(), _data()
    outputs = [v.name for v in model.graph.outputs]
    stats = collect(model, ["x", "r"], data, histograms=True)
    assert [v.name for v in model.graph.outputs] == outputs
    xs = np.stack([s.feeds["x"] for s in data.samples])
    assert stats["x"].amax == pytest.approx(np.abs(xs).max())
    np.testing.assert_allclose(stats["r"].channel_amax, np.maximum(xs, 0).max(axis=(0, 1)), rtol=1e-6)
    assert stats["x"].hist.sum() == xs.size and len(stats["x"].hist) == BINS
    with pytest.raises(KeyError, match=r"no tensor\(s\) \['nope'\]"):
        collect(model, ["nope"], data, histograms=False)


def _normal_stats(n: int = 200_000) -> tuple[TensorStats, np.ndarray]:
    x = np.abs(np.random.default_rng(1).standard_normal(n))
    amax = float(x.max())
    return TensorStats(amax, np.array([amax]), np.histogram(x, bins=BINS, range=(0, amax))[0]), x


def test_thresholds_on_a_normal_distribution():
    stats, x = _normal_stats()
    assert threshold(stats, "max") == stats.amax
    width = stats.amax / BINS
    assert threshold(stats, "percentile", 99.0) == pytest.approx(np.percentile(x, 99.0), abs=width)
    assert threshold(stats, "percentile", 100.0) == pytest.approx(stats.amax, abs=width)
    # The KL search clips the tails of a Gaussian (TensorRT's calibrator lands near 3-4 sigma for 8 bits).
    assert 2.5 < threshold(stats, "entropy", levels=128) < 0.95 * stats.amax
    empty = TensorStats(0.0, np.zeros(1), np.zeros(BINS, np.int64))
    assert threshold(empty, "entropy") == 0.0
    with pytest.raises(ValueError, match="needs histograms"):
        threshold(TensorStats(1.0, np.ones(1)), "percentile")


def test_entropy_keeps_an_outlier_free_uniform_range():
    x = np.random.default_rng(2).uniform(0, 1, 100_000)
    stats = TensorStats(float(x.max()), np.ones(1), np.histogram(x, bins=BINS, range=(0, x.max()))[0])
    assert threshold(stats, "entropy") > 0.9 * stats.amax


def test_cache_round_trip_and_corrupt_entries(tmp_path):
    cache = StatsCache(tmp_path)
    stats = {"a": TensorStats(2.5, np.arange(3, dtype=np.float32), np.arange(BINS)), "b": TensorStats(1.0, np.ones(2, np.float32))}
    key = cache_key("model", "data", "hist", ["a", "b"])
    assert cache.load(key) == (None, "miss")
    assert cache.store(key, stats) is None
    loaded, status = cache.load(key)
    assert status == "hit" and loaded["a"].amax == 2.5 and loaded["b"].hist is None
    np.testing.assert_array_equal(loaded["a"].hist, np.arange(BINS))
    assert cache_key("model", "data", "max", ["a", "b"]) != key != cache_key("other", "data", "hist", ["a", "b"])

    path = cache.path(key)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    loaded, status = cache.load(key)
    assert loaded is None and status.startswith(f"corrupt entry {path.name} recomputed")

    # A changed array with its checksum left as it was.
    cache.store(key, stats)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["amax_0"] = np.asarray(9.0)
    np.savez(path, **arrays)
    loaded, status = cache.load(key)
    assert loaded is None and "checksum does not match" in status

    # An entry written for another key under this name.
    cache.store(cache_key("m2", "d", "max", []), {})
    cache.path(cache_key("m2", "d", "max", [])).replace(path)
    assert cache.load(key)[0] is None


def test_cache_that_cannot_be_written_says_so(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    problem = StatsCache(blocker / "sub").store("k", {"a": TensorStats(1.0, np.ones(1))})
    assert problem and problem.startswith(f"the statistics cache could not be written to {blocker / 'sub'}")


def test_torchs_histograms_match_numpys_and_channel_maxima_are_of_magnitudes():
    """collect histograms with torch's multithreaded kernels where torch is installed: the same counts."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64, 96)).astype(np.float32)
    x[..., 7] *= 40  # an outlier channel
    amax = float(np.abs(x).max())
    assert np.array_equal(stats._channel_amax(x), np.abs(x).reshape(-1, 96).max(axis=0))
    assert np.array_equal(stats._channel_amax(np.float32(3)), np.zeros(1, np.float32))
    want = stats._histogram(x, amax, None)
    got = stats._histogram(x, amax, torch)
    assert got.dtype == np.int64 and got.sum() == x.size and np.abs(got - want).sum() <= 2  # bin edges may round apart
    one, many = stats.TensorStats(amax, None, want), stats.TensorStats(amax, None, got)
    assert stats.threshold(one, "entropy") == pytest.approx(stats.threshold(many, "entropy"), rel=1e-3)
