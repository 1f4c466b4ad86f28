"""`kiln export triton`: each config.pbtxt rule, read back with Triton's own protobuf schema (tritonclient's
model_config_pb2), the files of each backend's version folder, and the refusals. The onnxruntime and
tensorrt repositories are checked here only: the tritonserver PyTriton ships has neither backend (the
python backend is served for real in test_triton_server.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format

from kiln import targets
from kiln.optimizer.errors import InputError
from kiln.optimizer.triton.config import ExportOptions, model_config, parse_config
from kiln.optimizer.triton.repository import export
from kiln.targets import DimRange, Profile, TensorSpec, read_manifest
from kiln.targets.manifest import BuildConfig, write_manifest
from kiln.targets.tensorrt import CONTEXT_MODEL, PLAN, context_model

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
KILN = [sys.executable, "-c", "import sys; from kiln.optimizer.cli import main; sys.exit(main(sys.argv[1:]))"]

X = TensorSpec("x", "float16", ("batch", 4, "height", "width"))
T = TensorSpec("t", "int64", ("batch",))
Y = TensorSpec("y", "float16", ("batch", 4, "height", "width"))
DYNAMIC = Profile((X, T), {"batch": DimRange(1, 4, 8), "height": DimRange(16, 32, 64), "width": DimRange(16, 32, 64)})


def config(profile: Profile = DYNAMIC, outputs=(Y,), **changes) -> BuildConfig:
    base = BuildConfig(target="cpu", model="model.onnx", device="cpu", providers=("CPUExecutionProvider",), provider_options={},
                       precision="fp16", tf32=False, cuda_graph=False, profile=profile, inputs=profile.inputs, outputs=tuple(outputs))  # fmt: skip
    return dataclasses.replace(base, **changes)


def written(message) -> pb.ModelConfig:
    """The config as config.pbtxt holds it, parsed back with Triton's schema."""
    parsed = parse_config(text_format.MessageToString(message))
    assert parsed == message
    return parsed


def test_names_data_types_and_a_leading_dynamic_batch():
    c = written(model_config("dit", config(), ExportOptions("onnxruntime")))
    assert (c.name, c.platform, c.backend) == ("dit", "onnxruntime_onnx", "")
    assert c.max_batch_size == 8  # the batch's max; dims leave it out, other dynamic dims are -1
    assert [(i.name, pb.DataType.Name(i.data_type), list(i.dims)) for i in c.input] == [("x", "TYPE_FP16", [4, -1, -1]), ("t", "TYPE_INT64", [])]
    assert [(o.name, pb.DataType.Name(o.data_type), list(o.dims)) for o in c.output] == [("y", "TYPE_FP16", [4, -1, -1])]


def test_a_static_batch_is_a_dim_like_any_other_and_nothing_is_batched():
    static = Profile((X, T), {"batch": DimRange(8, 8, 8), "height": DimRange(32, 32, 32), "width": DimRange(16, 32, 64)})
    c = written(model_config("dit", config(static), ExportOptions("onnxruntime")))
    assert c.max_batch_size == 0 and not c.HasField("dynamic_batching")
    assert [list(i.dims) for i in c.input] == [[8, 4, 32, -1], [8]]


