"""Calibration sets: reading .npz folders, files and stacks, and refusing each kind of bad sample."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.calibration import CalibrationSet, DataError, Sample, check_calibration, read_calibration
from kiln.targets import DimRange, TensorSpec

INPUTS = (TensorSpec("x", "float32", ("batch", 8)), TensorSpec("t", "int64", ("batch",)))
DIMS = {"batch": DimRange(1, 2, 4)}


def _sample(seed: int, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 8)).astype(np.float32), "t": np.full(batch, 3, np.int64)}


def test_folder_holds_one_sample_per_file_in_name_order(tmp_path):
    for i in (2, 0, 1):
        np.savez(tmp_path / f"{i:03d}.npz", **_sample(i))
    (tmp_path / "notes.txt").write_text("ignored")
    data = read_calibration(tmp_path, INPUTS)
    assert [s.label for s in data.samples] == [f"{tmp_path.name}/000.npz", f"{tmp_path.name}/001.npz", f"{tmp_path.name}/002.npz"]
    np.testing.assert_array_equal(data.samples[1].feeds["x"], _sample(1)["x"])
    assert len(read_calibration(tmp_path, INPUTS, limit=2)) == 2
    check_calibration(data, INPUTS, DIMS)


def test_one_file_is_one_sample_or_a_stack(tmp_path):
    np.savez(tmp_path / "one.npz", **_sample(0))
    assert len(read_calibration(tmp_path / "one.npz", INPUTS)) == 1
    stack = {k: np.stack([_sample(i)[k] for i in range(5)]) for k in ("x", "t")}
    np.savez(tmp_path / "stack.npz", **stack)
    data = read_calibration(tmp_path / "stack.npz", INPUTS)
    assert [s.label for s in data.samples] == [f"stack.npz[{i}]" for i in range(5)]
    np.testing.assert_array_equal(data.samples[3].feeds["x"], _sample(3)["x"])


def test_digest_follows_the_data():
    a = CalibrationSet([Sample("a", _sample(0))], "a")
    assert a.digest() == CalibrationSet([Sample("b", _sample(0))], "b").digest()
    changed = _sample(0)
    changed["x"][0, 0] += 1e-3
    assert a.digest() != CalibrationSet([Sample("a", changed)], "a").digest()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("t"), "calibration sample bad: missing input(s) ['t'] (the model takes x float32 ['batch', 8], t int64 ['batch'])"),
        (lambda s: s.update(y=s["x"]), "calibration sample bad: unknown input(s) ['y']"),
        (lambda s: s.update(x=s["x"].astype(np.float64)), "calibration sample bad: input 'x' is float64, the model takes float32 ['batch', 8]"),
        (lambda s: s.update(x=s["x"][:, :4]), "calibration sample bad: input 'x' has shape [2, 4], the model takes ['batch', 8] (axis 1 must be 8)"),
        (lambda s: s.update(x=s["x"][0]), "calibration sample bad: input 'x' has shape [8], the model takes ['batch', 8]"),
        (lambda s: s.update(x=np.zeros((5, 8), np.float32), t=np.zeros(5, np.int64)),
         "calibration sample bad: input 'x' axis 0 (batch) is 5, outside the profile's 1..4"),
        (lambda s: s["x"].__setitem__((0, 0), np.nan), "calibration sample bad: input 'x' holds 1 NaN or infinite value(s)"),
        (lambda s: s["x"].__setitem__((1, 2), np.inf), "calibration sample bad: input 'x' holds 1 NaN or infinite value(s)"),
    ],
)
def test_bad_samples_are_refused_naming_sample_and_input(change, message):
    good, bad = _sample(0), _sample(1)
    change(bad)
    data = CalibrationSet([Sample("good", good), Sample("bad", bad)], "set")
    with pytest.raises(DataError) as info:
        check_calibration(data, INPUTS, DIMS)
    assert str(info.value).startswith(message), str(info.value)


def test_empty_and_constant_sets_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"^calibration set none is empty$"):
        check_calibration(CalibrationSet([], "none"), INPUTS, DIMS)
    flat = [Sample(str(i), {"x": np.full((2, 8), 0.5, np.float32), "t": np.full(2, i, np.int64)}) for i in range(3)]
    with pytest.raises(DataError, match=r"input 'x' is 0.5 in every sample, so its range and scale would be zero"):
        check_calibration(CalibrationSet(flat, "flat"), INPUTS, DIMS)
    # A constant integer input (a fixed timestep) is fine: it is not quantized.
    check_calibration(CalibrationSet([Sample("a", _sample(0)), Sample("b", _sample(1))], "s"), INPUTS, DIMS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .npz files"):
        read_calibration(tmp_path / "empty", INPUTS)
    with pytest.raises(DataError, match="no such file or folder"):
        read_calibration(tmp_path / "missing", INPUTS)
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="is not an .npz file"):
        read_calibration(tmp_path / "cut.npz", INPUTS)


def test_a_stack_with_uneven_counts_is_refused(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.zeros((3, 2, 8), np.float32), t=np.zeros((2, 2), np.int64))
    with pytest.raises(DataError, match=r"different numbers of samples \(x: 3, t: 2\)"):
        read_calibration(tmp_path / "s.npz", INPUTS)
