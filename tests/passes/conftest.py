import sys
from pathlib import Path

import onnx_ir as ir
import pytest

# Make passes_helpers importable whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def block() -> ir.Model:
    """The seeded example transformer block (35 nodes), as an onnx-ir model."""
    from kiln.optimizer.examples import transformer_block

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
    from kiln.optimizer.examples import film_net as F
    from kiln.optimizer.importers.savedmodel import convert

    root = tmp_path_factory.mktemp("film")
    saved = F.export_saved_model(root / "saved_model", F.FilmConfig.small(), seed=0)
    onnx_path = root / "raw.onnx"
    convert(saved, onnx_path, "serving_default", 17, timeout=600)
    return {"saved": saved, "onnx": onnx_path, "tf": F.load_saved_model(saved)}


def _export_tiny(directory, class_name: str):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from kiln.optimizer.examples.tiny_diffusers import tiny_model
    from kiln.optimizer.importers.diffusers import export
    from kiln.optimizer.importers.diffusion_adapters import adapter_for, resolve_ranges

    model = tiny_model(class_name, seed=0)
    adapter = adapter_for(model)
    ranges, _ = resolve_ranges(adapter, [])
    path = directory / f"{class_name}.onnx"
    export(model, adapter, ranges, path)
    return path, model.config


@pytest.fixture(scope="session")
def dit_export(tmp_path_factory):
    """The tiny seeded DiT (2 layers) exported once per run: (path, diffusers config). Inputs
    hidden_states [batch, 4, height, height], timestep [batch], class_labels [batch]."""
    return _export_tiny(tmp_path_factory.mktemp("dit"), "DiTTransformer2DModel")


@pytest.fixture(scope="session")
def pixart_export(tmp_path_factory):
    """The tiny seeded PixArt (1 layer, self- and cross-attention) exported once per run: (path, config)."""
    return _export_tiny(tmp_path_factory.mktemp("pixart"), "PixArtTransformer2DModel")
