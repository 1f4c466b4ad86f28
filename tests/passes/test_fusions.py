"""Fusion passes on real diffusers exports (tiny DiT and PixArt) and on small built graphs: parity with
the unfused graph, the fused-op counts, the reasons rules give for refusing, and idempotence."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from passes_helpers import assert_idempotent, assert_outputs_close, parse, run_ort

from passes import (
    FuseAdaLnModulation,
    FuseForOnnxRuntime,
    FuseStandardOnnx,
    InferShapes,
    PassManager,
    cleanup_passes,
    op_counts,
)

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from optimizer.diffusion_examples import tiny_model  # noqa: E402
from optimizer.importers.diffusers import export  # noqa: E402
from optimizer.importers.diffusion_adapters import adapter_for, resolve_ranges  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}
OPSET_18 = '<ir_version: 9, opset_import: ["" : 18]>\n'  # Split's num_outputs


def _export(directory, class_name: str):
    model = tiny_model(class_name)
    adapter = adapter_for(model)
    ranges, _ = resolve_ranges(adapter, [])
    path = directory / f"{class_name}.onnx"
    export(model, adapter, ranges, path)
    return path, model.config


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("dit"), "DiTTransformer2DModel")


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("pixart"), "PixArtTransformer2DModel")


def _cleaned(path) -> ir.Model:
    model, _ = PassManager(cleanup_passes()).run(ir.external_data.load_to_model(ir.load(path)))
    return model


def _dit_feeds(batch=3, side=12):
    rng = np.random.default_rng(0)
    return {"hidden_states": rng.standard_normal((batch, 4, side, side)).astype(np.float32),
            "timestep": rng.integers(0, 1000, (batch,)), "class_labels": rng.integers(0, 10, (batch,))}  # fmt: skip


def _weights(text: str, names: tuple[str, ...], seed: int = 0) -> ir.Model:
    """Parse a graph whose listed inputs are weights, and make them seeded initializers ('var' positive)."""
    model = parse(text, OPSET_18)
    rng = np.random.default_rng(seed)
    for value in [v for v in model.graph.inputs if v.name in names]:
        shape = value.shape.numpy()
        data = rng.uniform(0.5, 1.5, shape) if value.name == "var" else rng.standard_normal(shape)
        model.graph.inputs.remove(value)
        value.const_value = ir.tensor(data.astype(np.float32), name=value.name)
        model.graph.register_initializer(value)
    return model


def _fuse(model: ir.Model, pass_type, feeds):
    want = run_ort(model, feeds)
    pass_ = pass_type()
    assert pass_(model).modified
    assert_outputs_close(want, run_ort(model, feeds), **TOL)
    assert_idempotent(pass_type, model)
    return pass_


def test_dit_ort_fusions(dit):
    path, config = dit
    layers = config.num_layers
    model = _cleaned(path)
    before = op_counts(model)
    pass_ = _fuse(model, FuseForOnnxRuntime, _dit_feeds())
    counts = op_counts(model)
    # Per block: one attention, two residual-add+LayerNorm pairs, one bias+GELU, one modulation split.
    assert counts["com.microsoft::Attention"] == layers and "Softmax" not in counts
    assert counts["com.microsoft::SkipLayerNormalization"] == 2 * layers
    assert counts["com.microsoft::FastGelu"] == layers and "Gelu" not in counts
    # The final layer's norm has no residual add before it; the first block's add broadcasts the
    # positional embedding, so its norm is refused (with the reason) and stays.
    assert counts["LayerNormalization"] == 1
    assert pass_.details["refused"]["skip-layer-norm"] == {
        "the residual add's inputs do not share one known [batch, tokens, channels] shape": 1
    }
    # adaLN: one split per block plus the final layer's; every `1 + scale` folded into a Gemm bias.
    assert pass_.stats["adaln_modulations"] == layers + 1
    assert pass_.stats["adaln_one_plus_folded"] == 2 * layers + 1
    assert counts["Split"] == before["Split"] and counts["Unsqueeze"] == before["Unsqueeze"] - 6 * layers - 2 + layers + 1
    assert pass_.stats["skip-layer-norm"] == 2 * layers and pass_.stats["bias-tanh-gelu"] == layers


def test_dit_standard_fusions_use_standard_onnx_only(dit):
    path, config = dit
    model = _cleaned(path)
    pass_ = _fuse(model, FuseStandardOnnx, _dit_feeds())
    assert all(node.domain in ("", "ai.onnx") for node in model.graph)
    assert pass_.stats == {"adaln_modulations": config.num_layers + 1, "adaln_one_plus_folded": 2 * config.num_layers + 1}
    assert op_counts(model)["Softmax"] == config.num_layers  # TensorRT fuses attention itself


def test_pixart_self_and_cross_attention_fuse(pixart):
    path, config = pixart
    model = _cleaned(path)
    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal((2, 4, 12, 16)).astype(np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 5, 12)).astype(np.float32),
             "timestep": rng.integers(0, 1000, (2,))}  # fmt: skip
    _fuse(model, FuseForOnnxRuntime, feeds)
    counts = op_counts(model)
    assert counts["com.microsoft::Attention"] == config.num_layers  # self-attention: packed QKV
    assert counts["com.microsoft::MultiHeadAttention"] == config.num_layers  # cross-attention to the caption
    assert "Softmax" not in counts
    assert counts["com.microsoft::FastGelu"] == config.num_layers + 1  # and the caption projection's


def test_adaln_leaves_a_split_it_cannot_rewrite():
    model = parse(OPSET_18 + """
        g (float[2, 12] m, float[2, 5, 4] x) => (float[2, 1, 4] a, float[2, 1, 4] b, float[2, 4] c) {
            s0, s1, s2 = Split <axis = 1, num_outputs = 3> (m)
            axes = Constant <value = int64[1] {1}> ()
            a = Unsqueeze(s0, axes)
            b = Unsqueeze(s1, axes)
            c = Identity(s2)
        }""", "")
    pass_ = FuseAdaLnModulation()
    assert not pass_(model).modified
    assert pass_.stats == {"modulations": 0, "one_plus_folded": 0}


def test_adaln_fuses_split_unsqueeze_and_folds_one_plus():
    model = _weights("""
        g (float[2, 3] h, float[3, 8] w, float[8] bias) => (float[2, 1, 4] shift, float[2, 1, 4] scale1p)
          <float one = {1.0}, int64[1] axes = {1}> {
            m = Gemm(h, w, bias)
            s0, s1 = Split <axis = 1, num_outputs = 2> (m)
            u0 = Unsqueeze(s0, axes)
            u1 = Unsqueeze(s1, axes)
            shift = Identity(u0)
            a1 = Add(u1, one)
            scale1p = Identity(a1)
        }""", ("w", "bias"))
    InferShapes()(model)
    rng = np.random.default_rng(1)
    feeds = {"h": rng.standard_normal((2, 3)).astype(np.float32)}
    want = run_ort(model, feeds)
    pass_ = FuseAdaLnModulation()
    assert pass_(model).modified
    assert pass_.stats == {"modulations": 1, "one_plus_folded": 1}
    assert op_counts(model) == {"Gemm": 1, "Unsqueeze": 1, "Split": 1, "Identity": 2}
    assert_outputs_close(want, run_ort(model, feeds), **TOL)


CONV = """
    g (float[1, 3, 8, 8] x, float[4, 3, 3, 3] w, float[4] b) => (float[1, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = ACT(c)
    }"""


@pytest.mark.parametrize("activation", ["Relu", "Sigmoid", "Tanh"])
def test_conv_activation_fuses_for_cudnn(activation):
    model = _weights(CONV.replace("ACT", activation), ("w", "b"))
    rng = np.random.default_rng(1)
    pass_ = _fuse(model, FuseForOnnxRuntime, {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)})
    assert op_counts(model) == {"com.microsoft::FusedConv": 1}
    assert pass_.stats == {f"conv-{activation.lower()}": 1}


def test_conv_leaky_relu_is_refused_with_the_reason():
    model = _weights(CONV.replace("ACT", "LeakyRelu"), ("w", "b"))
    pass_ = FuseForOnnxRuntime()
    assert not pass_(model).modified
    assert pass_.details["refused"] == {"conv-leakyrelu": {"cuDNN's fused convolution has no LeakyRelu; TensorRT fuses it itself": 1}}


def test_conv_batchnorm_folds_in_standard_onnx():
    weights = ("w", "b", "gamma", "beta", "mean", "var")
    model = _weights("""
        g (float[1, 3, 8, 8] x, float[4, 3, 3, 3] w, float[4] b, float[4] gamma, float[4] beta, float[4] mean,
           float[4] var) => (float[1, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = BatchNormalization(c, gamma, beta, mean, var)
        }""", weights)
    rng = np.random.default_rng(1)
    pass_ = _fuse(model, FuseStandardOnnx, {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)})
    assert op_counts(model) == {"Conv": 1}
    assert pass_.stats == {"FuseBatchNormIntoConv": 1}