def test_dynamic_batching_prefers_each_profile_s_opt_and_max_batch():
    small = Profile((X, T), {"batch": DimRange(1, 2, 4), "height": DimRange(16, 16, 32), "width": DimRange(16, 16, 32)})
    large = Profile((X, T), {"batch": DimRange(1, 4, 8), "height": DimRange(64, 64, 64), "width": DimRange(64, 64, 64)})
    c = written(model_config("m", config(profiles=(small, large)), ExportOptions("python", batch_wait_us=5000)))
    assert list(c.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert c.dynamic_batching.max_queue_delay_microseconds == 5000
    assert c.backend == "python" and c.platform == ""


@pytest.mark.parametrize("device, kind", [("cpu", "KIND_CPU"), ("cuda", "KIND_GPU")])
def test_instance_group_is_on_the_engine_s_device(device, kind):
    c = written(model_config("m", config(device=device), ExportOptions("onnxruntime", instances=3)))
    assert [(pb.ModelInstanceGroup.Kind.Name(g.kind), g.count) for g in c.instance_group] == [(kind, 3)]


def test_an_ort_tensorrt_engine_gets_triton_s_tensorrt_accelerator_options():
    target = targets.TARGETS["h200-ort-trt"]
    options = target.trt_options(DYNAMIC, "fp16", None)
    c = written(model_config("m", config(target=target.name, device="cuda", providers=target.providers, provider_options=options), ExportOptions("onnxruntime")))
    (accelerator,) = c.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {
        "precision_mode": "FP16", "trt_builder_optimization_level": "3",
        "trt_profile_min_shapes": "x:1x4x16x16,t:1", "trt_profile_opt_shapes": "x:4x4x32x32,t:4", "trt_profile_max_shapes": "x:8x4x64x64,t:8",
    }  # fmt: skip  (the engine and timing cache folders live in kiln's engine directory: left out)
    int8 = target.trt_options(DYNAMIC, "fp16", "int8")
    c = model_config("m", config(device="cuda", providers=target.providers, provider_options=int8), ExportOptions("onnxruntime"))
    assert c.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters["precision_mode"] == "INT8"
    bf16 = target.trt_options(DYNAMIC, "bf16", None)
    with pytest.raises(InputError, match="option trt_bf16_enable=1 has no counterpart in Triton's ONNX Runtime backend"):
        model_config("m", config(device="cuda", providers=target.providers, provider_options=bf16), ExportOptions("onnxruntime"))
    cuda = written(model_config("m", config(device="cuda", providers=("CUDAExecutionProvider",)), ExportOptions("onnxruntime")))
    assert not cuda.HasField("optimization")


@pytest.mark.parametrize("engine, backend, reason", [
    (config(outputs=(TensorSpec("y", "float16", (4, "batch")),)), "onnxruntime",
     "the dynamic dim 'batch', which every input and output has, is axis 1 of 'y': Triton batches requests along axis 0 only"),
    (config(profiles=(DYNAMIC, DYNAMIC)), "onnxruntime", "the engine has 2 profiles, and Triton's ONNX Runtime backend runs one session"),
    (config(model=CONTEXT_MODEL, providers=("TensorrtExecutionProvider",)), "onnxruntime", "is a TensorRT plan, which Triton serves with the tensorrt backend"),
    (config(), "tensorrt", "the engine (target cpu) is not a TensorRT plan; its backend is onnxruntime"),
    (config(outputs=(TensorSpec("y", "bfloat16", ("batch", 4, "height", "width")),)), "python",
     "bfloat16 tensors, which Triton's Python backend cannot hand over as numpy arrays"),
])  # fmt: skip
def test_an_engine_triton_cannot_serve_is_refused_with_the_reason(engine, backend, reason):
    with pytest.raises(InputError, match="Triton cannot serve this engine") as info:
        model_config("m", engine, ExportOptions(backend))
    assert reason in str(info.value)


def test_triton_s_schema_rejects_a_field_it_does_not_know():
    with pytest.raises(text_format.ParseError, match="max_batch"):
        parse_config('name: "m"\nmax_batch: 4\n')


def _onnx_engine(directory: Path, external: bool) -> Path:
    """A real engine directory: kiln's manifest over an ONNX model, its weights in model.onnx.data if external."""
    graph = onnx.parser.parse_graph("g (float[batch, 4] x) => (float[batch, 4] y) { y = MatMul(x, w) }")
    graph.initializer.append(onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w"))
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    directory.mkdir(parents=True)
    onnx.save(model, directory / "model.onnx", save_as_external_data=external, location="model.onnx.data", size_threshold=0)
    spec = TensorSpec("x", "float32", ("batch", 4))
    write_manifest(directory, config(Profile((spec,), {"batch": DimRange(1, 2, 4)}), outputs=(TensorSpec("y", "float32", ("batch", 4)),), precision="fp32"))
    return directory


@pytest.mark.parametrize("external", [False, True])
def test_an_onnx_engine_is_model_onnx_or_with_external_data_the_folder_triton_expects(tmp_path, external):
    engine = _onnx_engine(tmp_path / "engine", external)
    version = export([(engine, read_manifest(engine))], tmp_path / "repo", "m", 1, ExportOptions("onnxruntime"), force=False)
    files = sorted(str(p.relative_to(version)) for p in version.rglob("*"))
    assert files == (["model.onnx", "model.onnx/model.onnx", "model.onnx/model.onnx.data"] if external else ["model.onnx"])
    model = version / "model.onnx" / "model.onnx" if external else version / "model.onnx"
    loaded = onnx.load(model)  # the external data resolves beside it
    assert np.array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]), np.eye(4, dtype=np.float32))
    assert parse_config((tmp_path / "repo" / "m" / "config.pbtxt").read_text()).platform == "onnxruntime_onnx"


