"""ConvertPrecision / ConvertToFloat16: low precision inside, float32 at the graph's edge, where ops need
it and where a constant is beyond float16's range; on small graphs and on the tiny DiT export."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator
from passes_helpers import (
    assert_idempotent,
    assert_outputs_close,
    check,
    dit_feeds,
    load,
    node,
    parse,
    random_feeds,
    run_ort,
    serialize,
)

from kiln.optimizer.config import TOLERANCES
from kiln.passes import (
    ConvertPrecision,
    ConvertToFloat16,
    InferShapes,
    PassFailed,
    PassManager,
    cleanup_passes,
    op_counts,
)

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


# --- constants beyond float16's range ---------------------------------------------------------------

# y = (x * 1e6) / 1e6: in float16 both 1e6 would be inf, and y inf or nan.
SCALED = """
g (float[2,3] x) => (float[2,3] y)
<float up = {1000000.0}, float down = {1000000.0}, float[3] w = {0.5, -1.0, 2.0}>
{
  [scale_up] big = Mul(x, up)
  [scale_down] back = Div(big, down)
  [weigh] y = Mul(back, w)
}
"""
KEPT_1E6 = "max |value| 1e+06 is beyond float16's ±65504; kept in float32"


def _assert_no_inf_initializer(model: ir.Model) -> None:
    for name, value in model.graph.initializers.items():
        assert np.isfinite(value.const_value.numpy().astype(np.float32)).all(), name


def test_fp16_keeps_initializers_beyond_its_range_in_float32():
    model = parse(SCALED)
    pass_, expected, actual = _convert(model, random_feeds(model, seed=4))

    assert pass_.details["out_of_range"] == {"up": KEPT_1E6, "down": KEPT_1E6}
    assert pass_.stats["tensors_out_of_range"] == 2
    # Their readers run in float32: a Cast of 1e6 to float16 would be inf at run time too.
    assert pass_.details["kept_fp32"] == {
        "scale_up": "reads up, whose values are beyond float16's range",
        "scale_down": "reads down, whose values are beyond float16's range",
    }
    assert _float_initializers(model, F32) == ["up", "down"]
    assert _float_initializers(model, F16) == ["w"]
    assert node(model, "scale_up").inputs[0] is model.graph.inputs[0]  # x read as float32, no Cast
    assert node(model, "weigh").outputs[0].dtype == F16
    assert sorted(_casts(model)) == [("back_fp16_cast", F16), ("y_cast", F32)]
    _assert_no_inf_initializer(model)
    assert np.isfinite(actual["y"]).all()
    assert_outputs_close(expected, actual, **TOL)
    check(model)

    second = assert_idempotent(ConvertToFloat16, model)
    assert second.details["out_of_range"] == {"up": KEPT_1E6, "down": KEPT_1E6}


def test_fp16_keeps_an_add_and_sub_of_1e5_in_float32():
    model = parse("""
        g (float[2,3] x) => (float[2,3] y) <float big = {100000.0}> {
          [add] s = Add(x, big)
          [sub] d = Sub(s, big)
          [relu] y = Relu(d)
        }""")
    pass_, expected, actual = _convert(model, random_feeds(model, seed=5))
    assert pass_.details["out_of_range"] == {"big": "max |value| 100000 is beyond float16's ±65504; kept in float32"}
    assert set(pass_.details["kept_fp32"]) == {"add", "sub"}
    assert node(model, "relu").outputs[0].dtype == F16
    _assert_no_inf_initializer(model)
    assert np.isfinite(actual["y"]).all()
    assert_outputs_close(expected, actual, **TOL)
    assert_idempotent(ConvertToFloat16, model)


def test_fp16_raises_a_scalar_that_would_round_to_zero():
    model = parse("""
        g (float[2,3] x) => (float[2,3] y) <float eps = {1e-15}> {
          [add] d = Add(x, eps)
          [relu] y = Relu(d)
        }""")
    pass_, expected, actual = _convert(model, random_feeds(model, seed=3))
    assert pass_.details["out_of_range"] == {"eps": "|value| 1e-15 rounds to 0 in float16; raised to 5.96046e-08, as 0 it would give 0 / 0"}
    assert model.graph.initializers["eps"].const_value.numpy().item() == np.float16(2**-24)
    assert_outputs_close(expected, actual, **TOL)
    assert_idempotent(ConvertToFloat16, model)


def test_fp16_keeps_a_linear_attention_normalization_float32():
    # Sana's linear attention divides by (sum + 1e-15), in float32 in diffusers; at a zero sum, float16
    # would give 0 / 0.
    model = parse("""
        g (float[2,3] x) => (float[2,3] y) <float eps = {1e-15}> {
          [relu] r = Relu(x)
          [add] d = Add(r, eps)
          [div] y = Div(r, d)
        }""")
    feeds = {"x": np.array([[-1.0, 0.0, 2.0], [0.5, -3.0, 0.0]], np.float32)}
    pass_, expected, actual = _convert(model, feeds)
    assert {name for name, why in pass_.details["kept_fp32"].items() if "linear attention" in why} == {"add", "div"}
    np.testing.assert_allclose(actual["y"], [[0, 0, 1], [1, 0, 0]], atol=1e-6)  # not NaN where x <= 0
    assert_outputs_close(expected, actual, **TOL)
    assert_idempotent(ConvertToFloat16, model)


def test_fp16_keeps_a_constant_node_beyond_its_range_and_its_readers_in_float32():
    model = parse("""
        g (float[2,3] x) => (float[2,3] y) {
          [c_big] big = Constant <value = float[3] {1000000.0, -2000000.0, 3.0}> ()
          [c_small] small = Constant <value_float = 0.25> ()
          [scale_up] s = Mul(x, big)
          [scale_down] d = Div(s, big)
          [quarter] y = Mul(d, small)
        }""")
    pass_, expected, actual = _convert(model, random_feeds(model, seed=6))
    assert pass_.details["out_of_range"] == {"big": "max |value| 2e+06 is beyond float16's ±65504; kept in float32"}
    assert pass_.details["kept_fp32"] == {
        "c_big": "its value is beyond float16's range",
        "scale_up": "reads big, whose values are beyond float16's range",
        "scale_down": "reads big, whose values are beyond float16's range",
    }
    assert node(model, "c_big").attributes["value"].as_tensor().dtype == F32
    assert node(model, "c_small").attributes["value"].as_tensor().dtype == F16
    assert np.isfinite(actual["y"]).all()
    assert_outputs_close(expected, actual, **TOL)
    check(model)
    assert_idempotent(ConvertToFloat16, model)


def test_fp16_clamps_a_constant_in_a_subgraph_to_its_range():
    """A branch's Constant cannot keep float32 readers (Casts join the main graph only): clamped."""
    model = parse("""
        g (bool c, float[3] x) => (float[3] y) {
          [branch] y = If (c) <
            then_branch = then_g () => (float[3] t) {
              [cap] ceiling = Constant <value_float = 100000.0> ()
              [min] t = Min(x, ceiling)
            },
            else_branch = else_g () => (float[3] e) { [neg] e = Neg(x) }
          >
        }""")
    feeds = {"c": np.array(True), "x": np.random.default_rng(7).standard_normal(3).astype(np.float32) * 100}
    pass_, expected, actual = _convert(model, feeds)
    assert pass_.details["out_of_range"] == {"ceiling": "max |value| 100000 is beyond float16's ±65504; clamped to ±65504"}
    assert pass_.stats["tensors_out_of_range"] == 1
    cap = node(model, "branch").attributes["then_branch"].as_graph().node(0)
    tensor = cap.attributes["value"].as_tensor()
    assert tensor.dtype == F16 and tensor.numpy() == np.float16(65504)
    assert_outputs_close(expected, actual, **TOL)  # min(x, 65504) == min(x, 1e5) for these x
    check(model)
    assert_idempotent(ConvertToFloat16, model)


