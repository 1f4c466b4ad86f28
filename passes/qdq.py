"""kiln's own Q/DQ insertion: QuantizeLinear/DequantizeLinear pairs on the activations of the chosen
layers, and their weights stored quantized behind a DequantizeLinear.

Symmetric everywhere (zero points are 0), as TensorRT requires: int8 uses the narrow range ±127,
FP8 E4M3 its finite range ±448. Weights are quantized per output channel, or (FP8 only, on request)
per tensor; activations per tensor.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

from kiln.passes.base import add_initializer

QMAX = {"int8": 127.0, "fp8": 448.0}
_STORAGE = {"int8": (ir.DataType.INT8, np.int8), "fp8": (ir.DataType.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn)}
MIN_OPSET = {"int8": 19, "fp8": 19}  # float16 scales (fp16 engines) and float8 types both need opset 19


@dataclasses.dataclass
class Layer:
    """A MatMul, Gemm or Conv with a constant weight: what quantization can take."""

    node: ir.Node
    module: str  # the source module's path where the exporter recorded it, else the node's name
    axis: int  # the weight's output-channel axis

    @property
    def activation(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def weight(self) -> ir.Value:
        return self.node.inputs[1]


def quantize_weight(w: np.ndarray, fmt: str, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(quantized weight, float32 scale): per channel along axis, or per tensor when axis is None."""
    w = w.astype(np.float32)
    if axis is None:
        amax = np.array(np.abs(w).max(), np.float32)
        shaped = amax
    else:
        others = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=others).astype(np.float32)
        shaped = np.expand_dims(amax, others)
    scale = np.where(amax > 0, amax / QMAX[fmt], 1.0).astype(np.float32)
    scaled = w / (np.where(shaped > 0, shaped, QMAX[fmt]) / QMAX[fmt])
    if fmt == "int8":
        return np.clip(np.rint(scaled), -127, 127).astype(np.int8), scale
    return np.clip(scaled, -448, 448).astype(ml_dtypes.float8_e4m3fn), scale


def _scale(threshold: float, fmt: str) -> float:
    """The activation scale for a clipping threshold (1 for an all-zero tensor, which any scale keeps zero)."""
    return threshold / QMAX[fmt] if threshold > 0 else 1.0


def _zero(fmt: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, _STORAGE[fmt][1])


class Names:
    """Fresh value and node names: a Q/DQ backend must never reuse one the model has."""

    def __init__(self, graph: ir.Graph):
        self.taken = {v.name for v in graph.initializers.values()} | {v.name for v in graph.inputs}
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self.taken.add(node.name)
            self.taken.update(v.name for v in node.outputs)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def insert_qdq(
    model: ir.Model, layers: list[Layer], thresholds: dict[str, float], fmt: str, weights_per_channel: bool = True
) -> dict[str, dict]:
    """Quantize each layer's activation (threshold by activation name) and weight in place; returns
    per layer name its activation and weight scales."""
    graph, names = model.graph, Names(model.graph)
    table: dict[str, dict] = {}
    dq_of: dict[str, ir.Value] = {}  # one Q/DQ pair per activation, shared by the layers reading it
    for layer in layers:
        act = layer.activation
        if act.name not in dq_of:
            s = add_initializer(graph, names(f"{act.name}_act_scale"), np.array(_scale(thresholds[act.name], fmt), np.float32))
            z = add_initializer(graph, names(f"{act.name}_act_zero"), _zero(fmt, ()))
            q = ir.Node("", "QuantizeLinear", [act, s, z], name=names(f"{act.name}_QuantizeLinear"), num_outputs=1)
            q.outputs[0].name = names(f"{act.name}_quantized")
            q.outputs[0].dtype, q.outputs[0].shape = _STORAGE[fmt][0], act.shape
            dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s, z], name=names(f"{act.name}_DequantizeLinear"), num_outputs=1)
            dq.outputs[0].name = names(f"{act.name}_dequantized")
            dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, act.shape  # float32, as the weight is
            graph.insert_before(layer.node, [q, dq])
            dq_of[act.name] = dq.outputs[0]
        layer.node.replace_input_with(0, dq_of[act.name])

        weight = layer.weight
        axis = layer.axis if weights_per_channel else None
        wq, ws = quantize_weight(weight.const_value.numpy(), fmt, axis)
        wq_v = add_initializer(graph, names(f"{weight.name}_quantized"), wq)
        ws_v = add_initializer(graph, names(f"{weight.name}_weight_scale"), ws)
        wz_v = add_initializer(graph, names(f"{weight.name}_weight_zero"), _zero(fmt, ws.shape))
        attrs = [ir.AttrInt64("axis", axis)] if axis is not None else []
        dq = ir.Node("", "DequantizeLinear", [wq_v, ws_v, wz_v], attributes=attrs, name=names(f"{weight.name}_DequantizeLinear"), num_outputs=1)
        dq.outputs[0].name = names(f"{weight.name}_dequantized")
        dq.outputs[0].dtype, dq.outputs[0].shape = weight.dtype, weight.shape
        graph.insert_before(layer.node, dq)
        layer.node.replace_input_with(1, dq.outputs[0])
        if not weight.uses() and weight.name in graph.initializers:
            graph.initializers.pop(weight.name)
        table[layer.node.name] = {"activation_scale": _scale(thresholds[act.name], fmt),
                                  "weight_scale": {"min": float(ws.min()), "max": float(ws.max()), "per_channel": axis is not None}}  # fmt: skip
    return table