def _plan_engine(directory: Path, capability: str) -> Path:
    """The engine directory the tensorrt target writes: manifest, context model, plan. TensorRT cannot run
    here, so the plan is a stand-in file the export only copies."""
    directory.mkdir(parents=True)
    graph = onnx.parser.parse_graph("g (float[batch, 4] x) => (float[batch, 4] y) { y = Identity(x) }")
    onnx.save(context_model(onnx.helper.make_model(graph), PLAN, capability, "10.8"), directory / CONTEXT_MODEL)
    (directory / PLAN).write_bytes(f"plan for sm{capability}".encode())
    spec = TensorSpec("x", "float32", ("batch", 4))
    write_manifest(directory, config(Profile((spec,), {"batch": DimRange(1, 2, 4)}), outputs=(TensorSpec("y", "float32", ("batch", 4)),),
                                     target="h100-trt", model=CONTEXT_MODEL, device="cuda", providers=("TensorrtExecutionProvider",),
                                     built_with={"compute_capability": capability}))  # fmt: skip
    return directory


def test_plans_for_several_gpus_are_chosen_by_compute_capability(tmp_path):
    engines = [(e, read_manifest(e)) for e in (_plan_engine(tmp_path / "h100", "9.0"), _plan_engine(tmp_path / "l40s", "8.9"))]
    version = export(engines, tmp_path / "repo", "m", 1, ExportOptions("tensorrt"), force=False)
    c = parse_config((tmp_path / "repo" / "m" / "config.pbtxt").read_text())
    assert c.platform == "tensorrt_plan" and dict(c.cc_model_filenames) == {"9.0": "model.sm90.plan", "8.9": "model.sm89.plan"}
    assert (version / "model.sm89.plan").read_bytes() == b"plan for sm8.9"
    onnx_engine = _onnx_engine(tmp_path / "onnx", external=False)
    with pytest.raises(InputError, match="the engines given together are not TensorRT plans of one model"):
        export([engines[0], (onnx_engine, read_manifest(onnx_engine))], tmp_path / "repo", "mixed", 1, ExportOptions("tensorrt"), force=False)
    single = export(engines[:1], tmp_path / "repo", "one", 1, ExportOptions("tensorrt"), force=False)
    assert [p.name for p in single.iterdir()] == ["model.plan"]
    assert not parse_config((tmp_path / "repo" / "one" / "config.pbtxt").read_text()).cc_model_filenames


def kiln(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*KILN, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_export_refuses_what_is_not_an_engine_an_existing_version_and_a_name_triton_forbids(tmp_path):
    engine = _onnx_engine(tmp_path / "out" / "engine", external=False)
    done = kiln("export", "triton", tmp_path, "repo", cwd=tmp_path)
    assert done.returncode == 2 and f"{tmp_path} holds no engine: engine.json is missing" in done.stderr, done.stderr
    done = kiln("export", "triton", "out", "repo", "--name", "../up", cwd=tmp_path)
    assert done.returncode == 2 and "'../up' is not a name Triton can serve a model under" in done.stderr, done.stderr
    assert not (tmp_path / "up").exists()
    done = kiln("export", "triton", "out", "repo", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"repository": "repo", "model": "out", "version": 1, "backend": "onnxruntime", "path": "repo/out/1"}
    (tmp_path / "repo" / "out" / "1" / "model.onnx").write_bytes(b"changed")
    done = kiln("export", "triton", "out", "repo", cwd=tmp_path)
    assert done.returncode == 2 and "repo/out/1 exists: version 1 of model 'out' is in the repository already" in done.stderr
    assert "pass --version 2 for a new version, or --force" in done.stderr
    done = kiln("export", "triton", "out", "repo", "--force", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "repo" / "out" / "1" / "model.onnx").read_bytes() == (engine / "model.onnx").read_bytes()
    done = kiln("export", "triton", "out", "repo", "--version", "2", "--backend", "python", cwd=tmp_path)
    assert done.returncode == 2 and "model 'out' has version(s) 1 with another config.pbtxt" in done.stderr, done.stderr
    assert kiln("export", "triton", "out", "repo", "--version", "2", cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "repo" / "out").iterdir()) == ["1", "2", "config.pbtxt"]  # nothing half-written beside them
    assert engine.is_dir()
