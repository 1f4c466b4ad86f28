"""The TensorRT side, up to the calls into TensorRT: the network flags and profiles a build hands
TensorRT, the context model through which ONNX Runtime runs a plan, ONNX Runtime's TensorRT provider
options, the builder settings from the command line, the refusal where TensorRT is missing, and graphs
free of com.microsoft ops for both. TensorRT cannot be installed here: the build test skips without it."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from kiln import passes, targets
from kiln.optimizer.build import select_passes
from kiln.optimizer.config import Options
from kiln.targets import DimRange, EngineError, Profile, TensorSpec, read_manifest
from kiln.targets.ort import OrtTarget
from kiln.targets.ort import graph_specs
from kiln.targets.ort_tensorrt import qdq_format, tensorrt_missing
from kiln.optimizer.cli import main
from kiln.optimizer.errors import InputError
from kiln.optimizer.optimize import tensorrt_settings
from kiln.targets.tensorrt import TensorRtTarget, build_plan, build_settings, context_model, tensorrt

PROFILE = Profile(
    (TensorSpec("x", "float32", ("batch", 4, "height", "height")), TensorSpec("t", "int64", ("batch",))),
    {"batch": DimRange(1, 8, 16), "height": DimRange(16, 32, 64)},
)


def _graph(qdq: str | None) -> onnx.GraphProto:
    text = """
    <ir_version: 10, opset_import: ["" : 21]>
    g (float[batch,4,height,height] x, int64[batch] t) => (float[batch,4,height,height] y) { y = Identity(x) }
    """
    model = onnx.parser.parse_model(text)
    if qdq:
        zero = np.zeros((), np.int8) if qdq == "int8" else None
        tensor = onnx.numpy_helper.from_array(zero, "zp") if zero is not None else onnx.helper.make_tensor("zp", onnx.TensorProto.FLOAT8E4M3FN, [], [0])
        model.graph.initializer.extend([tensor, onnx.numpy_helper.from_array(np.ones((), np.float32), "s")])
        model.graph.node.extend([onnx.helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
                                 onnx.helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"])])  # fmt: skip
    return model.graph


def test_the_qdq_format_is_read_from_zero_points_constants_or_output_dtype():
    assert qdq_format(_graph(None)) is None and qdq_format(_graph("int8")) == "int8" and qdq_format(_graph("fp8")) == "fp8"
    graph = _graph(None)
    graph.node.extend([onnx.helper.make_node("Constant", [], ["zc"], value=onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT8E4M3FN, [], [0])),
                       onnx.helper.make_node("QuantizeLinear", ["x", "s", "zc"], ["q"])])  # fmt: skip
    assert qdq_format(graph) == "fp8"
    graph = _graph(None)
    graph.node.append(onnx.helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=onnx.TensorProto.FLOAT8E5M2))
    assert qdq_format(graph) == "fp8"
    graph = _graph(None)
    graph.node.append(onnx.helper.make_node("QuantizeLinear", ["x", "s"], ["q"]))  # uint8 without a zero point
    assert qdq_format(graph) == "int8"


def test_graph_specs_name_the_dims_a_graph_leaves_unnamed():
    model = onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[N,?] x) => (float[N,?] y) { y = Identity(x) }
    """)  # fmt: skip
    assert graph_specs(model.graph.input) == (TensorSpec("x", "float32", ("N", "x_1")),)
    assert graph_specs(model.graph.output) == (TensorSpec("y", "float32", ("N", "y_1")),)


def test_a_qdq_graph_gets_a_strongly_typed_network_and_no_precision_flag(tmp_path):
    plain = build_settings(_graph(None), [PROFILE], "fp16", tmp_path / "timing.cache", optimization_level=5, time_limit_s=600)
    assert (plain.strongly_typed, plain.precision_flags) == (False, ("FP16",))
    assert plain.profiles == ((("x", (1, 4, 16, 16), (8, 4, 32, 32), (16, 4, 64, 64)), ("t", (1,), (8,), (16,))),)
    assert (plain.optimization_level, plain.timing_cache, plain.time_limit_s) == (5, str(tmp_path / "timing.cache"), 600)
    assert build_settings(_graph(None), [PROFILE], "bf16").precision_flags == ("BF16",)
    assert build_settings(_graph(None), [PROFILE], "fp32").precision_flags == ()
    for fmt in ("int8", "fp8"):
        typed = build_settings(_graph(fmt), [PROFILE], "fp16")
        assert (typed.strongly_typed, typed.precision_flags) == (True, ())
    # One TensorRT optimization profile per kiln profile.
    small = Profile(PROFILE.inputs, {"batch": DimRange(1, 1, 1), "height": DimRange(16, 16, 16)})
    assert len(build_settings(_graph(None), [PROFILE, small], "fp16").profiles) == 2
    with pytest.raises(ValueError, match="TensorRT's builder optimization level is 0 to 5, not 7"):
        build_settings(_graph(None), [PROFILE], "fp16", optimization_level=7)


