"""optimizer.shapes: shape specs, dynamic-shape profiles, input and output specs; targets.Profile."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from kiln.optimizer.errors import InputError
from kiln.optimizer.shapes import build_profile, check_io, input_specs, output_specs, parse_int_range, parse_shape_spec
from kiln.targets import DimRange, Profile, TensorSpec

# x: [batch, seq, 16] float; mask: [batch, <unnamed>] int64 (its axis 1 is called 'mask:1').
X = TensorSpec("x", "float32", ("batch", "seq", 16))
MASK = TensorSpec("mask", "int64", ("batch", "mask:1"))
INPUTS = (X, MASK)
DIMS_HINT = "dynamic dims: batch (x:0, mask:0), seq (x:1), mask:1 (mask:1)"


def model_with_inputs() -> ir.Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])
    mask = helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)  # untyped output
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]),
        helper.make_node("Cast", ["mask"], ["z"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "g", [x, mask], [y, z])
    # Pre-IR-4 style: an initializer listed among the inputs is not an input to feed.
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    graph.initializer.append(w)
    graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def input_error(fn, *args) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args)
    assert info.value.exit_code == 2
    return info.value


# parse_shape_spec


def test_parse_min_max_opt_is_middle():
    assert parse_shape_spec("batch=1..8") == ("batch", DimRange(1, 4, 8))
    assert parse_shape_spec("seq=16..129") == ("seq", DimRange(16, 72, 129))


def test_parse_min_opt_max():
    assert parse_shape_spec("batch=1..2..8") == ("batch", DimRange(1, 2, 8))


def test_parse_single_size():
    assert parse_shape_spec("batch=4") == ("batch", DimRange(4, 4, 4))


def test_parse_input_axis_name_and_spaces():
    assert parse_shape_spec("  x:1 = 16..128 ") == ("x:1", DimRange(16, 72, 128))
    assert parse_shape_spec("x:-1=2..3") == ("x:-1", DimRange(2, 2, 3))


BAD_SYNTAX = ["batch", "batch=", "=1..8", "batch=1..", "batch=1...8", "batch=a..b", "batch=1..2..3..4", "batch=-1..8",
              "batch=1.5"]  # fmt: skip


@pytest.mark.parametrize("text", BAD_SYNTAX)
def test_parse_bad_syntax(text):
    err = input_error(parse_shape_spec, text)
    assert err.message == f"--shapes {text!r} is not NAME=MIN..MAX"
    assert "batch=1..4..8" in err.hint


def test_parse_min_greater_than_max():
    err = input_error(parse_shape_spec, "batch=8..1")
    assert err.message == "--shapes 'batch=8..1': min 8 is greater than max 1"
    assert "min 8 is greater than max 1" in str(err)


def test_parse_names_its_source():
    err = input_error(parse_shape_spec, "batch=8..1", "recipe r.toml")
    assert err.message == "recipe r.toml 'batch=8..1': min 8 is greater than max 1"


@pytest.mark.parametrize("text", ["batch=0", "batch=0..8", "batch=0..0..4"])
def test_parse_zero(text):
    err = input_error(parse_shape_spec, text)
    assert err.message == f"--shapes {text!r}: sizes must be at least 1"


@pytest.mark.parametrize(("text", "opt"), [("batch=2..1..8", 1), ("batch=2..9..8", 9)])
def test_parse_opt_outside(text, opt):
    err = input_error(parse_shape_spec, text)
    assert err.message == f"--shapes {text!r}: opt {opt} is outside 2..8"


# build_profile


def test_build_profile_by_symbolic_name_and_input_axis():
    profile, notes = build_profile(
        INPUTS, [("--shapes", "batch=1..8"), ("--shapes", "x:1=16..32..128"), ("--shapes", "mask:1=4..4")]
    )
    assert notes == []
    assert dict(profile.dims) == {"batch": DimRange(1, 4, 8), "seq": DimRange(16, 32, 128), "mask:1": DimRange(4, 4, 4)}
    assert profile.inputs == INPUTS


def test_build_profile_negative_axis():
    profile, _ = build_profile(INPUTS, [("--shapes", "x:-2=3..5"), ("--shapes", "mask:-1=2"), ("--shapes", "x:-3=2")])
    assert dict(profile.dims) == {"seq": DimRange(3, 4, 5), "mask:1": DimRange(2, 2, 2), "batch": DimRange(2, 2, 2)}


def test_build_profile_later_specs_override_metadata():
    profile, notes = build_profile(
        INPUTS,
        [("recipe r.toml", "seq=8..64"), ("--shapes", "x:1=2..4")],
        metadata_spec="batch=1..2..8, seq=1..128 ,mask:1=3",
    )
    assert notes == []
    # batch and mask:1 from the metadata; seq from the recipe, then the command line (as x:1).
    assert dict(profile.dims) == {"batch": DimRange(1, 2, 8), "seq": DimRange(2, 3, 4), "mask:1": DimRange(3, 3, 3)}


def test_build_profile_metadata_errors_name_the_metadata():
    err = input_error(build_profile, INPUTS, [], "batch=4..2")
    assert err.message == "model metadata 'batch=4..2': min 4 is greater than max 2"


def test_build_profile_defaults_with_notes():
    profile, notes = build_profile(INPUTS, [("--shapes", "seq=1..16")])
    assert dict(profile.dims) == {"seq": DimRange(1, 8, 16), "batch": DimRange(1, 4, 8), "mask:1": DimRange(1, 4, 8)}
    assert notes == [
        "dynamic dim 'batch' has no range; using 1..4..8 (set it with --shapes batch=MIN..MAX)",
        "dynamic dim 'mask:1' has no range; using 1..4..8 (set it with --shapes mask:1=MIN..MAX)",
    ]


def test_build_profile_static_model():
    static = (TensorSpec("x", "float32", (1, 3)),)
    profile, notes = build_profile(static, [])
    assert dict(profile.dims) == {} and notes == []
    err = input_error(build_profile, static, [("--shapes", "batch=1..8")])
    assert err.message == "--shapes 'batch=1..8': the model has no input or dynamic dim called 'batch'"
    assert err.hint == "the model has no dynamic dims"


def test_build_profile_unknown_name_lists_dynamic_dims():
    err = input_error(build_profile, INPUTS, [("--shapes", "batchsize=1..8")])
    assert err.message == "--shapes 'batchsize=1..8': the model has no input or dynamic dim called 'batchsize'"
    assert err.hint == DIMS_HINT
    assert str(err) == f"{err.message}\n  hint: {DIMS_HINT}"


def test_build_profile_unknown_input_with_axis():
    err = input_error(build_profile, INPUTS, [("--shapes", "y:0=1..8")])
    assert err.message == "--shapes 'y:0=1..8': the model has no input or dynamic dim called 'y:0'"
    assert err.hint == DIMS_HINT


def test_build_profile_static_axis():
    err = input_error(build_profile, INPUTS, [("--shapes", "x:2=1..8")])
    assert err.message == "--shapes 'x:2=1..8': axis 2 of input 'x' is static (16) and takes no range"
    assert err.hint == DIMS_HINT


def test_build_profile_derived_axis_names_the_dim_it_follows():
    inputs = (TensorSpec("x", "float32", ("batch", 4, "height", "width")), TensorSpec("ids", "int64", ("batch", "height/2", "width/2")))
    err = input_error(build_profile, inputs, [("--shapes", "ids:1=2..8")])
    assert err.message == "--shapes 'ids:1=2..8': axis 1 of input 'ids' is height/2, which follows 'height'"
    assert err.hint == "give height a range instead"
    err = input_error(build_profile, inputs, [("--shapes", "rows=2..8")])
    assert err.hint == "dynamic dims: batch (x:0, ids:0), height (x:2, ids:1 as height/2), width (x:3, ids:2 as width/2)"
    profile, _ = build_profile(inputs, [("--shapes", "height=4..8..16"), ("--shapes", "width=8")])
    assert profile.shapes(profile.sizes("max"))["ids"] == (profile.dims["batch"].max, 8, 4)


def test_build_profile_input_without_axis():
    err = input_error(build_profile, INPUTS, [("--shapes", "mask=1..8")])
    assert err.message == "--shapes 'mask=1..8' names input 'mask' but no axis"
    assert err.hint == "write mask:AXIS=MIN..MAX"


@pytest.mark.parametrize("axis", [3, -4, 30])
def test_build_profile_axis_out_of_range(axis):
    err = input_error(build_profile, INPUTS, [("--shapes", f"x:{axis}=1..8")])
    assert err.message == f"--shapes 'x:{axis}=1..8': input 'x' has rank 3, no axis {axis}"
    assert err.hint == DIMS_HINT


@pytest.mark.parametrize("axis", ["--1", "+1", "1a", "", "\u00b2"])
def test_build_profile_malformed_axis_is_unknown_name(axis):
    # Not an integer: taken as a whole name, which the model does not have (and no crash in int()).
    err = input_error(build_profile, INPUTS, [("--shapes", f"x:{axis}=1..8")])
    assert err.message == f"--shapes 'x:{axis}=1..8': the model has no input or dynamic dim called 'x:{axis}'"


def test_build_profile_input_name_with_colon():
    # TF-style names: 'ids:0' is an input; its axis 1 is 'ids:0:1'.
    inputs = (TensorSpec("ids:0", "int32", ("batch", "ids:0:1")),)
    profile, _ = build_profile(inputs, [("--shapes", "ids:0:0=2..6"), ("--shapes", "ids:0:1=5")])
    assert dict(profile.dims) == {"batch": DimRange(2, 4, 6), "ids:0:1": DimRange(5, 5, 5)}
    err = input_error(build_profile, inputs, [("--shapes", "ids:0=1..8")])
    assert err.message == "--shapes 'ids:0=1..8' names input 'ids:0' but no axis"


# Profile


def profile_for(**ranges: DimRange) -> Profile:
    return Profile(INPUTS, ranges)


def test_corners_min_opt_max():
    profile = profile_for(batch=DimRange(1, 2, 4), seq=DimRange(8, 16, 32), **{"mask:1": DimRange(3, 5, 7)})
    assert profile.corners() == [
        ("min", {"x": (1, 8, 16), "mask": (1, 3)}),
        ("opt", {"x": (2, 16, 16), "mask": (2, 5)}),
        ("max", {"x": (4, 32, 16), "mask": (4, 7)}),
    ]


def test_corners_dedup():
    profile = profile_for(batch=DimRange(2, 2, 2), seq=DimRange(8, 8, 32), **{"mask:1": DimRange(1, 1, 1)})
    assert profile.corners() == [
        ("min", {"x": (2, 8, 16), "mask": (2, 1)}),
        ("max", {"x": (2, 32, 16), "mask": (2, 1)}),
    ]
    fixed = profile_for(batch=DimRange(3, 3, 3), seq=DimRange(5, 5, 5), **{"mask:1": DimRange(1, 1, 1)})
    assert fixed.corners() == [("min", {"x": (3, 5, 16), "mask": (3, 1)})]


def test_corners_static():
    static = Profile((TensorSpec("x", "float32", (1, 3)),), {})
    assert static.corners() == [("static", {"x": (1, 3)})]


def test_profile_dims_must_match_inputs():
    with pytest.raises(ValueError, match="do not match"):
        Profile(INPUTS, {"batch": DimRange(1, 1, 1)})


def test_contains():
    profile = profile_for(batch=DimRange(1, 2, 4), seq=DimRange(8, 16, 32), **{"mask:1": DimRange(3, 5, 7)})
    assert profile.contains({"x": (1, 8, 16), "mask": (1, 3)}) is None
    assert profile.contains({"x": (4, 32, 16), "mask": (4, 7)}) is None
    assert profile.contains({"x": (5, 8, 16), "mask": (5, 3)}) == "x axis 0 (batch) is 5, outside the profile 1..4"
    assert profile.contains({"x": (2, 7, 16), "mask": (2, 3)}) == "x axis 1 (seq) is 7, outside the profile 8..32"
    assert profile.contains({"x": (2, 8, 16), "mask": (2, 8)}) == "mask axis 1 (mask:1) is 8, outside the profile 3..7"


# input_specs / output_specs


def test_input_specs_names_unnamed_dims():
    model = model_with_inputs()
    assert input_specs(model) == (
        TensorSpec("x", "float32", ("batch", "seq", 16)),
        TensorSpec("mask", "int64", ("batch", "mask:1")),
    )


def test_input_specs_feed_build_profile():
    profile, notes = build_profile(input_specs(model_with_inputs()), [("--shapes", "mask:1=2..6")])
    assert set(profile.dims) == {"batch", "seq", "mask:1"}
    assert profile.dims["mask:1"] == DimRange(2, 4, 6)
    assert len(notes) == 2


def test_output_specs_reports_unknown():
    assert output_specs(model_with_inputs()) == (
        TensorSpec("y", "float32", ("batch", "seq", 16)),
        TensorSpec("z", "unknown", ()),
    )


def test_input_without_shape():
    proto = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    err = input_error(input_specs, ir.serde.deserialize_model(proto))
    assert err.message == "input 'x' has no shape in the model"


# --- integer input ranges (--int-range, [int_ranges]) ----------------------------------------------


def test_parse_int_range_includes_both_ends():
    assert parse_int_range("labels=0..999") == ("labels", (0, 1000))
    assert parse_int_range(" offset = -3 .. 3 ") == ("offset", (-3, 4))


@pytest.mark.parametrize("text", ["labels", "labels=5", "labels=a..b", "=1..2"])
def test_parse_int_range_bad_syntax(text):
    with pytest.raises(InputError) as info:
        parse_int_range(text)
    assert info.value.message == f"--int-range {text!r} is not NAME=LO..HI"
    assert info.value.hint == "write e.g. frame_length=16..64 (both ends included)"


def test_parse_int_range_lo_above_hi():
    with pytest.raises(InputError) as info:
        parse_int_range("labels=9..1", "recipe r.toml")
    assert info.value.message == "recipe r.toml 'labels=9..1': 9 is greater than 1"


def test_build_profile_takes_int_ranges_after_the_models_own():
    profile, _ = build_profile(INPUTS, [("--shapes", "batch=2"), ("--shapes", "seq=3"), ("--shapes", "mask:1=4")],
                               int_ranges={"mask": (0, 2)}, int_specs=[("--int-range", "mask=5..6")])  # fmt: skip
    assert profile.int_ranges == {"mask": (5, 7)}
    feeds = profile.random_inputs(profile.shapes(profile.sizes("opt")), seed=0)
    assert set(feeds["mask"].ravel()) <= {5, 6}


@pytest.mark.parametrize("spec, what", [("x=0..3", "is not an integer input"), ("nope=0..3", "is not an input")])
def test_build_profile_refuses_an_int_range_for_other_inputs(spec, what):
    shapes = [("--shapes", "batch=2"), ("--shapes", "seq=3"), ("--shapes", "mask:1=4")]
    with pytest.raises(InputError) as info:
        build_profile(INPUTS, shapes, int_specs=[("--int-range", spec)])
    assert info.value.message == f"--int-range {spec!r}: {spec.split('=')[0]!r} {what} of the model"
    assert info.value.hint == "integer inputs: mask"


def test_default_integer_inputs_are_never_zero():
    """An integer input is often a step, a length or a divisor: STFT's frame_length of 0 kills ONNX
    Runtime (SIGFPE), so the default range starts at 1."""
    profile = Profile((TensorSpec("n", "int64", (4096,)),), {})
    values = profile.random_inputs({"n": (4096,)}, seed=0)["n"]
    assert values.min() == 1 and values.max() == 7


# --- the inputs and outputs kiln takes --------------------------------------------------------------


def io_model(text: str) -> ir.Model:
    import onnx

    return ir.serde.deserialize_model(onnx.parser.parse_model('<ir_version: 9, opset_import: ["" : 17]>\n' + text))


@pytest.mark.parametrize("text, message", [
    ("g (seq(float[2]) s) => (float[2] y) <int64 zero = {0}> { y = SequenceAt(s, zero) }",
     "input 's' is a sequence, not a tensor; kiln's engines take and return tensors"),
    ("g (bfloat16[2] x) => (float[2] y) { y = Cast <to = 1> (x) }",
     "input 'x' is bfloat16; kiln's engines take and return bool, float16, float32, float64, int16, int32, int64, int8, uint16, uint32, uint64, uint8"),
    ("g (float[2] x) => (string[2] y) { y = Cast <to = 8> (x) }",
     "output 'y' is string; kiln's engines take and return bool, float16, float32, float64, int16, int32, int64, int8, uint16, uint32, uint64, uint8"),
])  # fmt: skip
def test_check_io_refuses_what_engines_cannot_take(text, message):
    with pytest.raises(InputError) as info:
        check_io(io_model(text))
    assert info.value.message == message
    assert info.value.hint.startswith("make the model take and return plain tensors of these types")


def test_a_profile_too_large_to_hold_is_bad_input():
    """Found by the fuzzing harness: --shapes seq=1..99999999999 ended in a MemoryError."""
    inputs = (TensorSpec("x", "float32", ("batch", "seq", 64)),)
    with pytest.raises(InputError) as info:
        build_profile(inputs, [("--shapes", "seq=1..99999999999"), ("--shapes", "batch=1..4")])
    assert info.value.message.startswith("at the profile's max the inputs take 95,367 GiB ('x' is [4, 99999999999, 64]); more than half")
    assert info.value.hint == "lower the max of the dims with --shapes NAME=MIN..MAX"
