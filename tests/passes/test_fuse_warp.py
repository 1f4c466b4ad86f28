"""passes.fuse_warp.WarpToGridSample on what tf2onnx makes of FILM's warps: the small FILM SavedModel (16 warps,
64 Gathers) converted once per module, and a one-warp TensorFlow graph for the semantics (border clamping)."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

from passes_helpers import assert_idempotent, serialize  # noqa: E402

from kiln.optimizer.examples import film_net as F  # noqa: E402
from kiln.passes import op_counts  # noqa: E402
from kiln.passes.fuse_warp import WarpToGridSample  # noqa: E402

SMALL = F.FilmConfig.small()
TOL = 1e-4


# --------------------------------------------------------------------------------------------- helpers


def producer_op(value: ir.Value | None) -> str | None:
    node = value.producer() if value is not None else None
    return node.op_type if node is not None else None


def gathers(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Gather"]


def warp_gathers(model: ir.Model) -> list[ir.Node]:
    """Gathers whose data input a Reshape produced: the four corner lookups of each warp."""
    return [n for n in gathers(model) if producer_op(n.inputs[0]) == "Reshape"]


def warp_groups(model: ir.Model) -> list[list[ir.Node]]:
    """The warp Gathers grouped by the flattened image they read, ordered by name."""
    groups: dict[ir.Value, list[ir.Node]] = {}
    for node in warp_gathers(model):
        groups.setdefault(node.inputs[0], []).append(node)
    return sorted(groups.values(), key=lambda g: sorted(n.name for n in g))


def common_prefix(names: list[str]) -> str:
    prefix = []
    for segment in zip(*(n.split("/") for n in names)):
        if len(set(segment)) != 1:
            break
        prefix.append(segment[0])
    return "/".join(prefix)


def grid_samples(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "GridSample"]


def session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(serialize(model), options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feeds: dict) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def frames(batch: int, height: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Two related frames (the second shifted and brightened), so the flows are not trivial."""
    rng = np.random.default_rng(seed)
    x0 = rng.random((batch, height, width, 3), dtype=np.float32)
    x1 = np.clip(np.roll(x0, shift=(2, -3), axis=(1, 2)) * 1.1, 0, 1).astype(np.float32)
    return {"x0": x0, "x1": x1, "time": np.full((batch, 1), 0.5, np.float32)}


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def raw(film) -> ir.Model:
    """A fresh copy of the converted model, as tf2onnx wrote it."""
    return ir.load(os.fspath(film["onnx"]))


@pytest.fixture(scope="module")
def rewritten(film) -> dict:
    model = ir.load(os.fspath(film["onnx"]))
    raw_counts = op_counts(model)
    raw_other_gathers = {n.name for n in gathers(model) if producer_op(n.inputs[0]) != "Reshape"}
    boundary = {"raw_inputs": [v.name for v in model.graph.inputs], "raw_outputs": [v.name for v in model.graph.outputs]}
    pass_ = WarpToGridSample()
    result = pass_(model)
    return {"model": result.model, "result": result, "pass": pass_, "raw_counts": raw_counts,
            "raw_other_gathers": raw_other_gathers, **boundary}  # fmt: skip


@pytest.fixture(scope="module")
def sessions(film, rewritten) -> dict:
    return {"raw": session(ir.load(os.fspath(film["onnx"]))), "rewritten": session(rewritten["model"])}


# --------------------------------------------------------------------------------------------- FILM


def test_raw_conversion_has_64_warp_gathers_and_no_gridsample(raw):
    assert raw.opset_imports[""] == 17
    assert len(warp_gathers(raw)) == 64 == 4 * SMALL.num_warps
    groups = warp_groups(raw)
    assert len(groups) == 16 and all(len(g) == 4 for g in groups)
    assert op_counts(raw).get("GridSample", 0) == 0
    assert grid_samples(raw) == []


def test_rewrite_turns_each_warp_into_one_gridsample(rewritten):
    model, pass_ = rewritten["model"], rewritten["pass"]
    assert rewritten["result"].modified is True
    assert pass_.stats == {"warps_rewritten": 16, "warps_left": 0}
    assert pass_.warnings == []
    samples = grid_samples(model)
    assert len(samples) == 16 and op_counts(model)["GridSample"] == 16
    for node in samples:
        assert node.domain == ""
        assert node.attributes.get_string("padding_mode") == "border"
        assert node.attributes.get_int("align_corners") == 1
        assert node.attributes.get_string("mode") == "bilinear"  # the opset-16..19 name for it
        assert "dense_image_warp" in node.name
    # No warp Gather is left; only Gathers on Shape outputs, all of which were there before.
    assert warp_gathers(model) == []
    remaining = gathers(model)
    assert all(producer_op(n.inputs[0]) == "Shape" for n in remaining)
    assert {n.name for n in remaining} <= rewritten["raw_other_gathers"]
    assert rewritten["raw_counts"]["Gather"] - op_counts(model)["Gather"] >= 64
    # The graph's boundary is unchanged.
    assert [v.name for v in model.graph.inputs] == rewritten["raw_inputs"]
    assert [v.name for v in model.graph.outputs] == rewritten["raw_outputs"]


