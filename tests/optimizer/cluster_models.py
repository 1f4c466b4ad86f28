"""Engines the Ray tests serve, built in the test from seeded ONNX graphs: a chain of matrix products whose
cost grows with its `rows` dim (slow enough to hold a replica busy), and a decoder-shaped model
(latent_sample -> sample, 8x upscaled) for decode jobs."""

from __future__ import annotations

import contextlib
import io
import socket
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.optimizer.cli import main

WIDTH = 512
DEPTH = 24
REPEAT = 32


def slow_model(path: Path) -> Path:
    """y = the mean over REPEAT copies of tanh(... tanh(x W1) ... WD): x [batch, rows, 512], a small input
    that costs about 0.4 GFLOP per row."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32), f"w{i}") for i in range(DEPTH)]
    weights += [numpy_helper.from_array(np.array([1, REPEAT, 1], np.int64), "repeats"), numpy_helper.from_array(np.array([0, REPEAT, -1, WIDTH], np.int64), "split")]
    nodes, last = [helper.make_node("Tile", ["x", "repeats"], ["tiled"])], "tiled"
    for i in range(DEPTH):
        nodes += [helper.make_node("MatMul", [last, f"w{i}"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        last = f"t{i}"
    nodes += [helper.make_node("Reshape", [last, "split"], ["copies"]), helper.make_node("ReduceMean", ["copies"], ["y"], axes=[1], keepdims=0)]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "rows", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "rows", WIDTH])], weights)  # fmt: skip
    return _save(graph, path)


def toy_decoder(path: Path) -> Path:
    """sample = tanh(the first 3 channels of latent_sample), upscaled 8x: [batch, 4, h, w] -> [batch, 3, 8h, 8w]."""
    starts, ends, axes = (numpy_helper.from_array(np.array(v, np.int64), n) for v, n in (([0], "starts"), ([3], "ends"), ([1], "axes")))
    scales = numpy_helper.from_array(np.array([1, 1, 8, 8], np.float32), "scales")
    nodes = [helper.make_node("Slice", ["latent_sample", "starts", "ends", "axes"], ["rgb"]), helper.make_node("Tanh", ["rgb"], ["t"]),
             helper.make_node("Resize", ["t", "", "scales"], ["sample"], mode="nearest")]  # fmt: skip
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["batch", 4, "height", "width"])],
                              [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 3, "h8", "w8"])], [starts, ends, axes, scales])  # fmt: skip
    return _save(graph, path)


def _save(graph, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def build(model: Path, out: Path, *shapes: str) -> Path:
    args = ["optimize", str(model), "-o", str(out), "--bench-runs", "0", "-q"]
    for shape in shapes:
        args += ["--shapes", shape]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
