"""FuseStandardOnnx ("fusions") and the FusionPass base: standard ONNX ops only, rewrites counted per
rule, refusals from the rules and the adaLN rewrite gathered in details["refused"]."""

from __future__ import annotations

import numpy as np
from passes_helpers import chunk_is_output_model, dit_feeds, fuse_and_check, load, with_weights

from kiln.passes import FuseStandardOnnx, InferShapes, PassManager, cleanup_passes, op_counts


def test_dit_standard_fusions_use_standard_onnx_only(dit_export):
    path, config = dit_export
    model, _ = PassManager(cleanup_passes()).run(load(path))
    softmax = op_counts(model)["Softmax"]
    pass_ = fuse_and_check(model, FuseStandardOnnx, dit_feeds(batch=3, side=12))
    assert all(node.domain in ("", "ai.onnx") for node in model.graph)
    assert pass_.stats == {"adaln_modulations": config.num_layers + 1, "adaln_one_plus_folded": 2 * config.num_layers + 1}
    assert pass_.details == {"refused": {}}
    assert op_counts(model)["Softmax"] == softmax == config.num_layers  # TensorRT fuses attention itself


def test_conv_batchnorm_folds_in_standard_onnx():
    weights = ("w", "b", "gamma", "beta", "mean", "var")
    model = with_weights("""
        g (float[1, 3, 8, 8] x, float[4, 3, 3, 3] w, float[4] b, float[4] gamma, float[4] beta, float[4] mean,
           float[4] var) => (float[1, 4, 8, 8] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            y = BatchNormalization(c, gamma, beta, mean, var)
        }""", weights)
    rng = np.random.default_rng(1)
    pass_ = fuse_and_check(model, FuseStandardOnnx, {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)})
    assert op_counts(model) == {"Conv": 1}
    assert pass_.stats == {"FuseBatchNormIntoConv": 1}


def test_the_adaln_rewrites_refusals_reach_the_fusion_pass():
    model = chunk_is_output_model()
    InferShapes()(model)
    pass_ = FuseStandardOnnx()
    assert not pass_(model).modified
    assert pass_.stats == {}
    assert pass_.details == {"refused": {"fuse-adaln": {"a chunk is a graph output": 1}}}