@pytest.mark.parametrize(
    "batch, height, width",
    [(1, 64, 64), (2, 64, 128), (1, 96, 48), (2, 32, 32)],
)
def test_parity_with_tensorflow_and_the_raw_conversion(film, sessions, batch, height, width):
    assert height % SMALL.alignment == 0 and width % SMALL.alignment == 0
    feeds = frames(batch, height, width, seed=batch * 1000 + height + width)
    want = F.reference_interpolate(film["saved"], feeds["x0"], feeds["x1"], feeds["time"], model=film["tf"])
    got = run(sessions["rewritten"], feeds)
    before = run(sessions["raw"], feeds)
    assert sorted(got) == sorted(before) == sorted(F.output_names(SMALL)) == sorted(want)
    assert got["image"].shape == (batch, height, width, 3)
    assert max_abs(got["image"], want["image"]) <= TOL
    for name in before:  # every output: the warped frames and all flow pyramids
        scale = max(1.0, float(np.abs(before[name]).max()))
        assert max_abs(got[name], before[name]) <= TOL * scale, name
    # The flows are large enough that the warps sample between pixels and past the border.
    assert np.abs(want["forward_flow_pyramid_0"]).max() > 1.0


def test_second_run_changes_nothing(rewritten):
    model = rewritten["model"]
    counts = op_counts(model)
    again = assert_idempotent(WarpToGridSample, model)
    assert again.stats == {"warps_rewritten": 0, "warps_left": 0}
    assert again.warnings == []
    assert op_counts(model) == counts


def _swap_row_lerp_sub(model: ir.Model, group: list[ir.Node]) -> None:
    """right - left -> left - right in one row lerp: no longer alpha * (b - a) + a."""
    corners = {g.outputs[0].uses()[0].node.outputs[0] for g in group}  # each Gather -> its Reshape
    sub = next(u.node for c in corners for u in c.uses() if u.node.op_type == "Sub")
    a, b = sub.inputs
    sub.replace_input_with(0, b)
    sub.replace_input_with(1, a)


def _row_alpha_from_y(model: ir.Model, group: list[ir.Node]) -> None:
    """One row lerp's alpha Mul takes the y alpha (the column lerp's) instead of the x alpha."""
    corners = {g.outputs[0].uses()[0].node.outputs[0] for g in group}
    row_adds = {u.node for c in corners for u in c.uses() if u.node.op_type == "Add"}
    assert len(row_adds) == 2
    column_add = next(u.node for add in row_adds for u in add.outputs[0].uses() if u.node.op_type == "Add")

    def alpha_of(add: ir.Node) -> tuple[ir.Node, int]:
        mul = next(v.producer() for v in add.inputs if producer_op(v) == "Mul")
        index = next(i for i, v in enumerate(mul.inputs) if producer_op(v) != "Sub")
        return mul, index

    y_mul, y_index = alpha_of(column_add)
    row_mul, row_index = alpha_of(sorted(row_adds, key=lambda n: n.name)[0])
    assert row_mul.inputs[row_index] is not y_mul.inputs[y_index]
    row_mul.replace_input_with(row_index, y_mul.inputs[y_index])


@pytest.mark.parametrize(
    "breaker, reason",
    [
        (_swap_row_lerp_sub, "is not alpha * (b - a) + a"),
        (_row_alpha_from_y, "the two row lerps should share one x alpha and use all four corners"),
    ],
)
def test_a_warp_that_does_not_match_is_left_with_a_warning(raw, breaker, reason):
    group = warp_groups(raw)[3]
    prefix = common_prefix([g.name for g in group])
    assert "dense_image_warp" in prefix and prefix.startswith("StatefulPartitionedCall/")
    breaker(raw, group)
    feeds = frames(1, 32, 48, seed=7)
    before = run(session(raw), feeds)

    pass_ = WarpToGridSample()
    result = pass_(raw)
    assert result.modified is True
    assert pass_.stats == {"warps_rewritten": 15, "warps_left": 1}
    assert len(pass_.warnings) == 1
    (warning,) = pass_.warnings
    assert warning.startswith(f"warp '{prefix}' left as is: "), warning
    assert reason in warning
    assert len(grid_samples(raw)) == 15
    # The broken warp keeps its four Gathers (the very nodes), and they are the only warp Gathers left.
    assert all(g.graph is raw.graph for g in group)
    assert {id(g) for g in warp_gathers(raw)} == {id(g) for g in group}
    # The 15 rewrites did not change what the (broken) model computes.
    after = run(session(raw), feeds)
    assert sorted(after) == sorted(before)
    for name in before:
        scale = max(1.0, float(np.abs(before[name]).max()))
        assert max_abs(after[name], before[name]) <= TOL * scale, name