def test_bf16_has_float32s_range():
    model = parse(SCALED)
    InferShapes()(model)
    pass_ = ConvertPrecision("bf16")
    pass_(model)
    assert "out_of_range" not in pass_.details and "tensors_out_of_range" not in pass_.stats
    assert _float_initializers(model, ir.DataType.BFLOAT16) == ["up", "down", "w"]


# --- on the tiny DiT export -------------------------------------------------------------------------


def test_fp16_keeps_dit_timestep_phases_in_float32(dit_export):
    path, _ = dit_export
    model = load(path)
    want = run_ort(model, dit_feeds())
    model, records = PassManager([*cleanup_passes(), ConvertPrecision("fp16")]).run(model)
    kept = records[-1].details["kept_fp32"]
    phases = {n.name for n in model.graph if n.op_type in ("Sin", "Cos")}
    assert phases and phases <= set(kept)
    # The timestep's scaling into a phase stays float32 too, back to the Cast from int64.
    chain = [name for name, reason in kept.items() if reason.startswith("feeds Sin") or reason.startswith("feeds Cos")]
    assert chain and all(n.outputs[0].dtype in (F32, ir.DataType.DOUBLE) for n in model.graph if n.name in chain)
    assert "out_of_range" not in records[-1].details
    assert_outputs_close(want, run_ort(model, dit_feeds()), **TOLERANCES["fp16"])
    assert_idempotent(ConvertToFloat16, model)


