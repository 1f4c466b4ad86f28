"""What one run of a model does: its tensor-core FLOPs at given input shapes, the bytes it must move,
and the most activation memory it holds at once.

FLOPs are counted on the graph as imported (standard ONNX, before fusion: fusions change kernels, not
arithmetic) for the ops that run on tensor cores: MatMul, Gemm, Conv, ConvTranspose and Attention, a
multiply-add being 2 FLOPs. Elementwise ops, norms and softmax are left out: next to the matrix products
they are noise in FLOPs, though not in time. Shapes come from onnxscript's constant folding with ONNX
shape inference on a skeleton of the model, its large weights replaced by inputs of the same shape, so
a model of any size is counted in the memory of its graph. (ONNX shape inference alone loses the
sequence length that a DiT computes from its input's height and width.)
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Mapping

import onnx
import onnx_ir as ir

KEEP_ELEMENTS = 64  # initializers up to this size keep their values: shape inference reads them (Reshape)


@dataclasses.dataclass(frozen=True)
class Work:
    flops: float
    uncounted: Mapping[str, int]  # op type -> nodes of a counted type left out: shapes unknown, or in a subgraph

    def to_json(self) -> dict:
        return {"flops": self.flops, "uncounted": dict(self.uncounted)}


def count_flops(model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> Work:
    """The model's tensor-core FLOPs for one run with inputs of these shapes."""
    skeleton = _shaped(model, shapes)
    flops, uncounted = 0.0, Counter()
    for node in ir.traversal.RecursiveGraphIterator(skeleton.graph):
        rule = _RULES.get((node.domain, node.op_type))
        if rule is None:
            continue
        if node.graph is not skeleton.graph:  # inside an If or a Loop: how often it runs is data
            uncounted[f"{node.op_type} in a subgraph"] += 1
            continue
        try:
            flops += rule(node, [_dims(v) for v in node.inputs], [_dims(v) for v in node.outputs])
        except (TypeError, IndexError, ValueError):  # a shape inference left unknown
            uncounted[node.op_type] += 1
    return Work(flops, dict(uncounted))


# Ops whose output ONNX Runtime makes a view of their input: no memory of their own.
ALIASING = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def peak_activation_bytes(model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """About the most bytes of inputs and intermediate tensors held at once in one run at these shapes:
    the inputs throughout, and each other tensor from the node that makes it to the last node that reads
    it (or a view of it), in graph order. An estimate: ONNX Runtime's planner orders and reuses memory
    its own way; tensors of unknown shape, and those inside If and Loop bodies, count nothing."""
    skeleton = _shaped(model, shapes)
    nodes = list(skeleton.graph)
    root: dict[str, str] = {}  # a view's name -> the tensor it views
    last: dict[str, int] = {}  # a tensor -> the last node that reads it or a view of it
    for index, node in enumerate(nodes):
        if node.op_type in ALIASING and node.domain == "" and node.inputs and node.inputs[0] is not None:
            root[node.outputs[0].name] = root.get(node.inputs[0].name, node.inputs[0].name)
        for value in node.inputs:
            if value is not None:
                last[root.get(value.name, value.name)] = index
    for value in skeleton.graph.outputs:
        last[root.get(value.name, value.name)] = len(nodes)
    weights = set(model.graph.initializers)
    live = sum(_bytes(v) for v in skeleton.graph.inputs if v.name not in weights)  # the caller's, held throughout
    peak, freed = live, {}
    for index, node in enumerate(nodes):
        for value in node.outputs:
            if value.name in root:
                continue
            size = _bytes(value)
            live += size
            at = max(last.get(value.name, index), index)
            freed[at] = freed.get(at, 0) + size
        peak = max(peak, live)
        live -= freed.pop(index, 0)
    return peak


def _bytes(value: ir.Value) -> int:
    dims = _dims(value)
    if dims is None or value.dtype is None:
        return 0
    return int(math.prod(dims) * value.dtype.itemsize)


def _shaped(model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> ir.Model:
    """The model's skeleton at these input shapes, inlined and folded, its values' shapes inferred."""
    from onnxscript.optimizer import fold_constants

    skeleton = ir.from_proto(_skeleton(model, shapes))
    ir.passes.common.InlinePass()(skeleton)  # a function's matrix products are the model's
    fold_constants(skeleton, onnx_shape_inference=True)
    return skeleton


def tensor_bytes(specs, sizes: Mapping[str, int]) -> int:
    """Bytes of the tensors with these TensorSpecs at the given dim sizes."""
    import numpy as np

    return sum(math.prod(s.concrete(sizes)) * np.dtype(s.dtype).itemsize for s in specs)


def _skeleton(model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> onnx.ModelProto:
    """The model's graph with its inputs fixed to shapes and its large initializers as bare inputs."""
    weights = model.graph.initializers
    inputs = [onnx.helper.make_tensor_value_info(v.name, int(v.dtype), shapes[v.name]) for v in model.graph.inputs if v.name not in weights]
    initializers = []
    for v in weights.values():
        if v.const_value is not None and v.const_value.size <= KEEP_ELEMENTS:
            initializers.append(ir.serde.serialize_tensor(v.const_value))
        else:
            inputs.append(onnx.helper.make_tensor_value_info(v.name, int(v.dtype), [d if isinstance(d, int) else None for d in v.shape]))
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in model.graph], model.graph.name or "graph", inputs,
        [onnx.helper.make_empty_tensor_value_info(v.name) for v in model.graph.outputs], initializers,
    )  # fmt: skip
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    functions = [ir.serde.serialize_function(f) for f in model.functions.values()]
    return onnx.helper.make_model(graph, opset_imports=opsets, functions=functions, ir_version=model.ir_version)


def _dims(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None or not value.shape.is_static():
        return None
    return tuple(value.shape.numpy())


def _attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _matmul(node, ins, outs) -> float:
    return 2.0 * math.prod(outs[0]) * ins[0][-1]


def _gemm(node, ins, outs) -> float:
    k = ins[0][0] if _attr(node, "transA", 0) else ins[0][1]
    return 2.0 * math.prod(outs[0]) * k


def _conv(node, ins, outs) -> float:  # weight [out, in / groups, *kernel]
    return 2.0 * math.prod(outs[0]) * math.prod(ins[1][1:])


def _conv_transpose(node, ins, outs) -> float:  # weight [in, out / groups, *kernel]: each input element
    return 2.0 * math.prod(ins[0]) * math.prod(ins[1][1:])


def _attention(node, ins, outs) -> float:
    """ONNX Attention: Q·Kᵀ and the weights times V, over the key length (axis -2 of 4-D K, 1 of 3-D)."""
    q, k, out = ins[0], ins[1], outs[0]
    keys = k[-2] if len(k) == 4 else k[1]
    return 2.0 * math.prod(q) * keys + 2.0 * math.prod(out) * keys


_RULES = {
    ("", "MatMul"): _matmul,
    ("", "Gemm"): _gemm,
    ("", "Conv"): _conv,
    ("", "ConvTranspose"): _conv_transpose,
    ("", "Attention"): _attention,
}
