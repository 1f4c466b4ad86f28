"""FuseForOnnxRuntime ("ort-fusions") on real diffusers exports (tiny DiT and PixArt) and a small
graph: fused contrib-op counts, refusal reasons, ORT CPU parity and idempotence."""

from __future__ import annotations

import numpy as np
from passes_helpers import dit_feeds, fuse_and_check, load, with_weights

from kiln.passes import FuseForOnnxRuntime, PassManager, cleanup_passes, op_counts


def test_dit_ort_fusions(dit_export):
    path, config = dit_export
    layers = config.num_layers
    model, _ = PassManager(cleanup_passes()).run(load(path))
    assert op_counts(model)["Softmax"] == layers and "com.microsoft::Attention" not in op_counts(model)

    pass_ = fuse_and_check(model, FuseForOnnxRuntime, dit_feeds(batch=3, side=12))

    counts = op_counts(model)
    # Per block: one attention, two residual-add+LayerNorm pairs, one bias+GELU.
    assert counts["com.microsoft::Attention"] == layers and "Softmax" not in counts
    assert pass_.stats["attention"] == layers
    assert counts["com.microsoft::SkipLayerNormalization"] == 2 * layers
    assert counts["com.microsoft::FastGelu"] == layers and "Gelu" not in counts
    # The final layer's norm has no residual add before it; the first block's add broadcasts the
    # positional embedding, so its norm is refused (with the reason) and stays.
    assert counts["LayerNormalization"] == 1
    assert pass_.details["refused"]["skip-layer-norm"] == {
        "the residual add's inputs do not share one known [batch, tokens, channels] shape": 1
    }
    assert pass_.stats["skip-layer-norm"] == 2 * layers and pass_.stats["bias-tanh-gelu"] == layers
    assert pass_.stats["adaln_modulations"] == layers + 1  # the standard part runs too


def test_dit_attention_fuses_at_another_size(dit_export):
    """The export is dynamic in batch and size; the fused graph stays right away from the export's shapes."""
    path, config = dit_export
    model = load(path)
    fuse_and_check(model, FuseForOnnxRuntime, dit_feeds(batch=3, side=24))
    assert op_counts(model)["com.microsoft::Attention"] == config.num_layers


def test_pixart_self_and_cross_attention_fuse(pixart_export):
    path, config = pixart_export
    model, _ = PassManager(cleanup_passes()).run(load(path))
    rng = np.random.default_rng(0)
    feeds = {"hidden_states": rng.standard_normal((2, 4, 12, 16)).astype(np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 5, 12)).astype(np.float32),
             "timestep": rng.integers(0, 1000, (2,))}  # fmt: skip
    fuse_and_check(model, FuseForOnnxRuntime, feeds)
    counts = op_counts(model)
    assert counts["com.microsoft::Attention"] == config.num_layers  # self-attention: packed QKV
    assert counts["com.microsoft::MultiHeadAttention"] == config.num_layers  # cross-attention to the caption
    assert "Softmax" not in counts
    assert counts["com.microsoft::FastGelu"] == config.num_layers + 1  # and the caption projection's


def test_conv_relu_fuses_and_leaky_relu_is_refused_with_the_reason():
    conv = """
        g (float[1, 3, 8, 8] x, float[4, 3, 3, 3] w, float[4] b) => (float[1, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = ACT(c)
        }"""
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    model = with_weights(conv.replace("ACT", "Relu"), ("w", "b"))
    pass_ = fuse_and_check(model, FuseForOnnxRuntime, feeds)
    assert op_counts(model) == {"com.microsoft::FusedConv": 1}
    assert pass_.stats == {"conv-relu": 1}

    model = with_weights(conv.replace("ACT", "LeakyRelu"), ("w", "b"))
    pass_ = FuseForOnnxRuntime()
    assert not pass_(model).modified
    assert pass_.details["refused"] == {"conv-leakyrelu": {"cuDNN's fused convolution has no LeakyRelu; TensorRT fuses it itself": 1}}


def test_rms_norm_over_a_positive_last_axis_becomes_simplified_layer_normalization():
    """x * rsqrt(mean(x², axes=[2]) + eps) * w on a 3-D x, as torch.export writes Wan's q and k norms: the
    axis is renamed -1 and the RMSNorm fuses into one SimplifiedLayerNormalization, with ORT CPU parity."""
    model = with_weights("""
        rms (float[B, S, 8] x, float[8] w) => (float[B, S, 8] y) {
            two = Constant <value = float {2.0}> ()
            axes = Constant <value = int64[1] {2}> ()
            eps = Constant <value = float {1e-6}> ()
            square = Pow (x, two)
            mean = ReduceMean <keepdims = 1, noop_with_empty_axes = 0> (square, axes)
            shifted = Add (mean, eps)
            rms = Sqrt (shifted)
            inverse = Reciprocal (rms)
            normalized = Mul (x, inverse)
            y = Mul (normalized, w)
        }
    """, ("w",))
    model, _ = PassManager(cleanup_passes()).run(model)  # shapes inferred, as in the pipeline
    pass_ = fuse_and_check(model, FuseForOnnxRuntime, {"x": np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)})
    counts = op_counts(model)
    assert counts == {"SimplifiedLayerNormalization": 1}, counts
    assert pass_.stats["last_axis_as_minus_one"] == 1
