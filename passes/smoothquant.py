"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before INT8 quantization.

For an activation X feeding linear layers with weights W, each input channel c gets a factor
s_c = max|X_c|^alpha / max|W_c|^(1 - alpha). X is divided by s (one Mul, shared by every layer reading
X) and each W's row c multiplied by it, so X·W is unchanged in exact arithmetic while X's channels
become even enough for one per-tensor scale. alpha 0.5 is the paper's default; larger moves more of the
difficulty into the weights.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.passes.base import add_initializer
from kiln.passes.qdq import Layer, Names

_LIMIT = 1e4  # factors are clipped to [1/_LIMIT, _LIMIT]: a dead channel must not blow up its weights


def _input_axis(layer: Layer) -> int | None:
    """The weight axis that meets the activation's last axis (K), or None for a layer SmoothQuant skips."""
    if layer.node.op_type == "MatMul":
        return 0
    if layer.node.op_type == "Gemm":
        return 1 if layer.axis == 0 else 0  # transB: W is [N, K]
    return None  # Conv: channels are not the last axis


def smooth(model: ir.Model, layers: list[Layer], channel_amax: dict[str, np.ndarray], alpha: float) -> dict[str, dict]:
    """Apply SmoothQuant in place to the MatMul/Gemm layers; returns per activation the factors' range."""
    graph, names = model.graph, Names(model.graph)
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        if _input_axis(layer) is not None and layer.activation.name in channel_amax:
            groups.setdefault(layer.activation.name, []).append(layer)
    summary = {}
    for act_name, group in groups.items():
        act = group[0].activation
        a = channel_amax[act_name].astype(np.float64)
        w = np.max([np.abs(layer.weight.const_value.numpy()).max(axis=1 - _input_axis(layer)) for layer in group], axis=0)
        if a.shape != w.shape:
            continue
        s = np.where((a > 0) & (w > 0), a**alpha / np.maximum(w, 1e-12) ** (1 - alpha), 1.0)
        s = np.clip(s, 1 / _LIMIT, _LIMIT).astype(np.float32)
        inverse = add_initializer(graph, names(f"{act_name}_smooth"), (1.0 / s).astype(np.float32))
        mul = ir.Node("", "Mul", [act, inverse], name=names(f"{act_name}_SmoothQuant"), num_outputs=1)
        mul.outputs[0].name = names(f"{act_name}_smoothed")
        mul.outputs[0].dtype, mul.outputs[0].shape = ir.DataType.FLOAT, act.shape
        graph.insert_before(group[0].node, mul)
        for layer in group:
            axis = _input_axis(layer)
            w_old = layer.weight
            scaled = layer.weight.const_value.numpy() * np.expand_dims(s, 1 - axis)
            w_new = add_initializer(graph, names(f"{w_old.name}_smoothed"), scaled.astype(np.float32))
            layer.node.replace_input_with(0, mul.outputs[0])
            layer.node.replace_input_with(1, w_new)
            if not w_old.uses() and w_old.name in graph.initializers:
                graph.initializers.pop(w_old.name)
        summary[act_name] = {"layers": [layer.node.name for layer in group], "factor_min": float(s.min()), "factor_max": float(s.max())}
    return summary
