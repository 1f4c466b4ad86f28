"""Reading .npz array files safely, and checking what they hold."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np


# A zip file's first bytes: a local file header, or the end record of an empty archive.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


class DataError(ValueError):
    """Array data that cannot be used; the message names the file and the array."""


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays in an .npz file, loaded without pickle (object arrays are refused)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    not_npz = f"{path} is not an .npz file (or it is truncated); write it with numpy.savez"
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise DataError(f"{path} could not be read: {exc}") from None
    # np.load reads anything else (a .npy file, a pickle, random bytes) as something other than an archive.
    if magic not in _ZIP_MAGIC:
        raise DataError(not_npz)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except zipfile.BadZipFile:
        raise DataError(not_npz) from None
    except ValueError as exc:
        raise DataError(f"{path} holds an array kiln will not read ({exc}); save plain numeric arrays") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} could not be read: {exc}") from None
    # np.load hands back the raw bytes of zip members that are not .npy arrays.
    others = [name for name, value in arrays.items() if not isinstance(value, np.ndarray)]
    if others:
        names = ", ".join(map(repr, others))
        raise DataError(f"{path} holds {names}, which are not .npy arrays; write it with numpy.savez")
    return arrays


def check_finite(arrays: dict[str, np.ndarray], source: str) -> None:
    """Raise DataError naming the first array holding NaN or infinity."""
    for name, array in arrays.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad = int(np.size(array) - np.isfinite(array).sum())
            raise DataError(f"{source}: array {name!r} holds {bad} NaN or infinite value(s)")
