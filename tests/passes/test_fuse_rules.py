"""kiln's own rewrite rules (fuse_rules.py), applied alone: the fused op, the reason a refused match
gives, ORT CPU parity, and a second application that finds nothing more."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from passes_helpers import assert_outputs_close, check, run_ort, serialize, with_weights

from kiln.passes import InferShapes, op_counts
from kiln.passes.fuse_rules import BiasTanhGelu, ConvActivation, SkipLayerNorm, apply_rules

TOL = {"rtol": 1e-5, "atol": 1e-5}
OPSET_20 = '<ir_version: 9, opset_import: ["" : 20]>\n'  # Gelu


def _feeds(model: ir.Model, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal(v.shape.numpy()).astype(np.float32) for v in model.graph.inputs}


def _apply(model: ir.Model, make_rule) -> tuple[dict, dict]:
    """Apply a fresh rule with parity on ORT CPU; a second fresh rule must rewrite nothing."""
    InferShapes()(model)
    feeds = _feeds(model)
    want = run_ort(model, feeds)
    counts, refusals = apply_rules(model, [make_rule()])
    assert_outputs_close(want, run_ort(model, feeds), **TOL)
    data = serialize(model)
    again, _ = apply_rules(model, [make_rule()])
    assert again == {} and serialize(model) == data
    return counts, refusals


# --- skip-layer-norm --------------------------------------------------------------------------------

RESIDUAL_NORM = """
    g (float[2, 4, 8] a, float[B] b, float[8] gamma) => (float[2, 4, 8] y) {
        total = Add(a, b)
        normed = LayerNormalization <axis = -1, epsilon = 0.00001> (total, gamma)
        y = Add(normed, total)
    }"""


def test_skip_layer_norm_fuses_a_residual_add_and_a_bias_free_norm():
    model = with_weights(RESIDUAL_NORM.replace("float[B] b", "float[2, 4, 8] b"), ("gamma",))
    counts, refusals = _apply(model, SkipLayerNorm)
    assert counts == {"skip-layer-norm": 1} and refusals == {}
    assert op_counts(model) == {"Add": 1, "com.microsoft::SkipLayerNormalization": 1}
    fused = next(n for n in model.graph if n.op_type == "SkipLayerNormalization")
    assert fused.attributes["epsilon"].as_float() == pytest.approx(1e-5)
    check(model)


def test_skip_layer_norm_refuses_a_broadcasting_add_with_the_reason():
    model = with_weights(RESIDUAL_NORM.replace("float[B] b", "float[8] b"), ("gamma",))
    counts, refusals = _apply(model, SkipLayerNorm)
    assert counts == {}
    assert refusals == {
        "skip-layer-norm": {"the residual add's inputs do not share one known [batch, tokens, channels] shape": 1}
    }
    assert op_counts(model) == {"Add": 2, "LayerNormalization": 1}


# --- bias-tanh-gelu ---------------------------------------------------------------------------------

BIAS_GELU = """
    g (float[2, 4, 8] x, float[8] bias) => (float[2, 4, 8] y) {
        biased = Add(x, bias)
        y = Gelu <approximate = "MODE"> (biased)
    }"""


def test_bias_tanh_gelu_becomes_fast_gelu():
    model = with_weights(BIAS_GELU.replace("MODE", "tanh"), ("bias",), header=OPSET_20)
    counts, refusals = _apply(model, BiasTanhGelu)
    assert counts == {"bias-tanh-gelu": 1} and refusals == {}
    assert op_counts(model) == {"com.microsoft::FastGelu": 1}
    check(model)


def test_bias_tanh_gelu_leaves_the_exact_gelu_with_the_reason():
    model = with_weights(BIAS_GELU.replace("MODE", "none"), ("bias",), header=OPSET_20)
    counts, refusals = _apply(model, BiasTanhGelu)
    assert counts == {}
    assert refusals == {"bias-tanh-gelu": {"exact GELU (onnxscript's bias-gelu rule takes it)": 1}}
    assert op_counts(model) == {"Add": 1, "Gelu": 1}


# --- conv-<activation> ------------------------------------------------------------------------------

CONV = """
    g (float[1, 3, 8, 8] x, float[4, 3, 3, 3] w, float[4] b) => (float[1, 4, 8, 8] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
        y = ACT(c)
    }"""


@pytest.mark.parametrize("activation", ["Relu", "Sigmoid", "Tanh"])
def test_conv_activation_fuses_for_cudnn(activation):
    model = with_weights(CONV.replace("ACT", activation), ("w", "b"))
    counts, refusals = _apply(model, lambda: ConvActivation(activation))
    assert counts == {f"conv-{activation.lower()}": 1} and refusals == {}
    assert op_counts(model) == {"com.microsoft::FusedConv": 1}
    fused = next(iter(model.graph))
    assert fused.attributes["activation"].as_string() == activation
    assert list(fused.attributes["pads"].as_ints()) == [1, 1, 1, 1]


def test_conv_leaky_relu_is_refused_with_the_reason():
    model = with_weights(CONV.replace("ACT", "LeakyRelu"), ("w", "b"))
    counts, refusals = _apply(model, lambda: ConvActivation("LeakyRelu"))
    assert counts == {}
    assert refusals == {"conv-leakyrelu": {"cuDNN's fused convolution has no LeakyRelu; TensorRT fuses it itself": 1}}
    assert op_counts(model) == {"Conv": 1, "LeakyRelu": 1}
