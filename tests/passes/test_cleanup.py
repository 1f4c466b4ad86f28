"""Cleanup passes: each one's promised op change, ORT CPU parity, idempotence and stats."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from passes_helpers import (
    assert_idempotent,
    assert_outputs_close,
    check,
    from_proto,
    node,
    node_names,
    parse,
    random_feeds,
    run_ort,
    serialize,
)

from kiln.passes import (
    DeduplicateInitializers,
    EliminateCommonSubexpressions,
    FoldConstants,
    InferShapes,
    LiftConstants,
    PassManager,
    RemoveDeadNodes,
    RemoveIdentity,
    SortTopologically,
    cleanup_passes,
    count_nodes,
    op_counts,
)
from kiln.passes.base import check_topological_order


def _apply(pass_type, model, feeds=None, rtol=1e-6, atol=1e-6):
    """Run pass_type once on model, checking ORT parity against the model as it was before."""
    feeds = feeds if feeds is not None else random_feeds(model)
    expected = run_ort(model, feeds)
    pass_ = pass_type()
    result = pass_(model)
    assert result.model is model
    assert_outputs_close(expected, run_ort(model, feeds), rtol=rtol, atol=atol)
    return pass_, result


# --- infer-shapes -----------------------------------------------------------------------------------

SHAPE_MODEL = """
g (float[2,3] x) => (float[2,3] y)
<int64[1] flat_shape = {-1}>
{
  [relu] a = Relu(x)
  [transpose] t = Transpose <perm = [1, 0]> (a)
  [flatten] flat = Reshape(t, flat_shape)
  [shape] shp = Shape(x)
  [reshape] back = Reshape(flat, shp)
  [add] y = Add(back, x)
}
"""


def test_infer_shapes_types_every_value_with_data_propagation():
    model = parse(SHAPE_MODEL)
    values = {v.name: v for n in model.graph for v in n.outputs}
    assert all(values[name].dtype is None and values[name].shape is None for name in ("a", "t", "flat", "back"))
    counts = op_counts(model)

    pass_, result = _apply(InferShapes, model)

    assert result.modified is True
    assert op_counts(model) == counts  # types and shapes only, no op changes
    assert values["a"].dtype == ir.DataType.FLOAT and values["a"].shape == ir.Shape([2, 3])
    assert values["t"].shape == ir.Shape([3, 2])
    assert values["flat"].shape == ir.Shape([6])
    assert values["shp"].dtype == ir.DataType.INT64 and values["shp"].shape == ir.Shape([2])
    # Reshape(flat, Shape(x)) is [2, 3] only through data propagation.
    assert values["back"].shape == ir.Shape([2, 3])
    assert pass_.warnings == [] and pass_.stats == {}
    check(model)
    assert_idempotent(InferShapes, model)


def test_infer_shapes_keeps_the_initializer_order():
    # onnx-ir sets initializers over 1000 bytes aside during inference; they must come back in place.
    model = parse(
        """
        g (float[2,300] x) => (float[2,300] y)
        <float[300] big = {%s}, float small = {2.0}>
        {
          [mul] xb = Mul(x, big)
          [scale] y = Mul(xb, small)
        }
        """
        % ", ".join(f"{v:.3f}" for v in np.random.default_rng(0).standard_normal(300))
    )
    assert list(model.graph.initializers) == ["big", "small"]
    pass_, result = _apply(InferShapes, model)
    assert result.modified is True
    assert list(model.graph.initializers) == ["big", "small"]
    assert model.graph.initializers["big"].const_value.numpy().shape == (300,)
    assert_idempotent(InferShapes, model)


def test_infer_shapes_failure_is_a_warning_that_names_the_cause():
    model = parse("g (float[3] x, float[3] z) => (float[3] y) { [add] y = Add(x, z) }")
    model.graph.inputs[1].shape = ir.Shape([4])  # now Add([3], [4]) cannot broadcast
    data = serialize(model)

    pass_ = InferShapes()
    result = pass_(model)

    assert result.modified is False
    assert serialize(model) == data
    assert len(pass_.warnings) == 1
    (warning,) = pass_.warnings
    assert warning.startswith("shape inference skipped: InferenceError: ")
    assert "Incompatible dimensions" in warning
    assert "%s" not in warning


# --- lift-constants ---------------------------------------------------------------------------------

CONSTANT_MODEL = """
g (float[2,3] x) => (float[3,2] y)
{
  [c_tensor] w = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
  [c_float] s = Constant <value_float = 0.5> ()
  [c_ints] shape = Constant <value_ints = [3, 2]> ()
  [mul] xw = Mul(x, w)
  [scale] xs = Mul(xw, s)
  [reshape] y = Reshape(xs, shape)
}
"""


def test_lift_constants_turns_every_constant_into_an_initializer():
    model = parse(CONSTANT_MODEL)
    assert op_counts(model) == {"Constant": 3, "Mul": 2, "Reshape": 1}
    assert list(model.graph.initializers) == []

    _, result = _apply(LiftConstants, model)

    assert result.modified is True
    assert op_counts(model) == {"Mul": 2, "Reshape": 1}
    inits = model.graph.initializers
    assert sorted(inits) == ["s", "shape", "w"]
    np.testing.assert_array_equal(inits["w"].const_value.numpy(), np.array([1, 2, 3], np.float32))
    assert inits["s"].const_value.numpy().dtype == np.float32 and inits["s"].const_value.numpy() == 0.5
    np.testing.assert_array_equal(inits["shape"].const_value.numpy(), np.array([3, 2], np.int64))
    assert node(model, "reshape").inputs[1] is inits["shape"]
    check(model)
    assert_idempotent(LiftConstants, model)


def test_lift_constants_keeps_a_constant_that_is_a_graph_output():
    model = parse(
        """
        g (float[2] x) => (float[2] y, float[2] c)
        {
          [c_out] c = Constant <value = float[2] {1.0, 2.0}> ()
          [c_in] k = Constant <value = float[2] {3.0, 4.0}> ()
          [add] y = Add(x, k)
        }
        """
    )
    # An initializer cannot be a graph output of its own, so onnx-ir leaves that Constant; the pass
    # must not fail its postcondition over it.
    _, result = _apply(LiftConstants, model)
    assert result.modified is True
    assert op_counts(model) == {"Add": 1, "Constant": 1}
    assert node_names(model) == ["c_out", "add"]
    assert [v.name for v in model.graph.outputs] == ["y", "c"]
    check(model)
    assert_idempotent(LiftConstants, model)


# --- fold-constants ---------------------------------------------------------------------------------

FOLD_MODEL = """
g (float[2,3] x) => (float[2,3] y)
<float sixteen = {16.0}, float[3] a = {1.0, 2.0, 3.0}, float[3] b = {0.5, 0.5, 0.5}>
{
  [sqrt] four = Sqrt(sixteen)
  [add_ab] ab = Add(a, b)
  [div] xd = Div(x, four)
  [mul] y = Mul(xd, ab)
}
"""


def test_fold_constants_evaluates_constant_subgraphs():
    model = parse(FOLD_MODEL)
    assert op_counts(model) == {"Add": 1, "Div": 1, "Mul": 1, "Sqrt": 1}

    pass_, result = _apply(FoldConstants, model)

    assert result.modified is True
    assert op_counts(model) == {"Div": 1, "Mul": 1}
    assert pass_.stats == {"nodes_folded": 2}
    div, mul = node(model, "div"), node(model, "mul")
    assert div.inputs[1].const_value.numpy() == np.float32(4.0)
    np.testing.assert_array_equal(mul.inputs[1].const_value.numpy(), np.array([1.5, 2.5, 3.5], np.float32))
    check(model)
    second = assert_idempotent(FoldConstants, model)
    assert second.stats == {"nodes_folded": 0}


SPLIT_MODEL = """
g (float[2, 4] x) => (float[2, 4] y)
<float[2, 6] table = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, int64[2] sizes = {2, 4}>
{
  [split] a, b = Split <axis = 1> (table, sizes)
  [tile] wide = Concat <axis = 1> (a, a)
  [mul] m = Mul(x, b)
  [add] y = Add(m, wide)
}
"""


def test_fold_constants_splits_a_constant_into_constants():
    # onnxscript folds no node of several outputs; a Split of a table (Wan's rotary axes) is folded first.
    model = parse(SPLIT_MODEL)
    pass_, result = _apply(FoldConstants, model)
    assert result.modified is True and op_counts(model) == {"Add": 1, "Mul": 1}
    np.testing.assert_array_equal(node(model, "add").inputs[1].const_value.numpy(), [[1, 2, 1, 2], [7, 8, 7, 8]])
    check(model)


def test_fold_constants_folds_sqrt_of_a_constant_node_in_the_pipeline_order():
    """The example block's pattern: Constant -> Sqrt -> Div. lift-constants then fold-constants
    leave the Div reading a stored 4.0."""
    model = parse(
        """
        g (float[2,3] x) => (float[2,3] y)
        {
          [head_dim] sixteen = Constant <value = float {16.0}> ()
          [sqrt] scale = Sqrt(sixteen)
          [div] y = Div(x, scale)
        }
        """
    )
    feeds = random_feeds(model, seed=3)
    expected = run_ort(model, feeds)
    assert op_counts(model) == {"Constant": 1, "Div": 1, "Sqrt": 1}
    LiftConstants()(model)
    pass_ = FoldConstants()
    assert pass_(model).modified is True
    assert op_counts(model) == {"Div": 1}
    assert pass_.stats == {"nodes_folded": 1}
    assert node(model, "div").inputs[1].const_value.numpy() == np.float32(4.0)
    assert_outputs_close(expected, run_ort(model, feeds))
    check(model)
    assert_idempotent(FoldConstants, model)


# --- remove-identity --------------------------------------------------------------------------------

IDENTITY_MODEL = """
g (float[2,3] x) => (float[2,3] y)
{
  [id_in] x_in = Identity(x)
  [relu] r = Relu(x_in)
  [add] y_pre = Add(r, x_in)
  [id_out] y = Identity(y_pre)
}
"""


def test_remove_identity_rewires_consumers_and_keeps_output_names():
    model = parse(IDENTITY_MODEL)
    assert op_counts(model) == {"Add": 1, "Identity": 2, "Relu": 1}

    pass_, result = _apply(RemoveIdentity, model)

    assert result.modified is True
    assert op_counts(model) == {"Add": 1, "Relu": 1}
    assert pass_.stats == {"identities_removed": 2}
    x = model.graph.inputs[0]
    assert node(model, "relu").inputs[0] is x and node(model, "add").inputs[1] is x
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert model.graph.outputs[0] is node(model, "add").outputs[0]
    check(model)
    second = assert_idempotent(RemoveIdentity, model)
    assert second.stats == {"identities_removed": 0}


def test_remove_identity_keeps_the_ones_that_carry_the_graph_signature():
    model = parse(
        """
        g (float[2] x) => (float[2] passthrough, float[2] weight, float[2] a, float[2] b)
        <float[2] w = {1.0, 2.0}>
        {
          [id_input] passthrough = Identity(x)
          [id_init] weight = Identity(w)
          [add] a = Add(x, w)
          [id_alias] b = Identity(a)
        }
        """
    )
    # Removing any of these would rename or drop a graph input, initializer or output
    # (onnx-ir alone would turn the outputs (a, b) into (b, b)).
    pass_, result = _apply(RemoveIdentity, model)
    assert result.modified is False
    assert op_counts(model) == {"Add": 1, "Identity": 3}
    assert pass_.stats == {"identities_removed": 0}
    assert [v.name for v in model.graph.outputs] == ["passthrough", "weight", "a", "b"]
    assert [v.name for v in model.graph.inputs] == ["x"]
    check(model)


def test_remove_identity_renames_the_producer_to_the_graph_output():
    model = parse(
        """
        g (float[2,3] x) => (float[2,3] y, float[2,3] z)
        {
          [relu] r = Relu(x)
          [id_out] y = Identity(r)
          [neg] z = Neg(r)
        }
        """
    )
    pass_, result = _apply(RemoveIdentity, model)
    assert result.modified is True and pass_.stats == {"identities_removed": 1}
    relu = node(model, "relu")
    # The Relu's output took the Identity's place and name; its other reader follows it.
    assert relu.outputs[0].name == "y" and model.graph.outputs[0] is relu.outputs[0]
    assert node(model, "neg").inputs[0] is relu.outputs[0]
    assert relu.outputs[0].shape == ir.Shape([2, 3])  # the declared output shape carried over
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    assert [o.name for o in ir.to_proto(model).graph.output] == ["y", "z"]
    check(model)
    assert_idempotent(RemoveIdentity, model)


IF_MODEL = """
g (bool c, float[3] x) => (float[3] y)
{
  [id_in] x_in = Identity(x)
  [branch] y = If (c) <
    then_branch = then_g () => (float[3] t) {
      [t_relu] r = Relu(x_in)
      [t_id] t = Identity(r)
    },
    else_branch = else_g () => (float[3] e) {
      [e_id] e = Identity(x_in)
    }
  >
}
"""


def _branches(model: ir.Model) -> tuple[ir.Graph, ir.Graph]:
    attributes = node(model, "branch").attributes
    return attributes["then_branch"].as_graph(), attributes["else_branch"].as_graph()


@pytest.mark.parametrize("flag", [True, False])
def test_remove_identity_walks_if_branches(flag):
    model = parse(IF_MODEL)
    feeds = {"c": np.array(flag), "x": np.random.default_rng(2).standard_normal(3).astype(np.float32)}
    pass_, result = _apply(RemoveIdentity, model, feeds)
    assert result.modified is True and pass_.stats == {"identities_removed": 2}
    then_g, else_g = _branches(model)
    x = model.graph.inputs[1]
    (relu,) = list(then_g)
    # The branch reads x itself now, and its Relu output carries the branch output's name.
    assert relu.inputs[0] is x and relu.outputs[0].name == "t" and then_g.outputs[0] is relu.outputs[0]
    # e = Identity(x) returns an outer value from the branch: x's name is the outer graph's, so it stays.
    (identity,) = list(else_g)
    assert identity.op_type == "Identity" and identity.inputs[0] is x
    assert op_counts(model) == {"Identity": 1, "If": 1, "Relu": 1}
    check(model)
    assert_idempotent(RemoveIdentity, model)


LOOP_MODEL = """
g (float[3] x) => (float[3] y)
<int64 trip = {3}, bool go = {1}, float two = {2.0}>
{
  [loop] y = Loop (trip, go, x) <
    body = body_g (int64 i, bool cond, float[3] acc) => (bool cond_out, float[3] acc_out) {
      [keep_cond] cond_out = Identity(cond)
      [double] s = Mul(acc, two)
      [mid] m = Identity(s)
      [tanh] th = Tanh(m)
      [out] acc_out = Identity(th)
    }
  >
}
"""


def test_remove_identity_walks_a_loop_body():
    model = parse(LOOP_MODEL)
    pass_, result = _apply(RemoveIdentity, model)
    assert result.modified is True and pass_.stats == {"identities_removed": 2}
    body = node(model, "loop").attributes["body"].as_graph()
    assert [n.name for n in body] == ["keep_cond", "double", "tanh"]  # cond_out = Identity(cond) stays
    tanh = body.node(2)
    assert tanh.inputs[0] is body.node(1).outputs[0]
    assert [v.name for v in body.outputs] == ["cond_out", "acc_out"] and body.outputs[1] is tanh.outputs[0]
    check(model)
    assert_idempotent(RemoveIdentity, model)


def test_remove_identity_walks_functions():
    model = parse(
        """
        <ir_version: 9, opset_import: ["" : 17, "local" : 1]>
        g (float[3] x) => (float[3] y) { [call] y = local.twice(x) }
        <domain: "local", opset_import: ["" : 17]>
        twice (a) => (b) { t = Add(a, a)  u = Identity(t)  b = Identity(u) }
        """,
        header="",
    )
    pass_, result = _apply(RemoveIdentity, model)
    assert result.modified is True and pass_.stats == {"identities_removed": 2}
    (function,) = model.functions.values()
    (add,) = list(function)
    assert add.op_type == "Add" and add.outputs[0].name == "b" and function.outputs[0] is add.outputs[0]
    check(model)
    assert_idempotent(RemoveIdentity, model)


# --- cse --------------------------------------------------------------------------------------------

CSE_MODEL = """
g (float[2,3] x) => (float[2,3] y)
<float[3] w = {0.5, -1.0, 2.0}>
{
  [mul_a] m1 = Mul(x, w)
  [mul_b] m2 = Mul(x, w)
  [exp_a] e1 = Exp(m1)
  [exp_b] e2 = Exp(m2)
  [soft_a] s1 = Softmax <axis = 1> (e1)
  [soft_b] s2 = Softmax <axis = 0> (e2)
  [add] y = Add(s1, s2)
}
"""


def test_cse_merges_duplicated_subexpressions_but_not_different_attributes():
    model = parse(CSE_MODEL)
    assert op_counts(model) == {"Add": 1, "Exp": 2, "Mul": 2, "Softmax": 2}

    _, result = _apply(EliminateCommonSubexpressions, model)

    assert result.modified is True
    # The Mul pair merges, which makes the Exp pair identical too; the Softmaxes differ in axis.
    assert op_counts(model) == {"Add": 1, "Exp": 1, "Mul": 1, "Softmax": 2}
    assert node_names(model) == ["mul_a", "exp_a", "soft_a", "soft_b", "add"]
    assert node(model, "soft_b").inputs[0] is node(model, "exp_a").outputs[0]
    check(model)
    assert_idempotent(EliminateCommonSubexpressions, model)


# --- dedupe-initializers ----------------------------------------------------------------------------

DEDUPE_MODEL = """
g (float[2,3] x) => (float[2,3] y)
<float[3] w1 = {0.5, -1.0, 2.0}, float[3] w2 = {0.5, -1.0, 2.0}, float[3] w3 = {0.5, -1.0, 3.0},
 int64[3] i1 = {0, 1, 2}>
{
  [mul_1] a = Mul(x, w1)
  [add_2] b = Add(a, w2)
  [sub_3] c = Sub(b, w3)
  [y] y = Mul(c, w2)
}
"""


def test_dedupe_initializers_shares_identical_data_only():
    model = parse(DEDUPE_MODEL)
    counts = op_counts(model)
    assert sorted(model.graph.initializers) == ["i1", "w1", "w2", "w3"]

    pass_, result = _apply(DeduplicateInitializers, model)

    assert result.modified is True
    assert pass_.stats == {"initializers_merged": 1}
    assert op_counts(model) == counts
    assert sorted(model.graph.initializers) == ["i1", "w1", "w3"]
    w1 = model.graph.initializers["w1"]
    assert node(model, "add_2").inputs[1] is w1 and node(model, "y").inputs[1] is w1
    assert node(model, "sub_3").inputs[1] is model.graph.initializers["w3"]
    check(model)
    second = assert_idempotent(DeduplicateInitializers, model)
    assert second.stats == {"initializers_merged": 0}


# --- remove-dead-nodes ------------------------------------------------------------------------------

DEAD_MODEL = """
<ir_version: 9, opset_import: ["" : 17, "com.microsoft" : 1]>
g (float[2,3] x) => (float[2,3] y)
<float[3] w = {1.0, 2.0, 3.0}, float[3] unused_w = {4.0, 5.0, 6.0}>
{
  [dead_mul] d1 = Mul(x, x)
  [dead_neg] d2 = Neg(d1)
  [add] y = Add(x, w)
}
"""


def test_remove_dead_nodes_drops_unused_nodes_initializers_and_opsets():
    model = parse(DEAD_MODEL, header="")
    assert op_counts(model) == {"Add": 1, "Mul": 1, "Neg": 1}
    assert set(model.opset_imports) == {"", "com.microsoft"}

    pass_, result = _apply(RemoveDeadNodes, model)

    assert result.modified is True
    assert op_counts(model) == {"Add": 1}
    assert pass_.stats == {"nodes_removed": 2}  # nodes only; the unused initializer goes too
    assert list(model.graph.initializers) == ["w"]
    assert set(model.opset_imports) == {""}
    check(model)
    second = assert_idempotent(RemoveDeadNodes, model)
    assert second.stats == {"nodes_removed": 0}


def test_remove_dead_nodes_ensures_fails_on_a_dead_node():
    model = parse(DEAD_MODEL, header="")
    with pytest.raises(ir.passes.PostconditionError, match=r"node 'dead_neg' \(Neg\) is still dead"):
        RemoveDeadNodes().ensures(model)


# --- topological-sort -------------------------------------------------------------------------------


def _shuffled_model() -> ir.Model:
    n = helper.make_node
    nodes = [
        n("Add", ["b", "c"], ["y"], name="add"),
        n("Exp", ["a"], ["c"], name="exp"),
        n("Neg", ["a"], ["b"], name="neg"),
        n("Relu", ["x"], ["a"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "shuffled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(proto)  # the checker refuses the order the pass repairs
    return from_proto(proto)


def test_topological_sort_orders_a_shuffled_graph():
    model = _shuffled_model()
    with pytest.raises(ir.passes.PostconditionError, match=r"node 'add' \(Add\) uses 'b' before it is produced"):
        check_topological_order(model.graph)
    counts = op_counts(model)

    _, result = _apply(SortTopologically, model)

    assert result.modified is True
    assert op_counts(model) == counts
    order = node_names(model)
    assert sorted(order) == ["add", "exp", "neg", "relu"]
    assert order[0] == "relu" and order[-1] == "add"
    check_topological_order(model.graph)
    check(model)
    assert_idempotent(SortTopologically, model)


def test_topological_sort_leaves_a_sorted_graph_alone():
    model = parse(IDENTITY_MODEL)
    before = node_names(model)
    assert SortTopologically()(model).modified is False
    assert node_names(model) == before


# --- the pipeline -----------------------------------------------------------------------------------

BLOCK_AFTER_CLEANUP = {
    "Add": 7,
    "Div": 2,
    "Erf": 1,
    "LayerNormalization": 2,
    "MatMul": 6,
    "Mul": 2,
    "Reshape": 4,
    "Softmax": 1,
    "Split": 1,
    "Transpose": 4,
}


def test_cleanup_pipeline_on_the_example_block(block, block_feeds):
    assert count_nodes(block) == 35
    assert op_counts(block) == {**BLOCK_AFTER_CLEANUP, "Constant": 1, "Identity": 2, "Mul": 3, "Sqrt": 1}
    expected = run_ort(block, block_feeds)

    model, records = PassManager(cleanup_passes()).run(block)

    assert count_nodes(model) == 30
    assert op_counts(model) == BLOCK_AFTER_CLEANUP
    by_name = {r.name: r for r in records}
    assert list(by_name) == [
        "infer-shapes",
        "lift-constants",
        "fold-constants",
        "remove-identity",
        "cse",
        "dedupe-initializers",
        "remove-dead-nodes",
        "topological-sort",
    ]
    assert (records[0].nodes_before, records[-1].nodes_after) == (35, 30)
    assert by_name["lift-constants"].nodes_after == 34  # the Constant became an initializer
    assert by_name["fold-constants"].stats == {"nodes_folded": 1}  # Sqrt(head_dim)
    assert by_name["remove-identity"].stats == {"identities_removed": 2}
    assert by_name["dedupe-initializers"].stats == {"initializers_merged": 0}
    assert by_name["remove-dead-nodes"].stats == {"nodes_removed": 1}  # the unused Mul
    assert "unused" not in {v.name for n in model.graph for v in n.outputs}
    assert [v.name for v in model.graph.inputs] == ["x"] and [v.name for v in model.graph.outputs] == ["y"]
    assert all(r.warnings == [] for r in records)
    assert_outputs_close(expected, run_ort(model, block_feeds), rtol=1e-5, atol=1e-5)
    check(model)

    data = serialize(model)
    again, records = PassManager(cleanup_passes()).run(model)
    assert [r.modified for r in records] == [False] * 8
    assert serialize(again) == data
