"""Reading .npz array files safely, and checking what they hold."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Array data that cannot be used; the message names the file and the array."""


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays in an .npz file, loaded without pickle (object arrays are refused)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not an .npz file (or it is truncated); write it with numpy.savez") from None
    except ValueError as exc:
        raise DataError(f"{path} holds an array kiln will not read ({exc}); save plain numeric arrays") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} could not be read: {exc}") from None


def check_finite(arrays: dict[str, np.ndarray], source: str) -> None:
    """Raise DataError naming the first array holding NaN or infinity."""
    for name, array in arrays.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad = int(np.size(array) - np.isfinite(array).sum())
            raise DataError(f"{source}: array {name!r} holds {bad} NaN or infinite value(s)")
