"""Engines of several profiles: the session settings each profile runs with, the manifest that holds
them, and the dispatch of each request to the smallest profile that holds its shape."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from kiln import targets
from kiln.targets import DimRange, EngineError, EngineSet, HostBuffers, Profile, TensorSpec
from kiln.targets.manifest import with_profiles

from tests.targets.test_engine import double_model, want

X = (TensorSpec("x", "float32", ("n", 3)),)
SMALL, LARGE, WIDE = (Profile(X, {"n": DimRange(*r)}) for r in ((2, 2, 2), (8, 8, 8), (1, 4, 16)))


def config_for(target: targets.Target, profile: Profile) -> targets.BuildConfig:
    options = target.trt_options(profile, "fp16", None) if hasattr(target, "trt_options") else target.config(profile, "fp16").provider_options
    return targets.BuildConfig(target=target.name, model="m.onnx", device="cuda", providers=target.providers, provider_options=options,
                               precision="fp16", tf32=True, cuda_graph=True, profile=profile, inputs=X, outputs=X)  # fmt: skip


def test_each_profile_runs_with_its_own_cuda_graph_and_tensorrt_shapes():
    cuda = with_profiles(config_for(targets.get_target("h100"), SMALL), WIDE, (SMALL, WIDE))
    assert "enable_cuda_graph" not in cuda.provider_options and cuda.cuda_graph  # static profiles are captured
    small, wide = cuda.member(0), cuda.member(1)
    assert (small.profile, small.cuda_graph, small.provider_options["enable_cuda_graph"]) == (SMALL, True, "1")
    assert (wide.profile, wide.cuda_graph, "enable_cuda_graph" in wide.provider_options) == (WIDE, False, False)
    assert small.profiles == () == wide.profiles

    trt = with_profiles(config_for(targets.get_target("h100-ort-trt"), SMALL), WIDE, (SMALL, LARGE, WIDE))
    assert trt.provider_options["trt_profile_max_shapes"] == "x:16x3" and "trt_cuda_graph_enable" not in trt.provider_options
    assert [trt.member(i).provider_options["trt_engine_cache_path"] for i in range(3)] == [f"trt-cache/profile-{i}" for i in (1, 2, 3)]
    assert trt.member(0).provider_options["trt_timing_cache_path"] == "trt-cache"  # one timing cache for them all
    large = trt.member(1)
    assert [large.provider_options[f"trt_profile_{c}_shapes"] for c in ("min", "opt", "max")] == ["x:8x3"] * 3
    assert large.provider_options["trt_cuda_graph_enable"] == "1"
    assert [trt.member(2).provider_options[f"trt_profile_{c}_shapes"] for c in ("min", "opt", "max")] == ["x:1x3", "x:4x3", "x:16x3"]
    assert trt.member(2).cuda_graph is False and "trt_cuda_graph_enable" not in trt.member(2).provider_options
    # A target that captures no CUDA graphs (the CPU) captures none for a static profile either.
    cpu = with_profiles(dataclasses.replace(config_for(targets.get_target("h100"), SMALL), cuda_graph=False), WIDE, (SMALL, WIDE))
    assert cpu.member(0).cuda_graph is False and "enable_cuda_graph" not in cpu.member(0).provider_options


@pytest.fixture
def engine_set(tmp_path) -> EngineSet:
    double_model(tmp_path / "m.onnx")
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    targets.CPU.build_for(tmp_path / "m.onnx", engine_dir, WIDE, "fp32", None, (SMALL, LARGE, WIDE))
    return targets.load_engine(engine_dir)


def test_the_manifest_holds_the_profiles_and_load_makes_a_session_per_static_one(engine_set):
    assert isinstance(engine_set, EngineSet) and engine_set.config == targets.read_manifest(engine_set.directory)
    assert engine_set.config.profiles == (SMALL, LARGE, WIDE) and engine_set.profile == WIDE
    # Version 3: a kiln that reads one profile refuses it, rather than run it as one.
    assert json.loads((engine_set.directory / "engine.json").read_text())["version"] == 3
    assert [m.profile for m in engine_set.members] == [SMALL, LARGE, WIDE]
    assert len({id(m.session) for m in engine_set.members}) == 3
    # A static profile's outputs have their sizes: a CUDA graph binds them before its first run (which captures it).
    assert [[s.shape for s in m.outputs] for m in engine_set.members] == [[(2, 3), (2, 1)], [(8, 3), (8, 1)], [("n", 3), ("n", 1)]]
    # A static profile's session has ONNX Runtime's dims fixed to its shape, and refuses another.
    assert [i.shape for i in engine_set.members[0].session.get_inputs()] == [[2, 3]]
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        engine_set.members[0].session.run(None, {"x": np.zeros((3, 3), np.float32)})


def test_each_request_runs_on_the_smallest_profile_that_holds_it(engine_set):
    binding = engine_set.bind(HostBuffers())
    for n, profile in ((2, 0), (8, 1), (5, 2), (2, 0), (16, 2)):
        x = np.random.default_rng(n).standard_normal((n, 3)).astype(np.float32)
        got = binding.run({"x": x})
        assert binding.profile == profile, n
        for name, value in got.items():
            np.testing.assert_allclose(value, want(x)[name], rtol=1e-6)
    assert sorted(binding.bindings) == [0, 1, 2]  # one binding per profile, kept
    assert engine_set.check_feeds({"x": np.zeros((17, 3), np.float32)}, "f") == [
        "shapes x [17, 3] are in none of the engine's 3 profiles; the engine was not verified at this shape"]
    assert binding.run({"x": np.ones((17, 3), np.float32)})["y"].shape == (17, 3) and binding.profile == 2  # the dynamic one


def test_a_shape_no_static_profile_holds_is_refused_with_the_profiles(tmp_path):
    double_model(tmp_path / "m.onnx")
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    targets.CPU.build_for(tmp_path / "m.onnx", engine_dir, Profile(X, {"n": DimRange(2, 2, 8)}), "fp32", None, (SMALL, LARGE))
    engine = targets.load_engine(engine_dir)
    with pytest.raises(EngineError) as info:
        engine.run({"x": np.zeros((3, 3), np.float32)})
    assert info.value.message == "shapes x [3, 3] are in none of the engine's 2 profiles, which are all static: n 2; n 8"
    assert info.value.hint == "give one of those shapes, or rebuild with a profile that holds this one (--profile-from, --shapes)"