def test_opset_below_16_warns_for_each_warp_and_rewrites_nothing(raw):
    raw.opset_imports[""] = 15
    counts, data = op_counts(raw), serialize(raw)
    pass_ = WarpToGridSample()
    result = pass_(raw)
    assert result.modified is False
    assert pass_.stats == {"warps_rewritten": 0, "warps_left": 16}
    assert len(pass_.warnings) == 16
    labels = {common_prefix([g.name for g in group]) for group in warp_groups(raw)}
    assert len(labels) == 16
    for warning in pass_.warnings:
        assert warning.startswith("warp '") and warning.endswith("left as is: GridSample needs opset 16, the model has 15")
    assert {w.split("'")[1] for w in pass_.warnings} == labels
    assert op_counts(raw) == counts and serialize(raw) == data
    assert len(warp_gathers(raw)) == 64


def test_opset_20_uses_the_linear_mode_name(raw):
    raw.opset_imports[""] = 20
    pass_ = WarpToGridSample()
    pass_(raw)
    assert pass_.stats == {"warps_rewritten": 16, "warps_left": 0}
    assert {n.attributes.get_string("mode") for n in grid_samples(raw)} == {"linear"}


# ------------------------------------------------------------------------------------- one warp alone


@pytest.fixture(scope="module")
def one_warp():
    """tf2onnx's conversion of a graph that is one dense_image_warp (dynamic shapes), and its TF function."""
    import tf2onnx

    signature = [
        tf.TensorSpec([None, None, None, 5], tf.float32, name="image"),
        tf.TensorSpec([None, None, None, 2], tf.float32, name="flow"),
    ]

    @tf.function(input_signature=signature)
    def warp(image, flow):
        return {"warped": F.dense_image_warp(image, flow)}

    proto, _ = tf2onnx.convert.from_function(warp, input_signature=signature, opset=17)
    return proto, warp


def warp_case(batch: int, height: int, width: int, seed: int) -> dict[str, np.ndarray]:
    """An image and a fractional flow that sends many query points outside the image on every side."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((batch, height, width, 5)).astype(np.float32)
    span = np.array([height, width], np.float32)
    flow = (rng.uniform(-0.8, 0.8, (batch, height, width, 2)) * span + 0.37).astype(np.float32)
    flow[:, 0, 0] = span + 1.25  # above and left of the image
    flow[:, -1, -1] = -span - 0.75  # below and right of it
    return {"image": image, "flow": flow}


@pytest.mark.parametrize("shape", [(2, 16, 24), (1, 2, 3)])
def test_one_warp_matches_tensorflow_with_border_clamping(one_warp, shape):
    proto, warp = one_warp
    model = ir.serde.deserialize_model(proto)
    assert len(warp_gathers(model)) == 4
    pass_ = WarpToGridSample()
    assert pass_(model).modified is True
    assert pass_.stats == {"warps_rewritten": 1, "warps_left": 0} and pass_.warnings == []
    assert len(grid_samples(model)) == 1 and warp_gathers(model) == []
    assert [v.name for v in model.graph.outputs] == ["warped"]  # the graph output keeps its name

    batch, height, width = shape
    feeds = warp_case(batch, height, width, seed=height)
    # Query points (pixel minus flow) fall outside the image on all four sides, and between pixels.
    ys = np.arange(height)[None, :, None] - feeds["flow"][..., 0]
    xs = np.arange(width)[None, None, :] - feeds["flow"][..., 1]
    assert (ys < 0).any() and (ys > height - 1).any() and (xs < 0).any() and (xs > width - 1).any()
    assert (np.abs(ys - np.round(ys)) > 0.1).any()

    want = warp(tf.constant(feeds["image"]), tf.constant(feeds["flow"]))["warped"].numpy()
    got = run(session(model), feeds)["warped"]
    assert got.shape == (batch, height, width, 5)
    assert max_abs(got, want) <= 1e-5
    # The raw conversion agrees too, so the test checks the rewrite and not tf2onnx.
    assert max_abs(run(session(ir.serde.deserialize_model(proto)), feeds)["warped"], want) <= 1e-5
