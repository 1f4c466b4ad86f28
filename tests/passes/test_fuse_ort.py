"""The ONNX Runtime fusion pass on a real diffusers export: one fused attention op per attention block."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from optimizer.diffusion_examples import write_dit  # noqa: E402
from optimizer.importers.diffusers import export, load  # noqa: E402
from optimizer.importers.diffusion_adapters import adapter_for, resolve_ranges  # noqa: E402
from passes import FuseForOnnxRuntime, op_counts  # noqa: E402


@pytest.fixture(scope="module")
def dit_export(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dit")
    write_dit(directory)
    model = load(directory)
    adapter = adapter_for(model)
    ranges, _ = resolve_ranges(adapter, [])
    path = directory / "dit.onnx"
    export(model, adapter, ranges, path)
    return path, model.config.num_layers


def load_in_memory(path) -> ir.Model:
    return ir.external_data.load_to_model(ir.load(path))


def run(model: ir.Model, feeds):
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_attention_fuses_with_parity_and_idempotence(dit_export):
    path, layers = dit_export
    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal((3, 4, 24, 24)).astype(np.float32),
             "timestep": rng.integers(0, 1000, (3,)), "class_labels": rng.integers(0, 10, (3,))}  # fmt: skip
    original = load_in_memory(path)
    want = run(original, feeds)
    assert op_counts(original).get("com.microsoft::Attention", 0) == 0 and op_counts(original)["Softmax"] == layers

    fused = load_in_memory(path)
    fusion = FuseForOnnxRuntime()
    assert fusion(fused).modified
    counts = op_counts(fused)
    assert counts["com.microsoft::Attention"] == layers
    assert "Softmax" not in counts
    assert fusion.stats["attention"] == layers
    np.testing.assert_allclose(run(fused, feeds), want, atol=1e-5, rtol=1e-5)

    again = FuseForOnnxRuntime()
    assert not again(fused).modified
    assert op_counts(fused) == counts