def test_ort_tensorrt_provider_options_come_from_the_profile_and_precision():
    target = targets.TARGETS["h200-ort-trt"]
    assert target.providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert PROFILE.shapes_text("opt") == "x:8x4x32x32,t:8"
    options = target.trt_options(PROFILE, "fp16", None)
    assert options == {
        "trt_engine_cache_enable": "1", "trt_engine_cache_path": "trt-cache", "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": "trt-cache", "trt_builder_optimization_level": "3", "trt_fp16_enable": "1",
        "trt_int8_enable": "0", "trt_profile_min_shapes": "x:1x4x16x16,t:1",
        "trt_profile_opt_shapes": "x:8x4x32x32,t:8", "trt_profile_max_shapes": "x:16x4x64x64,t:16",
    }  # fmt: skip
    bf16 = target.trt_options(PROFILE, "bf16", "int8")
    assert (bf16["trt_bf16_enable"], bf16["trt_fp16_enable"]) == ("1", "0")
    assert target.quantize == ("int8",)  # no FP8 flag in ONNX Runtime's provider, and nothing here has run
    assert target.trt_options(PROFILE, "fp16", "int8")["trt_int8_enable"] == "1"
    static = Profile(PROFILE.inputs, {"batch": DimRange(2, 2, 2), "height": DimRange(32, 32, 32)})
    assert target.trt_options(static, "fp16", None)["trt_cuda_graph_enable"] == "1"


def test_tensorrt_targets_are_refused_here_with_the_reason(monkeypatch):
    if tensorrt_missing() is None:
        pytest.skip("TensorRT is installed here")
    assert TensorRtTarget("x", "tensorrt", "", ("fp16",), ()).available() == "TensorRT is not installed: this target builds and runs TensorRT plans"
    # With ONNX Runtime's providers present (as on the GPU machine), the variant still names what is missing.
    monkeypatch.setattr(OrtTarget, "available", lambda self: None)
    assert targets.TARGETS["h200-ort-trt"].available() == (
        "TensorRT is not installed (libnvinfer.so.10 cannot be loaded); ONNX Runtime's TensorRT provider needs it"
    )
    with pytest.raises(EngineError, match="TensorRT is not installed") as info:
        tensorrt()
    assert "kiln-ml[trt]" in info.value.hint


def test_tensorrt_targets_get_graphs_without_contrib_ops(block_engine):
    """The ORT TensorRT variant's passes (and so the native builder's input) leave standard ONNX only."""
    raw = block_engine.parent / "ex" / "model.onnx"
    for name in ("h200-ort-trt", "t4-ort-trt", "h200-trt"):
        chosen = select_passes(Options(precision="fp16"), targets.TARGETS[name])
        assert "ort-fusions" not in [p.name for p in chosen]
        optimized, _ = passes.PassManager(chosen).run(ir.load(raw))
        assert {node.domain for node in optimized.graph} <= {"", "ai.onnx"}, name
    cuda, _ = passes.PassManager(select_passes(Options(precision="fp16"), targets.TARGETS["h200"])).run(ir.load(raw))
    assert "com.microsoft" in {node.domain for node in cuda.graph}  # the CUDA target's fusions do use them


def test_a_manifest_cache_path_out_of_the_engine_directory_is_refused(block_engine, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(block_engine, copy)
    manifest = copy / "engine" / "engine.json"
    body = json.loads(manifest.read_text())
    body["provider_options"]["trt_engine_cache_path"] = "../../elsewhere"
    manifest.write_text(json.dumps(body))
    with pytest.raises(EngineError, match="provider option trt_engine_cache_path is '../../elsewhere', not a folder of the engine directory"):
        read_manifest(copy / "engine")
    body["provider_options"]["trt_engine_cache_path"] = "trt-cache"
    body["provider_options"]["trt_extra_plugin_lib_paths"] = "/tmp/evil.so"
    manifest.write_text(json.dumps(body))
    with pytest.raises(EngineError, match="provider option trt_extra_plugin_lib_paths names a file or library, which kiln never writes"):
        read_manifest(copy / "engine")
    del body["provider_options"]["trt_extra_plugin_lib_paths"]
    manifest.write_text(json.dumps(body))
    config = read_manifest(copy / "engine")
    assert config.session_providers(None, copy / "engine")[0][1]["trt_engine_cache_path"] == str(copy / "engine" / "trt-cache")


def test_a_plan_s_context_model_is_what_onnx_runtime_reads_as_a_tensorrt_plan(tmp_path):
    """The one-node model a NAME-trt engine loads: the source's inputs (no weights) and outputs, and an
    EPContext node naming the plan beside it, which ONNX Runtime checks against its schema and hands
    only to its TensorRT provider."""
    model = onnx.helper.make_model(_graph("int8"), opset_imports=[onnx.helper.make_opsetid("", 21)])
    model.graph.input.append(onnx.helper.make_tensor_value_info("s", onnx.TensorProto.FLOAT, []))  # an initializer listed as input
    wrapped = context_model(model, "model.plan", "8.9", "10.13.0")
    onnx.checker.check_model(wrapped, full_check=True)
    assert [i.name for i in wrapped.graph.input] == ["x", "t"] and wrapped.graph.output == model.graph.output
    assert graph_specs(wrapped.graph.input) == graph_specs(model.graph.input, model.graph.initializer)
    (node,) = wrapped.graph.node
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, node.domain, list(node.input), list(node.output)) == ("EPContext", "com.microsoft", ["x", "t"], ["y"])
    assert attributes == {"main_context": 1, "embed_mode": 0, "ep_cache_context": b"model.plan", "source": b"TensorrtExecutionProvider",
                          "ep_sdk_version": b"10.13.0", "hardware_architecture": b"89"}  # fmt: skip
    assert {(o.domain, o.version) for o in wrapped.opset_import} == {("", 21), ("com.microsoft", 1)}
    onnx.save(wrapped, tmp_path / "model.trt.onnx")
    with pytest.raises(Exception, match="EPContext node generated by 'TensorrtExecutionProvider' is not compatible with any execution provider"):
        ort.InferenceSession(tmp_path / "model.trt.onnx", providers=["CPUExecutionProvider"])


