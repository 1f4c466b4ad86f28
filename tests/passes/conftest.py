import sys
from pathlib import Path

import onnx_ir as ir
import pytest

# Make passes_helpers importable whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def block() -> ir.Model:
    """The seeded example transformer block (35 nodes), as an onnx-ir model."""
    from optimizer.examples import transformer_block

    return ir.serde.deserialize_model(transformer_block(seed=0))


@pytest.fixture
def block_feeds():
    """Seeded input for the block: x float32 [2, 8, 64]."""
    import numpy as np

    return {"x": np.random.default_rng(1).standard_normal((2, 8, 64)).astype(np.float32)}


@pytest.fixture(scope="session")
def film(tmp_path_factory) -> dict:
    """The small FILM SavedModel (seed 0), tf2onnx's conversion of it (once per run), and the loaded SavedModel."""
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    from optimizer import film_net as F
    from optimizer.importers.savedmodel import convert

    root = tmp_path_factory.mktemp("film")
    saved = F.export_saved_model(root / "saved_model", F.FilmConfig.small(), seed=0)
    onnx_path = root / "raw.onnx"
    convert(saved, onnx_path, "serving_default", 17, timeout=600)
    return {"saved": saved, "onnx": onnx_path, "tf": F.load_saved_model(saved)}
