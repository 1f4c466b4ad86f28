"""Engines several test folders use, built once per session by `kiln optimize` from kiln's own examples."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest

from kiln.optimizer.cli import main

# Under pytest-xdist (README's `-n 2 --dist loadfile`: each file on one worker, so its module fixtures are
# built once), each worker runs one thread: two workers on CI's two cores, with ONNX Runtime's, PyTorch's
# and TensorFlow's pools sized for every core, would oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for variable in ("KILN_THREADS", "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ.setdefault(variable, "1")
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory) -> Path:
    """kiln's caches go to a folder of this run, not the user's ~/.cache/kiln (this one for the session's
    fixtures; each module and each test gets its own, below)."""
    root = tmp_path_factory.mktemp("kiln-cache")
    os.environ["KILN_CACHE_DIR"] = str(root)
    return root


def _cache_sharing_calibration(session: Path, root: Path) -> Path:
    """root as a kiln cache whose calibration statistics are the session's."""
    (session / "calibration").mkdir(exist_ok=True)
    (root / "calibration").symlink_to(session / "calibration")
    return root


@pytest.fixture(autouse=True, scope="module")
def _module_cache(_session_cache, tmp_path_factory):
    """A test module's own fixtures build into a cache of their own: what another module built (in the
    same worker, in whatever order) is neither a hit nor an entry a report could mention."""
    root = _cache_sharing_calibration(_session_cache, tmp_path_factory.mktemp("kiln-cache-module"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KILN_CACHE_DIR", str(root))
        yield root


@pytest.fixture(autouse=True)
def _kiln_cache(_session_cache, _module_cache, tmp_path_factory, monkeypatch):
    """Each test has a cache of its own (an engine another test built is no hit), sharing the session's
    calibration statistics."""
    root = _cache_sharing_calibration(_session_cache, tmp_path_factory.mktemp("kiln-cache-test"))
    monkeypatch.setenv("KILN_CACHE_DIR", str(root))


def quiet(*args) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main([str(a) for a in args] + ["-q"])


@pytest.fixture(scope="session")
def film_engine(tmp_path_factory) -> Path:
    """The small FILM SavedModel's engine, for 64x64 frames (smaller ones are padded)."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    root = tmp_path_factory.mktemp("film")
    assert quiet("example", "film", root / "film") == 0
    out = root / "engine"
    assert quiet("optimize", root / "film", "-o", out, "--shapes", "height=64", "--shapes", "width=64", "--bench-runs", "0") == 0
    return out


@pytest.fixture(scope="session")
def vae_engine(tmp_path_factory) -> Path:
    """The tiny AutoencoderKL's decoder engine: latents [1..4, 4, 8, 8]."""
    pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("vae")
    assert quiet("example", "vae", root / "vae") == 0
    out = root / "engine"
    assert quiet("optimize", root / "vae", "-o", out, "--shapes", "batch=1..2..4", "--shapes", "height=8", "--shapes", "width=8", "--bench-runs", "0") == 0
    return out


@pytest.fixture(scope="session")
def block_engine(tmp_path_factory) -> Path:
    """The example transformer block's cpu engine: x [1..4, 1..64, 64]."""
    root = tmp_path_factory.mktemp("block")
    assert quiet("example", "block", root / "ex") == 0
    out = root / "engine"
    assert quiet("optimize", root / "ex" / "model.onnx", "-o", out, "--bench-runs", "0") == 0
    return out
