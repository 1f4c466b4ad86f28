"""calibration.arrays: reading .npz files without pickle, and checking arrays are finite."""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest

from kiln.calibration.arrays import DataError, check_finite, read_npz


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "images": rng.standard_normal((2, 3, 4, 4)).astype(np.float32),
        "ids": rng.integers(0, 100, size=(2, 7), dtype=np.int64),
        "scale": np.float16(0.5) * np.ones((), np.float16),
    }


def not_npz(path) -> str:
    return f"{path} is not an .npz file (or it is truncated); write it with numpy.savez"


def read_error(path) -> DataError:
    with pytest.raises(DataError) as info:
        read_npz(path)
    return info.value


# read_npz


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_read_good_file(tmp_path, save):
    want = arrays()
    path = tmp_path / "calib.npz"
    save(path, **want)
    got = read_npz(path)
    assert list(got) == ["images", "ids", "scale"]
    for name, array in want.items():
        assert type(got[name]) is np.ndarray
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        np.testing.assert_array_equal(got[name], array)


def test_read_empty_archive(tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path)
    assert read_npz(path) == {}


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    assert str(read_error(path)) == f"{path}: no such file"


def test_directory(tmp_path):
    assert str(read_error(tmp_path)) == f"{tmp_path}: no such file"


def test_random_bytes(tmp_path):
    path = tmp_path / "calib.npz"
    path.write_bytes(np.random.default_rng(99).bytes(1024))
    assert str(read_error(path)) == not_npz(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, not an npz\n", pickle.dumps({"images": [1.0, 2.0]}), b"\x93NUMPY"],
    ids=["empty", "text", "pickle", "npy-magic"],
)
def test_other_files(tmp_path, content):
    path = tmp_path / "calib.npz"
    path.write_bytes(content)
    assert str(read_error(path)) == not_npz(path)


def test_npy_file_is_not_npz(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, arrays()["images"])
    assert str(read_error(path)) == not_npz(path)


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_npz(tmp_path, fraction):
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    assert str(read_error(path)) == not_npz(path)


def test_object_array_refused(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, images=arrays()["images"], meta=np.array([{"label": "cat"}, None], dtype=object))
    err = read_error(path)
    assert str(err).startswith(f"{path} holds an array kiln will not read (")
    assert "allow_pickle=False" in str(err)
    assert str(err).endswith("); save plain numeric arrays")


def test_zip_of_other_files_refused(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, images=arrays()["images"])
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("README.txt", "calibration frames")
        archive.writestr("labels.json", "[]")
    err = read_error(path)
    assert str(err) == f"{path} holds 'README.txt', 'labels.json', which are not .npy arrays; write it with numpy.savez"


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# check_finite


def test_check_finite_passes_finite_and_integer_arrays():
    check_finite(arrays(), "calib.npz")
    check_finite({"ids": np.array([np.iinfo(np.int64).max]), "flags": np.array([True, False])}, "calib.npz")


def test_check_finite_nan():
    data = arrays()
    data["images"][0, 0, 0, :3] = np.nan
    with pytest.raises(DataError) as info:
        check_finite(data, "calib.npz")
    assert str(info.value) == "calib.npz: array 'images' holds 3 NaN or infinite value(s)"


def test_check_finite_inf_counts_nan_and_inf():
    data = {"ok": np.zeros(4, np.float32), "frames": np.array([1.0, np.inf, -np.inf, np.nan, 2.0], np.float64)}
    with pytest.raises(DataError) as info:
        check_finite(data, "frames.npz")
    assert str(info.value) == "frames.npz: array 'frames' holds 3 NaN or infinite value(s)"


def test_check_finite_names_first_bad_array():
    data = {
        "a": np.ones(3, np.float32),
        "b": np.array([np.inf], np.float16),
        "c": np.full(5, np.nan, np.float32),
    }
    with pytest.raises(DataError) as info:
        check_finite(data, "src")
    assert str(info.value) == "src: array 'b' holds 1 NaN or infinite value(s)"


def test_check_finite_complex():
    with pytest.raises(DataError) as info:
        check_finite({"z": np.array([1 + 1j, complex(0, np.inf)])}, "src")
    assert str(info.value) == "src: array 'z' holds 1 NaN or infinite value(s)"


def test_check_finite_after_read(tmp_path):
    path = tmp_path / "calib.npz"
    data = arrays()
    data["images"][1] = np.inf  # 3 * 4 * 4 values
    np.savez(path, **data)
    with pytest.raises(DataError) as info:
        check_finite(read_npz(path), str(path))
    assert str(info.value) == f"{path}: array 'images' holds 48 NaN or infinite value(s)"
