"""freeze-shapes: dynamic input dims fixed to one size, the shape arithmetic folded away in rounds of a
nested PassManager that stop once a round changes nothing."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from passes_helpers import (
    assert_idempotent,
    assert_outputs_close,
    check,
    dit_feeds,
    load,
    parse,
    random_feeds,
    run_ort,
)

from kiln.passes import FreezeShapes, InferShapes, KilnPass, PassFailed, PassManager, op_counts
from kiln.passes import static_shapes
from kiln.passes.static_shapes import MAX_ROUNDS, ForgetSymbolicShapes, shape_state

ROUND = ["forget-symbolic-shapes", "infer-shapes", "fold-constants", "remove-dead-nodes"]

# Reshape(x, [N, 2, 2]) with N read from x's shape at run time, then the same for the result.
SHAPE_ARITHMETIC = """
g (float[N, 4] x) => (float[N, 2, 2] y)
<int64 zero = {0}, int64[1] axes = {0}, int64[2] tail = {2, 2}>
{
  [shape] shp = Shape(x)
  [gather] n = Gather(shp, zero)
  [unsqueeze] n1 = Unsqueeze(n, axes)
  [concat] target = Concat <axis = 0> (n1, tail)
  [reshape] r = Reshape(x, target)
  [shape_r] shp_r = Shape(r)
  [relu] a = Relu(r)
  [reshape_back] y = Reshape(a, shp_r)
}
"""


def test_freeze_shapes_folds_the_shape_arithmetic():
    model = parse(SHAPE_ARITHMETIC)
    InferShapes()(model)
    feeds = random_feeds(model, dims={"N": 3})
    want = run_ort(model, feeds)

    pass_ = FreezeShapes({"N": 3})
    assert pass_(model).modified is True

    # The second Reshape restores the shape the first made, so folding drops it too.
    assert op_counts(model) == {"Relu": 1, "Reshape": 1}
    assert [list(v.shape) for v in model.graph.inputs] == [[3, 4]]
    assert all(out.shape.is_static() for node in model.graph for out in node.outputs)
    assert pass_.stats == {"inputs_frozen": 1, "nodes_removed": 6}
    assert pass_.warnings == []
    # A first round folds it all, a second finds nothing more: the rounds stop early.
    assert pass_.details["rounds"] == 2 < MAX_ROUNDS
    records = pass_.details["passes"]
    assert [r["name"] for r in records] == ROUND * 2
    assert [r["nodes_after"] for r in records] == [8, 8, 5, 2, 2, 2, 2, 2]
    assert [r["modified"] for r in records] == [True] * 4 + [False] * 4
    assert_outputs_close(want, run_ort(model, feeds))
    check(model)
    second = assert_idempotent(FreezeShapes, model)
    assert second.stats == {"inputs_frozen": 0, "nodes_removed": 0}


def test_freeze_shapes_sizes_an_axis_derived_from_a_dim():
    model = parse("g (float[N, 4] x, float[M, 4] z) => (float[N, 4] y) { [add] y = Relu(x) }")
    model.graph.inputs[1].shape = ir.Shape([ir.SymbolicDim("N/2"), 4])  # the text format takes no such name
    FreezeShapes({"N": 6})(model)
    assert [list(v.shape) for v in model.graph.inputs] == [[6, 4], [3, 4]]


def test_freeze_shapes_needs_a_size_for_every_dynamic_dim():
    model = parse(SHAPE_ARITHMETIC)
    with pytest.raises(ir.passes.PreconditionError, match="no size for dynamic dim"):
        FreezeShapes({"M": 2})(model)


def test_freeze_shapes_reports_a_failed_inference_once():
    model = parse("g (float[N, 3] x, float[3] z) => (float[N, 3] y) { [add] y = Add(x, z) }")
    model.graph.inputs[1].shape = ir.Shape([4])  # Add([2, 3], [4]) cannot broadcast
    pass_ = FreezeShapes({"N": 2})
    assert pass_(model).modified is True
    (warning,) = pass_.warnings  # inference fails in every round; the warning is listed once
    assert warning.startswith("shape inference skipped: InferenceError: ")
    assert pass_.details["rounds"] == 2


def test_a_failing_inner_pass_is_named_by_its_path(monkeypatch):
    class Explode(KilnPass):
        name = "fold-constants"

        def call(self, model):
            raise ValueError("boom")

    monkeypatch.setattr(static_shapes, "FoldConstants", Explode)
    with pytest.raises(PassFailed) as excinfo:
        PassManager([FreezeShapes({"N": 3})]).run(parse(SHAPE_ARITHMETIC))
    assert excinfo.value.pass_name == "freeze-shapes/fold-constants"
    assert str(excinfo.value) == "pass 'freeze-shapes/fold-constants' failed: ValueError: boom"
    assert isinstance(excinfo.value.cause, ValueError)


def test_forget_symbolic_shapes_drops_only_shapes_that_are_not_static():
    model = parse(SHAPE_ARITHMETIC)
    InferShapes()(model)
    values = {out.name: out for node in model.graph for out in node.outputs}
    assert values["shp"].shape == ir.Shape([2]) and not values["r"].shape.is_static()
    feeds = random_feeds(model, dims={"N": 3})
    want = run_ort(model, feeds)

    pass_ = ForgetSymbolicShapes()
    assert pass_(model).modified is True

    assert values["shp"].shape == ir.Shape([2])  # static: kept
    assert values["r"].shape is None and values["y"].shape is None
    assert values["r"].dtype == ir.DataType.FLOAT  # types stay
    assert pass_.stats == {"shapes_forgotten": 3}  # r, a and y
    assert_outputs_close(want, run_ort(model, feeds))
    assert_idempotent(ForgetSymbolicShapes, model)


def test_shape_state_sees_shapes_and_node_counts():
    model = parse(SHAPE_ARITHMETIC)
    InferShapes()(model)
    state = shape_state(model)
    assert shape_state(model) == state
    ForgetSymbolicShapes()(model)
    assert shape_state(model) != state
    InferShapes()(model)
    assert shape_state(model) == state  # forgetting and re-inferring is no change


# --- on the tiny DiT export -------------------------------------------------------------------------


def test_freeze_shapes_removes_the_dit_shape_arithmetic(dit_export):
    path, _ = dit_export
    model = load(path)
    want = run_ort(model, dit_feeds())
    assert op_counts(model)["Shape"] > 0
    pass_ = FreezeShapes({"batch": 2, "height": 16})
    assert pass_(model).modified
    assert "Shape" not in op_counts(model)
    assert [list(v.shape) for v in model.graph.inputs] == [[2, 4, 16, 16], [2], [2]]
    assert list(model.graph.outputs[0].shape) == [2, 4, 16, 16]
    assert pass_.stats["inputs_frozen"] == 3 and pass_.stats["nodes_removed"] > 0
    assert 2 <= pass_.details["rounds"] < MAX_ROUNDS
    assert_outputs_close(want, run_ort(model, dit_feeds()), rtol=1e-5, atol=1e-5)
    assert_idempotent(FreezeShapes, model)


def test_freeze_shapes_needs_every_dit_dim(dit_export):
    path, _ = dit_export
    with pytest.raises(ir.passes.PreconditionError, match="no size for dynamic dim"):
        FreezeShapes({"batch": 2})(load(path))