def test_bf16_keeps_dit_ops_without_a_bfloat16_form(dit_export):
    path, _ = dit_export
    model = load(path)
    want = run_ort(model, dit_feeds())
    model, records = PassManager([*cleanup_passes(), ConvertPrecision("bf16")]).run(model)
    kept = records[-1].details["kept_fp32"]
    opset = model.opset_imports[""]
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert kept[conv.name] == f"ONNX Conv (opset {opset}) has no bfloat16 form"
    assert any(n.op_type == "MatMul" and n.outputs[0].dtype == ir.DataType.BFLOAT16 for n in model.graph)
    # ONNX Runtime's CPU provider has few bfloat16 kernels; ONNX's reference evaluator runs them all.
    got = ReferenceEvaluator(ir.to_proto(model)).run(None, dit_feeds())[0]
    assert_outputs_close(want, {"sample": got}, **TOLERANCES["bf16"])


def test_fp16_io_makes_dit_inputs_and_outputs_float16(dit_export):
    path, _ = dit_export
    model, _ = PassManager([*cleanup_passes(), ConvertPrecision("fp16", io_float32=False)]).run(load(path))
    assert [v.dtype for v in model.graph.inputs] == [ir.DataType.FLOAT16, ir.DataType.INT64, ir.DataType.INT64]
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT16
    feeds = dit_feeds()
    got = run_ort(serialize(model), {**feeds, "hidden_states": feeds["hidden_states"].astype(np.float16)})
    assert got["sample"].dtype == np.float16
    assert np.isfinite(got["sample"]).all()


# --- ops whose types ONNX or ONNX Runtime pin (found by ONNX's backend node tests) ---------------------


def _built_engine_outputs(model: ir.Model, tmp_path, feeds: dict) -> dict:
    """model saved and built as kiln's CPU target builds it (ONNX Runtime writes the optimized model,
    then loads it), run on feeds."""
    from kiln import targets
    from kiln.optimizer.onnx_files import save_model
    from kiln.optimizer.shapes import input_specs

    save_model(model, tmp_path / "model.onnx")
    (tmp_path / "engine").mkdir()
    profile = targets.Profile(input_specs(model), {})
    targets.CPU.build(tmp_path / "model.onnx", tmp_path / "engine", profile, "fp16")
    return targets.load_engine(tmp_path / "engine").run(feeds)


