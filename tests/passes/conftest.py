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
