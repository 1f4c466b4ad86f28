"""Targets: the registry, profiles and tensor specs, and the build config each ONNX Runtime target chooses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln import targets
from kiln.targets import DimRange, Profile, TensorSpec


def test_registry_and_description():
    assert targets.get_target("cpu") is targets.CPU
    with pytest.raises(KeyError, match="unknown target 'tpu'; known targets: auto, cpu, cuda, t4, a10g"):
        targets.get_target("tpu")
    described = targets.CPU.describe()
    assert described["available"] and described["unavailable_reason"] is None
    assert described["precisions"] == ["fp32", "fp16"]


def test_profile_corners_contains_and_json_round_trip():
    profile = Profile(
        (TensorSpec("a", "float32", ("b", "s", 8)), TensorSpec("m", "int64", ("b", 1))),
        {"b": DimRange(1, 2, 4), "s": DimRange(16, 16, 64)},
    )
    assert profile.corners() == [
        ("min", {"a": (1, 16, 8), "m": (1, 1)}),
        ("opt", {"a": (2, 16, 8), "m": (2, 1)}),
        ("max", {"a": (4, 64, 8), "m": (4, 1)}),
    ]
    assert profile.contains({"a": (3, 20, 8), "m": (3, 1)}) is None
    assert profile.contains({"a": (5, 20, 8), "m": (5, 1)}) == "a axis 0 (b) is 5, outside the profile 1..4"
    assert Profile.from_json(json.loads(json.dumps(profile.to_json()))) == profile
    static = Profile((TensorSpec("a", "float32", (2, 3)),), {})
    assert static.corners() == [("static", {"a": (2, 3)})]
    with pytest.raises(ValueError, match="do not match the inputs' dims"):
        Profile((TensorSpec("a", "float32", ("b",)),), {})
    with pytest.raises(ValueError, match="need 1 <= min <= opt <= max"):
        DimRange(4, 2, 8)


def test_an_axis_derived_from_a_dim_follows_it():
    # GLM-Image's prior tokens, one per 2x2 patch; a clip's tied frame counts.
    profile = Profile(
        (TensorSpec("x", "float32", ("b", 4, "h", "w")), TensorSpec("ids", "int64", ("b", "h/2", "w/2")),
         TensorSpec("pose", "float32", ("f-1", "4*f-7", "3*h/2+1"))),
        {"b": DimRange(1, 1, 2), "h": DimRange(8, 16, 32), "w": DimRange(8, 8, 8), "f": DimRange(2, 3, 5)},
    )  # fmt: skip
    assert profile.inputs[1].dynamic_dims == ("b", "h", "w") and profile.inputs[2].dynamic_dims == ("f", "h")
    assert profile.shapes(profile.sizes("max")) == {"x": (2, 4, 32, 8), "ids": (2, 16, 4), "pose": (4, 13, 49)}
    assert profile.contains(profile.shapes(profile.sizes("opt"))) is None
    with pytest.raises(ValueError, match="do not match the inputs' dims"):  # a derived dim's base needs a range
        Profile((TensorSpec("ids", "int64", ("h/2",)),), {"h/2": DimRange(1, 1, 1)})


def test_verification_checks_every_combination_of_extremes():
    profile = Profile(
        (TensorSpec("a", "float32", ("b", "s", 8)), TensorSpec("m", "int64", ("b", 1))),
        {"b": DimRange(1, 2, 4), "s": DimRange(16, 16, 64)},
    )
    assert profile.check_points() == [
        ("min", {"a": (1, 16, 8), "m": (1, 1)}),
        ("opt", {"a": (2, 16, 8), "m": (2, 1)}),
        ("max", {"a": (4, 64, 8), "m": (4, 1)}),
        # The corners off the diagonal, where exporters go wrong: batch at its max, sequence at its min.
        ("b min, s max", {"a": (1, 64, 8), "m": (1, 1)}),
        ("b max, s min", {"a": (4, 16, 8), "m": (4, 1)}),
    ]
    static = Profile((TensorSpec("a", "float32", (2, 3)),), {})
    assert static.check_points() == [("static", {"a": (2, 3)})]


@pytest.mark.parametrize("k", [3, 4, 5, 7, 12])
def test_many_dims_get_a_covering_set_of_extremes(k):
    names = [f"d{i}" for i in range(k)]
    profile = Profile((TensorSpec("x", "float32", tuple(names)),), {n: DimRange(1, 2, 3) for n in names})
    points = [shapes["x"] for _, shapes in profile.check_points()]
    assert len(set(points)) == len(points)
    extremes = [p for p in points if 2 not in p]  # opt is 2 everywhere
    assert len(extremes) == (2**k if k <= 4 else len(extremes)) and (k <= 4 or len(extremes) <= 8)
    for i in range(k):
        for j in range(i + 1, k):  # every pair of dims meets at each of the four pairs of extremes
            assert {(p[i], p[j]) for p in extremes} == {(1, 1), (1, 3), (3, 1), (3, 3)}
    assert (1,) * k in extremes and (3,) * k in extremes


def test_random_inputs_are_seeded_and_typed():
    specs = (TensorSpec("f", "float32", ("n",)), TensorSpec("i", "int64", ("n",)), TensorSpec("b", "bool", (2,)))
    profile = Profile(specs, {"n": DimRange(1, 2, 5)}, {"i": (10, 12)})
    shapes = {"f": (5,), "i": (5,), "b": (2,)}
    first = profile.random_inputs(shapes, seed=3)
    second = profile.random_inputs(shapes, seed=3)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    assert first["f"].dtype == np.float32 and np.all(np.abs(first["f"]) <= 1)
    assert first["i"].dtype == np.int64 and set(first["i"]) <= {10, 11}
    assert first["b"].dtype == bool


def test_cuda_targets_say_why_they_are_unavailable_and_choose_their_session_settings():
    import onnxruntime as ort

    from kiln.optimizer.build import select_passes
    from kiln.optimizer.config import Options

    for target in (targets.CUDA, targets.H100):
        assert target.family == "cuda"
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            assert target.available() == f"onnxruntime {ort.__version__} here lacks CUDAExecutionProvider"
    spec = TensorSpec("x", "float32", ("batch",))
    static = Profile((spec,), {"batch": DimRange(4, 4, 4)})
    dynamic = Profile((spec,), {"batch": DimRange(1, 2, 4)})
    fp16 = targets.CUDA.config(dynamic, "fp16")
    assert fp16.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert fp16.provider_options == {"cudnn_conv_algo_search": "HEURISTIC"} and fp16.tf32 and not fp16.cuda_graph
    # fp32 engines run without TF32 (verified to fp32's tolerance); fp16 ones keep it (tensor-core convolutions).
    fp32 = targets.H100.config(static, "fp32")
    assert fp32.provider_options == {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested",
                                     "enable_cuda_graph": "1", "use_tf32": "0"}  # fmt: skip
    assert fp32.cuda_graph and not fp32.tf32
    assert fp32.session_providers(cuda_stream=1234)[0] == ("CUDAExecutionProvider", {**fp32.provider_options, "user_compute_stream": "1234"})
    assert fp32.session_providers()[1] == "CPUExecutionProvider"
    cpu = targets.CPU.config(static, "fp32")
    assert not cpu.cuda_graph and cpu.session_providers(cuda_stream=1234) == [("CPUExecutionProvider", {})]
    assert "ort-fusions" in [p.name for p in select_passes(Options(), targets.H100)]
    assert "ort-fusions" not in [p.name for p in select_passes(Options(), targets.CPU)]
