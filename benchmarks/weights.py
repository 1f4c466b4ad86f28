"""Ship a model's graph without its weights, and refill them with seeded random values elsewhere.

Large float initializers go to an external file that is not shipped; `refill` gives each one random
values seeded by a fingerprint of its original bytes (kept in the tensor's doc_string), so two graphs of
the same network (before and after a rewrite, whatever their initializer names) get the same weights and
their outputs can be compared. Latency does not depend on the weights' values.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHTS_FILE = "weights.bin"


def strip(model: onnx.ModelProto, path: Path, threshold: int = 4096) -> None:
    """Save model to path with every float initializer over threshold bytes in WEIGHTS_FILE (not to ship)."""
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            tensor.doc_string = hashlib.sha256(numpy_helper.to_array(tensor).tobytes()).hexdigest()[:16]
    onnx.save(model, path, save_as_external_data=True, location=WEIGHTS_FILE, size_threshold=threshold)
    for tensor in onnx.load(path, load_external_data=False).graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.data_type != onnx.TensorProto.FLOAT:
            raise ValueError(f"{tensor.name}: only float weights can be refilled, this is type {tensor.data_type}")


def _random_weight(fingerprint: str, dims: list[int]) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(fingerprint.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    if len(dims) >= 2:  # He-normal over the fan-in, as for the convolutions these are
        return rng.normal(0.0, np.sqrt(2.0 / max(1, int(np.prod(dims[1:])))), size=dims).astype(np.float32)
    return rng.uniform(-0.05, 0.05, size=dims).astype(np.float32)


def refill(path: Path) -> onnx.ModelProto:
    """Load a stripped model with every external weight replaced by seeded random values."""
    model = onnx.load(path, load_external_data=False)
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            array = _random_weight(tensor.doc_string or tensor.name, list(tensor.dims))
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, tensor.name))
    return model