def test_fp16_keeps_layer_norm_statistics_float32():
    """LayerNormalization's optional Mean and InvStdDev are float32 in ONNX Runtime's float16 kernel."""
    model = parse("""
        g (float[2,8] x, float[8] s, float[8] b) => (float[2,8] y, float[2,1] mean, float[2,1] inv, float[2,1] twice) {
          [ln] y, mean, inv = LayerNormalization <axis = -1> (x, s, b)
          [twice] twice = Add(mean, mean)
        }""")
    pass_, expected, actual = _convert(model, random_feeds(model, seed=8))
    ln = node(model, "ln")
    assert [v.dtype for v in ln.outputs] == [F16, F32, F32]
    assert node(model, "twice").outputs[0].dtype == F16  # a Cast to float16 joins mean to it
    _assert_io_float32(model, ["x", "s", "b"], ["y", "mean", "inv", "twice"])
    assert_outputs_close(expected, actual, **TOL)
    check(model)
    assert_idempotent(ConvertToFloat16, model)


def test_fp16_casts_of_unnamed_nodes_get_unique_names():
    """Two unnamed Range nodes (kept float32) each get a Cast on their first input: not one name twice."""
    model = parse("""
        g (float x) => (float[N] r, float[M] q) {
          a = Add(x, x)
          lim = Constant <value_float = 6.0> ()
          lim2 = Constant <value_float = 9.0> ()
          step = Constant <value_float = 1.5> ()
          r = Range(a, lim, step)
          q = Range(a, lim2, step)
        }""")
    feeds = {"x": np.array(0.25, np.float32)}
    pass_, expected, actual = _convert(model, feeds)
    casts = [n.outputs[0].name for n in model.graph if n.op_type == "Cast"]
    assert len(casts) == len(set(casts))
    assert {"Range_in0_fp32", "Range_in0_fp32_2"} <= set(casts)
    assert_outputs_close(expected, actual, **TOL)
    check(model)


def test_fp16_keeps_affine_grid_float32_and_the_engine_loads(tmp_path):
    """ONNX Runtime expands a float16 AffineGrid's function, and the optimized model it writes then
    repeats a Cast's name across the If branches: INVALID_GRAPH when the engine loads."""
    model = parse("""
        g (float[2,2,3] theta, int64[4] size) => (float[2,5,6,2] grid) {
          [affine] g = AffineGrid <align_corners = 0> (theta, size)
          grid = Add(g, g)
        }""", header='<ir_version: 9, opset_import: ["" : 20]>\n')
    feeds = {"theta": np.random.default_rng(0).uniform(-1, 1, (2, 2, 3)).astype(np.float32), "size": np.array([2, 3, 5, 6])}
    pass_, expected, actual = _convert(model, feeds)
    assert pass_.details["kept_fp32"] == {"affine": "it makes GridSample's sampling coordinates, which stay float32"}
    assert_outputs_close(expected, _built_engine_outputs(model, tmp_path, feeds), **TOL)


def test_fp16_gives_constant_of_shape_without_a_value_a_float16_zero():
    model = parse("""
        g (float[3] x) => (float[3] y) {
          shape = Shape(x)
          [zeros] z = ConstantOfShape(shape)
          y = Add(x, z)
        }""")
    pass_, expected, actual = _convert(model, random_feeds(model, seed=9))
    zeros = node(model, "zeros")
    assert zeros.outputs[0].dtype == F16 and zeros.attributes["value"].as_tensor().dtype == F16
    assert_outputs_close(expected, actual, **TOL)
    check(model)


def test_fp16_converts_loop_bodies_and_their_initializers():
    """A Loop's body takes its float state in float16 too, and a branch's constant output (an
    initializer of the subgraph) becomes float16 with the branch."""
    model = parse("""
        g (int64 n, bool c, float[3] x) => (float[3] y, float[1] z) {
          y = Loop(n, c, x) <body = body (int64 i, bool ci, float[3] s) => (bool co, float[3] s2) {
            co = Identity(ci)
            s2 = Add(s, s)
          }>
          z = If(c) <
            then_branch = t () => (float[1] one) { one = Constant <value = float[1] {1.0}> () },
            else_branch = e () => (float[1] two) { two = Constant <value = float[1] {2.0}> () }
          >
        }""")
    from kiln.passes import LiftConstants

    LiftConstants()(model)  # the branches' constants become their initializers, as kiln's cleanup does
    feeds = {"n": np.array(3), "c": np.array(True), "x": np.array([0.5, -1.0, 2.0], np.float32)}
    pass_, expected, actual = _convert(model, feeds)
    body = next(n for n in model.graph if n.op_type == "Loop").attributes["body"].as_graph()
    assert body.inputs[2].dtype == F16
    assert_outputs_close(expected, actual, **TOL)
    check(model)


