"""ConvertToFloat16: float16 inside, float32 at the graph's edge and where ops need it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from passes_helpers import (
    assert_idempotent,
    assert_outputs_close,
    check,
    node,
    parse,
    random_feeds,
    run_ort,
    serialize,
)

from passes import ConvertToFloat16, InferShapes, PassFailed, PassManager, cleanup_passes, op_counts

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
TOL = {"rtol": 2e-2, "atol": 2e-2}


def _float_initializers(model: ir.Model, dtype: ir.DataType) -> list[str]:
    return [name for name, v in model.graph.initializers.items() if v.dtype == dtype]


def _f32_values(model: ir.Model) -> int:
    """Float32 initializers plus float32 node outputs: what the pass has to convert."""
    inits = len(_float_initializers(model, F32))
    return inits + sum(1 for n in model.graph for v in n.outputs if v.dtype == F32)


def _casts(model: ir.Model) -> list[tuple[str, int]]:
    """(name, to) of every Cast node, in graph order."""
    return [(n.name, n.attributes["to"].as_int()) for n in model.graph if n.op_type == "Cast"]


def _assert_io_float32(model: ir.Model, inputs: list[str], outputs: list[str]) -> None:
    assert [(v.name, v.dtype) for v in model.graph.inputs] == [(name, F32) for name in inputs]
    assert [(v.name, v.dtype) for v in model.graph.outputs] == [(name, F32) for name in outputs]


def _convert(model: ir.Model, feeds: dict) -> tuple[ConvertToFloat16, dict, dict]:
    """Infer shapes, run fp32 on ORT, convert, run again: (pass, fp32 outputs, fp16 outputs)."""
    InferShapes()(model)
    expected = run_ort(model, feeds)
    pass_ = ConvertToFloat16()
    result = pass_(model)
    assert result.modified is True
    assert result.model is model
    return pass_, expected, run_ort(model, feeds)


# --- the example block ------------------------------------------------------------------------------


def test_fp16_example_block(block, block_feeds):
    model, _ = PassManager(cleanup_passes()).run(block)
    counts = op_counts(model)
    to_convert = _f32_values(model)
    assert to_convert == 16 + 32  # 16 float weights and scalars, 32 node outputs

    pass_, expected, actual = _convert(model, block_feeds)

    _assert_io_float32(model, ["x"], ["y"])
    assert _float_initializers(model, F32) == []
    assert len(_float_initializers(model, F16)) == 16
    assert op_counts(model) == {**counts, "Cast": 2}
    assert _casts(model) == [("x_fp16_cast", F16), ("y_cast", F32)]
    assert model.graph.outputs[0].producer().name == "y_cast"
    assert all(v.dtype == F16 for n in model.graph if n.op_type != "Cast" for v in n.outputs)
    assert pass_.stats == {"values_converted": to_convert, "nodes_kept_fp32": 0}
    assert pass_.details == {
        "kept_fp32": {},
        "fp32_inside": {"LayerNormalization": "runs in low precision; its statistics accumulate in float32"},
    }
    assert pass_.warnings == []
    assert_outputs_close(expected, actual, **TOL)
    check(model)

    second = assert_idempotent(ConvertToFloat16, model)
    assert second.stats == {"values_converted": 0, "nodes_kept_fp32": 0}
    assert op_counts(model) == {**counts, "Cast": 2}


# --- Range: kept in float32 whole -------------------------------------------------------------------

# Range(start, 10 * 0.1, 0.1) over x's last dim. In float16 the delta 0.1 becomes 0.09998, and
# Range would make 11 elements instead of 10; start comes straight from a graph input.
RANGE_MODEL = """
g (float[2,10] x, float start) => (float[2,10] y)
<float tenth = {0.1}, float delta = {0.1}, int64 last = {1}>
{
  [shape] shp = Shape(x)
  [gather] n = Gather(shp, last)
  [cast_n] nf = Cast <to = 1> (n)
  [limit] lim = Mul(nf, tenth)
  [range] r = Range(start, lim, delta)
  [add] y = Add(x, r)
}
"""


def _range_feeds(model):
    feeds = random_feeds(model, seed=5)
    feeds["start"] = np.zeros((), np.float32)
    return feeds


def test_fp16_keeps_range_in_float32_with_casts_around_it():
    model = parse(RANGE_MODEL)
    pass_, expected, actual = _convert(model, _range_feeds(model))

    _assert_io_float32(model, ["x", "start"], ["y"])
    assert pass_.details == {"kept_fp32": {"range": "ONNX Runtime has no float16 Range kernel"}}
    assert pass_.stats["nodes_kept_fp32"] == 1
    assert op_counts(model) == {"Add": 1, "Cast": 5, "Gather": 1, "Mul": 1, "Range": 1, "Shape": 1}
    assert sorted(_casts(model)) == sorted(
        [
            ("x_fp16_cast", F16),  # graph input into the float16 body
            ("cast_n", F16),  # the model's own Cast now makes float16
            ("range_in1_fp32_cast", F32),  # the limit, computed in float16, back to float32
            ("r_fp16_cast", F16),  # Range's output into the float16 body
            ("y_cast", F32),  # graph output
        ]
    )
    range_ = node(model, "range")
    assert [v.dtype for v in range_.inputs] == [F32, F32, F32]
    assert range_.inputs[0] is model.graph.inputs[1]  # start is read as it comes in, no Cast
    assert range_.inputs[2] is model.graph.initializers["delta"]
    assert range_.outputs[0].dtype == F32
    assert [u.node.name for u in range_.outputs[0].uses()] == ["r_fp16_cast"]
    # delta only feeds Range, so it keeps its exact float32 value; tenth feeds a Mul and converts.
    assert _float_initializers(model, F32) == ["delta"]
    assert _float_initializers(model, F16) == ["tenth"]
    assert actual["y"].shape == (2, 10)
    assert_outputs_close(expected, actual, **TOL)
    check(model)

    second = assert_idempotent(ConvertToFloat16, model)
    assert second.details == {"kept_fp32": {"range": "ONNX Runtime has no float16 Range kernel"}}
    assert op_counts(model)["Cast"] == 5


# --- Resize: the scales input stays float32 ---------------------------------------------------------

RESIZE_MODEL = """
g (float[1,2,4,4] x, float[4] scales_in) => (float[1,2,8,8] y, float[1,2,h,w] z)
<float[4] scales = {1.0, 1.0, 2.0, 2.0}, float two = {2.0}>
{
  [mul] xs = Mul(x, two)
  [resize_linear] y = Resize <mode = "linear"> (xs, , scales)
  [resize_nearest] z = Resize <mode = "nearest"> (xs, , scales_in)
}
"""


def test_fp16_resize_scales_stay_float32():
    model = parse(RESIZE_MODEL)
    feeds = random_feeds(model, seed=7)
    feeds["scales_in"] = np.array([1.0, 1.0, 1.5, 0.5], np.float32)
    pass_, expected, actual = _convert(model, feeds)

    _assert_io_float32(model, ["x", "scales_in"], ["y", "z"])
    assert pass_.details == {"kept_fp32": {}}
    assert op_counts(model) == {"Cast": 3, "Mul": 1, "Resize": 2}
    assert sorted(_casts(model)) == [("x_fp16_cast", F16), ("y_cast", F32), ("z_cast", F32)]
    linear, nearest = node(model, "resize_linear"), node(model, "resize_nearest")
    assert linear.inputs[2] is model.graph.initializers["scales"]
    assert nearest.inputs[2] is model.graph.inputs[1]
    assert (linear.inputs[0].dtype, linear.outputs[0].dtype) == (F16, F16)
    assert (nearest.inputs[0].dtype, nearest.outputs[0].dtype) == (F16, F16)
    assert _float_initializers(model, F32) == ["scales"]
    assert _float_initializers(model, F16) == ["two"]
    assert actual["z"].shape == (1, 2, 6, 2)
    assert_outputs_close(expected, actual, **TOL)
    check(model)
    assert_idempotent(ConvertToFloat16, model)


def test_fp16_keeps_ort_group_norm_gamma_and_beta_float32():
    """ONNX Runtime's GroupNorm (onnxscript fuses it from the VAE's InstanceNorm pattern) fails at run
    time on the GPU unless gamma and beta are float32; X and the output go to float16."""
    model = parse(
        """
        <ir_version: 9, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float[1,4,4,8] x) => (float[1,4,4,8] y)
        <float[8] gamma = {1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0}, float[8] beta = {0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0}>
        {
          [gn] y = com.microsoft.GroupNorm <epsilon = 0.00001, groups = 2, activation = 0> (x, gamma, beta)
        }
        """,
        header="",
    )
    ConvertToFloat16()(model)
    group_norm = node(model, "gn")
    assert [v.dtype for v in group_norm.inputs] == [F16, F32, F32]
    assert group_norm.outputs[0].dtype == F16
    assert sorted(_float_initializers(model, F32)) == ["beta", "gamma"]
    assert_idempotent(ConvertToFloat16, model)


# --- smaller contracts ------------------------------------------------------------------------------


def test_fp16_converts_constant_value_float_attributes():
    model = parse(
        """
        g (float[3] x) => (float[3] y)
        {
          [c_scalar] s = Constant <value_float = 0.5> ()
          [c_list] b = Constant <value_floats = [1.0, 2.0, 3.0]> ()
          [mul] xs = Mul(x, s)
          [add] y = Add(xs, b)
        }
        """
    )
    feeds = random_feeds(model, seed=2)
    _, expected, actual = _convert(model, feeds)
    for name, shape in (("c_scalar", ()), ("c_list", (3,))):
        constant = node(model, name)
        assert list(constant.attributes) == ["value"]
        tensor = constant.attributes["value"].as_tensor()
        assert tensor.dtype == F16 and tensor.numpy().shape == shape
        assert constant.outputs[0].dtype == F16
    assert_outputs_close(expected, actual, **TOL)
    check(model)
    assert_idempotent(ConvertToFloat16, model)


def test_fp16_requires_typed_outputs():
    model = parse("g (float[3] x) => (float[3] y) { [relu] y = Relu(x) }")
    model.graph.outputs[0].type = None
    data = serialize(model)
    with pytest.raises(PassFailed) as excinfo:
        PassManager([ConvertToFloat16()]).run(model)
    assert str(excinfo.value) == (
        "pass 'fp16' failed: PreconditionError: outputs ['y'] have no type; run infer-shapes first"
    )
    assert serialize(model) == data


def test_fp16_ensures_no_float32_initializer_is_left():
    model = parse("g (float[3] x) => (float[3] y) <float[3] w = {1.0, 2.0, 3.0}> { [mul] y = Mul(x, w) }")
    with pytest.raises(ir.passes.PostconditionError, match="initializer 'w' is still float32"):
        ConvertToFloat16().ensures(model)