def test_every_gpu_has_a_native_tensorrt_target_that_is_refused_here_with_the_reason(tmp_path, capsys):
    for name, gpu in targets.GPUS.items():
        trt, cuda = targets.TARGETS[f"{name}-trt"], targets.TARGETS[name]
        assert (trt.family, trt.gpu, trt.precisions, trt.quantize) == ("tensorrt", gpu, cuda.precisions, cuda.quantize)
    assert "fp8" in targets.TARGETS["h200-trt"].quantize and "fp8" not in targets.TARGETS["a100-trt"].quantize
    if tensorrt_missing() is not None and importlib.util.find_spec("tensorrt") is None:
        model = tmp_path / "m.onnx"
        onnx.save(onnx.helper.make_model(_graph(None)), model)
        assert main(["optimize", str(model), "-o", str(tmp_path / "out"), "--target", "h100-trt", "--shapes", "batch=2", "--shapes", "height=16"]) == 2
        assert "target 'h100-trt' is not available here: TensorRT is not installed: this target builds and runs TensorRT plans" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_tensorrt_builder_settings_from_the_command_line_reach_only_tensorrt_targets(tmp_path, capsys):
    options = Options(trt_opt_level=5, trt_time_limit=900)
    native = tensorrt_settings(options, targets.TARGETS["h200-trt"])
    assert (native.name, native.optimization_level, native.time_limit_s) == ("h200-trt", 5, 900)
    level_only = tensorrt_settings(Options(trt_opt_level=1), targets.TARGETS["h200-ort-trt"])
    assert level_only.trt_options(PROFILE, "fp16", None)["trt_builder_optimization_level"] == "1"
    assert tensorrt_settings(Options(), targets.TARGETS["h200"]) is targets.TARGETS["h200"]
    # Timing caches: the build's own in the engine directory, or one per target and TensorRT version shared by builds.
    assert native.timing_cache(tmp_path / "engine", "10.13.0") == tmp_path / "engine" / "timing.cache"
    shared = dataclasses.replace(native, timing_cache_dir=tmp_path / "timing")
    assert shared.timing_cache(tmp_path / "engine", "10.13.0") == tmp_path / "timing" / "h200-trt-tensorrt-10.13.0.cache"
    with pytest.raises(InputError, match="--trt-time-limit: ONNX Runtime's TensorRT provider \\('h200-ort-trt'\\) has no build-time limit"):
        tensorrt_settings(options, targets.TARGETS["h200-ort-trt"])
    with pytest.raises(InputError, match="--trt-opt-level, --trt-time-limit: only for TensorRT targets, and 'h200' is not one"):
        tensorrt_settings(options, targets.TARGETS["h200"])
    for flags, message in ((["--trt-opt-level", "6"], "--trt-opt-level 6: TensorRT's builder optimization levels are 0 to 5"),
                           (["--trt-time-limit", "0"], "--trt-time-limit 0: must be a positive number of seconds")):  # fmt: skip
        assert main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"), *flags]) == 2
        assert f"kiln: error: {message}" in capsys.readouterr().err


def test_a_plan_is_built_and_runs_where_tensorrt_is_installed(tmp_path):
    pytest.importorskip("tensorrt")
    model = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(_graph(None)), model)
    build_plan(model, tmp_path / "model.plan", build_settings(_graph(None), [PROFILE], "fp16", tmp_path / "timing.cache"))
    assert (tmp_path / "model.plan").stat().st_size > 0 and (tmp_path / "timing.cache").is_file()
    # Through the NAME-trt target: the plan, its context model and the manifest, loaded and run by ONNX Runtime.
    relu = onnx.parser.parse_model("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[batch,4] x) => (float[batch,4] y) { y = Relu(x) }
    """)  # fmt: skip
    onnx.save(relu, model)
    (tmp_path / "engine").mkdir()
    profile = Profile((TensorSpec("x", "float32", ("batch", 4)),), {"batch": DimRange(1, 4, 8)})
    targets.TARGETS[f"{targets.gpu_here()[1].name}-trt"].build(model, tmp_path / "engine", profile, "fp32")
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(targets.load_engine(tmp_path / "engine").run({"x": x})["y"], np.maximum(x, 0))