def test_fp16_keeps_float16_outputs_float16():
    """An output that was float16 in the model stays float16: only float32 outputs are cast back."""
    model = parse("""
        g (float16[3] h, float[3] x) => (float16[3] y, float[3] z) {
          y = Relu(h)
          z = Relu(x)
        }""")
    feeds = {"h": np.array([-1, 0.5, 2], np.float16), "x": np.array([-1, 0.5, 2], np.float32)}
    pass_, expected, actual = _convert(model, feeds)
    assert [v.dtype for v in model.graph.outputs] == [F16, F32]
    assert actual["y"].dtype == np.float16
    check(model)


def test_fp16_keeps_ops_without_a_float16_input_or_kernel_in_float32(tmp_path):
    """QuantizeLinear (opset 17) takes no float16 input, DynamicQuantizeLinear none at all, ONNX
    Runtime's CPU ScatterND has no float16 form with a reduction, and the function it expands for a
    float16 MeanVarianceNormalization does not type-check."""
    model = parse("""
        g (float[2,4] x, int64[1,1] idx, float[1,4] upd) => (uint8[2,4] q, uint8[2,4] d, float dscale, float[2,4] s, float[2,4] m)
          <float scale = {0.05}, uint8 zp = {128}, int64[2] axes23 = {2, 3}> {
          [quant] q = QuantizeLinear(x, scale, zp)
          [dyn] d, dscale, dzp = DynamicQuantizeLinear(x)
          [scatter] s = ScatterND <reduction = "add"> (x, idx, upd)
          x4 = Unsqueeze(x, axes23)
          [mvn] m4 = MeanVarianceNormalization <axes = [1]> (x4)
          m = Squeeze(m4, axes23)
        }""")
    rng = np.random.default_rng(10)
    feeds = {"x": rng.uniform(-1, 1, (2, 4)).astype(np.float32), "idx": np.array([[1]]), "upd": rng.uniform(-1, 1, (1, 4)).astype(np.float32)}
    pass_, expected, actual = _convert(model, feeds)
    kept = pass_.details["kept_fp32"]
    assert kept["quant"] == "ONNX QuantizeLinear (opset 17) has no float16 form"
    assert kept["dyn"] == "ONNX DynamicQuantizeLinear (opset 17) has no float16 form"
    assert kept["scatter"] == "ONNX Runtime's CPU ScatterND has no float16 form with reduction 'add'"
    assert kept["mvn"] == "ONNX Runtime has no float16 kernel, and the function it expands instead does not type-check"
    check(model)
    got = _built_engine_outputs(model, tmp_path, feeds)
    np.testing.assert_array_equal(got["q"], expected["q"])
    assert_outputs_close({k: v for k, v in expected.items() if k not in ("q", "d")}, {k: got[k] for k in ("dscale", "s", "m")}, **TOL)


def test_fp16_keeps_ops_typed_by_an_attribute_float32():
    model = parse("""
        g (int64 n, float[4] x) => (float[4] y) {
          [window] w = HannWindow(n)
          y = Mul(x, w)
        }""")
    feeds = {"n": np.array(4), "x": np.array([1, 2, 3, 4], np.float32)}
    pass_, expected, actual = _convert(model, feeds)
    assert pass_.details["kept_fp32"] == {"window": "its output type comes from its output_datatype attribute"}
    assert_outputs_close(expected, actual, **TOL)
    check(model)
