"""Q/DQ insertion by the libraries: ONNX Runtime's quantize_static and NVIDIA ModelOpt's ONNX PTQ.

Both take a model file, so the model goes out to a temporary folder (weights as external data) and the
quantized model comes back into memory. Both are given kiln's activation ranges rather than
calibrating on their own: ONNX Runtime through its calibration cache (JSON ranges), ModelOpt through
a TensorRT calibration cache (scales) for INT8. ModelOpt calibrates FP8 itself (max), on kiln's
calibration set.

ONNX Runtime's symbolic shape inference, which ModelOpt calls, saves a model into the working
directory when it cannot infer every shape (`sym_shape_infer_temp.onnx` and its data), and leaves it
there: the libraries run with the temporary folder as their working directory.

Both name a tensor's scale `<tensor>_scale` without checking the name is free: a LayerNorm whose
gamma is called `ln_scale` and whose output is `ln` gets its gamma read as the scale. Values that
could clash are renamed first (`avoid_name_clashes`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from kiln.calibration.samples import CalibrationSet
from kiln.passes.qdq import QMAX, Layer, Names

OP_TYPES = ["MatMul", "Gemm", "Conv"]
_SUFFIXES = ("_scale", "_zero_point", "_quantized", "_QuantizeLinear", "_DequantizeLinear", "_QuantizeLinear_Output",
             "_DequantizeLinear_Output", "_quantized_scale", "_quantized_zero_point")  # fmt: skip


def avoid_name_clashes(model: ir.Model) -> list[str]:
    """Rename values named like the scale, zero point or Q/DQ output of another value; returns the old names."""
    graph = model.graph
    values = [*graph.inputs, *graph.initializers.values(), *(v for node in graph for v in node.outputs)]
    present = {v.name for v in values}
    names = Names(graph)
    renamed = []
    for value in values:
        if value in graph.inputs or value in graph.outputs:
            continue  # the model's interface keeps its names
        if any(value.name.endswith(s) and value.name[: -len(s)] in present for s in _SUFFIXES):
            old = value.name
            if value.is_initializer():
                graph.initializers.pop(old)
                value.name = names(f"{old}_w")
                graph.register_initializer(value)
            else:
                value.name = names(f"{old}_t")
            renamed.append(old)
    return renamed


def _round_trip(model: ir.Model, quantize) -> ir.Model:
    """Save model, let quantize(in_path, out_path, folder) write the quantized model, load it back whole."""
    with tempfile.TemporaryDirectory(prefix="kiln-quant-") as tmp:
        src, dst = Path(tmp) / "model.onnx", Path(tmp) / "quantized.onnx"
        ir.save(model, src, external_data="model.onnx.data", size_threshold_bytes=1024)
        with _working_directory(Path(tmp)):
            quantize(src, dst, Path(tmp))
        result = ir.load(dst)
        for init in result.graph.initializers.values():  # read the weights before the folder goes
            if isinstance(init.const_value, ir.ExternalTensor):
                init.const_value = ir.tensor(init.const_value.numpy(), name=init.name)
    return result


def ort_qdq(model: ir.Model, layers: list[Layer], thresholds: dict[str, float]) -> ir.Model:
    """INT8 Q/DQ by onnxruntime.quantization.quantize_static: symmetric int8 activations per tensor,
    symmetric per-channel int8 weights, biases in int32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    def run(src: Path, dst: Path, tmp: Path) -> None:
        ranges = {name: TensorData(lowest=np.float32(-t), highest=np.float32(t)) for name, t in thresholds.items()}
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), tmp / "ranges.json")
        with _quiet("root"):
            quantize_static(
                src, dst, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=OP_TYPES,
                nodes_to_quantize=[layer.node.name for layer in layers], per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=tmp / "ranges.json",
                use_external_data_format=True,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )  # fmt: skip

    return _round_trip(model, run)


def _exactly(name: str) -> str:
    """ModelOpt reads node names as regular expressions matched at the start (re.match): excluding
    'conv/BiasAdd' would exclude 'conv/BiasAdd_25' too."""
    return f"^{re.escape(name)}$"


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a calibration set."""

    def __init__(self, data: CalibrationSet):
        self.samples = data.samples
        self.i = 0

    def get_next(self):
        if self.i >= len(self.samples):
            return None
        self.i += 1
        return self.samples[self.i - 1].feeds

    def get_first(self):  # ModelOpt's extension of the protocol
        return self.samples[0].feeds if self.samples else None

    def rewind(self):
        self.i = 0

    def __len__(self):
        return len(self.samples)


def modelopt_qdq(
    model: ir.Model, layers: list[Layer], kept: list[str], thresholds: dict[str, float], fmt: str, data: CalibrationSet,
    method: str, providers: list[str],
) -> ir.Model:  # fmt: skip
    """Q/DQ by modelopt.onnx.quantization.quantize, for TensorRT: the chosen layers, the kept ones
    excluded, weights and activations in fp32 around the Q/DQ pairs (kiln's precision pass lowers the rest)."""
    from modelopt.onnx.quantization import quantize

    eps = ["cuda:0" if p == "CUDAExecutionProvider" else "cpu" for p in providers if p in ("CUDAExecutionProvider", "CPUExecutionProvider")]

    def run(src: Path, dst: Path, tmp: Path) -> None:
        cache = None
        if fmt == "int8":  # TensorRT's calibration cache: a header line, then `tensor: scale` as a big-endian float in hex
            cache = tmp / "calibration.cache"
            lines = ["TRT-8501-EntropyCalibration2"]
            lines += [f"{name}: {struct.pack('!f', t / QMAX[fmt] if t > 0 else 1.0).hex()}" for name, t in thresholds.items()]
            cache.write_text("\n".join(lines) + "\n")
        with _quiet("modelopt"):
            quantize(
                str(src), quantize_mode=fmt, calibration_data_reader=_Reader(data),
                calibration_method="entropy" if method == "entropy" and fmt == "int8" else "max",
                calibration_cache_path=str(cache) if cache else None, calibration_eps=eps or ["cpu"],
                op_types_to_quantize=OP_TYPES, nodes_to_quantize=[_exactly(layer.node.name) for layer in layers],
                nodes_to_exclude=[_exactly(name) for name in kept], high_precision_dtype="fp32", use_external_data_format=True,
                output_path=str(dst), log_level="ERROR", disable_mha_qdq=True,
            )  # fmt: skip

    return _round_trip(model, run)


@contextlib.contextmanager
def _working_directory(path: Path):
    """chdir to path while a library runs (kiln quantizes on the main thread, with no other work
    running that resolves relative paths)."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _quiet(name: str):
    """A library's logger at ERROR, and its prints and progress bars gone, while it runs: the quantizers
    report every step (kiln's passes never print)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        logger.setLevel(level)
