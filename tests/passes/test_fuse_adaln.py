"""fuse-adaln: one Unsqueeze and Split per modulation, the scale's `1 +` folded into the Gemm bias."""

from __future__ import annotations

import numpy as np
from passes_helpers import (
    OPSET_18,
    assert_idempotent,
    chunk_is_output_model,
    assert_outputs_close,
    check,
    dit_feeds,
    fuse_and_check,
    load,
    parse,
    run_ort,
    with_weights,
)

from kiln.passes import FuseAdaLnModulation, InferShapes, PassManager, cleanup_passes, op_counts

TOL = {"rtol": 1e-5, "atol": 1e-5}

MODULATION = """
    g (float[2, 3] h, float[3, 8] w, float[8] bias) => (float[2, 1, 4] shift, float[2, 1, 4] scale1p)
      <float one = {1.0}, int64[1] axes = {1}> {
        m = Gemm(h, w, bias)
        s0, s1 = Split <axis = 1, num_outputs = 2> (m)
        u0 = Unsqueeze(s0, axes)
        u1 = Unsqueeze(s1, axes)
        shift = Identity(u0)
        a1 = Add(u1, one)
        scale1p = Identity(a1)
    }"""


def test_adaln_fuses_split_unsqueeze_and_folds_one_plus():
    model = with_weights(MODULATION, ("w", "bias"))
    InferShapes()(model)
    assert op_counts(model) == {"Add": 1, "Gemm": 1, "Identity": 2, "Split": 1, "Unsqueeze": 2}
    feeds = {"h": np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)}
    want = run_ort(model, feeds)
    bias = model.graph.initializers["bias"].const_value.numpy().copy()

    pass_ = FuseAdaLnModulation()
    assert pass_(model).modified
    assert pass_.stats == {"modulations": 1, "one_plus_folded": 1}
    assert pass_.details == {"refused": {}}
    assert op_counts(model) == {"Gemm": 1, "Identity": 2, "Split": 1, "Unsqueeze": 1}
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    np.testing.assert_array_equal(gemm.inputs[2].const_value.numpy(), bias + np.repeat([0, 1], 4).astype(np.float32))
    assert_outputs_close(want, run_ort(model, feeds), **TOL)
    check(model)
    second = assert_idempotent(FuseAdaLnModulation, model)
    assert second.stats == {"modulations": 0, "one_plus_folded": 0}


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
    assert pass_.details == {"refused": {}}  # not a modulation split at all: no reason to report


def test_adaln_refuses_a_chunk_that_is_a_graph_output_with_the_reason():
    model = chunk_is_output_model()
    InferShapes()(model)
    counts = op_counts(model)
    pass_ = FuseAdaLnModulation()
    assert not pass_(model).modified
    assert pass_.details == {"refused": {"a chunk is a graph output": 1}}
    assert op_counts(model) == counts


def test_adaln_on_the_tiny_dit(dit_export):
    path, config = dit_export
    layers = config.num_layers
    model, _ = PassManager(cleanup_passes()).run(load(path))
    before = op_counts(model)

    pass_ = fuse_and_check(model, FuseAdaLnModulation, dit_feeds(batch=3, side=12))

    # One modulation split per block plus the final layer's; every `1 + scale` folded into a Gemm bias.
    assert pass_.stats == {"modulations": layers + 1, "one_plus_folded": 2 * layers + 1}
    after = op_counts(model)
    assert after["Split"] == before["Split"]
    # Six chunk Unsqueezes per block and two in the final layer become one per split.
    assert after["Unsqueeze"] == before["Unsqueeze"] - (6 * layers + 2) + (layers + 1)
    assert after["Add"] == before["Add"] - (2 * layers + 1)
