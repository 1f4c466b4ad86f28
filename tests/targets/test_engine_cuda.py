"""The one binding on a GPU: kiln's block example built for target `cuda`, dynamic and frozen to one
shape (a CUDA graph), run through ONNX Runtime device buffers (`kiln run`, bench, verification) and
torch CUDA tensors (the serving pipeline), against the same model on the CPU. Skipped without a CUDA
device and onnxruntime-gpu (CI has neither)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln import targets
from kiln.optimizer.cli import main

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("needs a CUDA device and onnxruntime-gpu", allow_module_level=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("block")
    assert main(["example", "block", str(root / "ex")]) == 0
    out = {}
    for name, target, shapes in (("cpu", "cpu", ["batch=1..2..4", "seq=4..8..16"]), ("dynamic", "cuda", ["batch=1..2..4", "seq=4..8..16"]),
                                 ("static", "cuda", ["batch=2", "seq=8"])):  # fmt: skip
        args = ["optimize", str(root / "ex" / "model.onnx"), "-o", str(root / name), "--target", target, "--bench-runs", "2"]
        assert main(args + [a for s in shapes for a in ("--shapes", s)]) == 0
        out[name] = targets.load_engine(root / name / "engine")
    return out


def feeds(shape, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def test_the_manifest_carries_the_gpu_session_settings(built):
    static, dynamic = built["static"].config, built["dynamic"].config
    assert static.cuda_graph and static.provider_options["enable_cuda_graph"] == "1" and static.provider_options["use_tf32"] == "0"
    assert not dynamic.cuda_graph and "enable_cuda_graph" not in dynamic.provider_options
    assert static.built_with["session_providers"].startswith("CUDAExecutionProvider")
    assert built["static"].session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_ort_device_buffers_match_the_cpu_engine(built, kind):
    shapes = [(2, 8, 64)] if kind == "static" else [(2, 8, 64), (4, 16, 64), (1, 4, 64)]
    for i, shape in enumerate(shapes):
        x = feeds(shape, i)
        np.testing.assert_allclose(built[kind].run(x)["y"], built["cpu"].run(x)["y"], atol=1e-4, rtol=1e-3)
    run = built[kind].device_runner(feeds(shapes[0]))
    run()
    if kind == "static":
        with pytest.raises(targets.EngineError, match="captured as a CUDA graph"):
            built[kind].run(feeds((1, 8, 64)))


def test_torch_buffers_match_the_ort_buffers(built):
    engine = built["dynamic"]
    binding = engine.bind(targets.TorchCudaBuffers(torch))
    for i, shape in enumerate([(2, 8, 64), (3, 5, 64), (2, 8, 64)]):
        x = feeds(shape, i)
        got = binding.run({"x": torch.from_numpy(x["x"]).cuda()})["y"]
        assert got.is_cuda and tuple(got.shape) == shape
        np.testing.assert_allclose(got.cpu().numpy(), engine.run(x)["y"], atol=1e-5, rtol=1e-5)
    assert binding.outputs_bound  # torch tensors cannot wrap ONNX Runtime's outputs: they were bound here


def test_a_cuda_graph_engine_through_torch_buffers(tmp_path):
    assert main(["example", "block", str(tmp_path / "ex")]) == 0
    assert main(["optimize", str(tmp_path / "ex" / "model.onnx"), "-o", str(tmp_path / "s"), "--target", "cuda",
                 "--shapes", "batch=2", "--shapes", "seq=8", "--bench-runs", "0"]) == 0  # fmt: skip
    engine = targets.load_engine(tmp_path / "s" / "engine")
    cpu = targets.load_engine(tmp_path / "s" / "engine")  # a second session: its own graph
    binding = engine.bind(targets.TorchCudaBuffers(torch))
    for seed in range(3):  # replays of the captured graph see each new input
        x = feeds((2, 8, 64), seed)
        got = binding.run({"x": torch.from_numpy(x["x"]).cuda()})["y"].cpu().numpy()
        np.testing.assert_allclose(got, cpu.run(x)["y"], atol=1e-5, rtol=1e-5)
