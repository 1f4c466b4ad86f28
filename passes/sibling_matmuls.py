"""Sibling projections as one GEMM: MatMuls that read the same activation with constant weights (Flux's
single-stream blocks project one normalized input to q, k, v and the MLP) become one MatMul over the
weights concatenated along N, one bias Add for the biases they had, and a Split back into the original
outputs. One wide GEMM keeps the GPU busier than four narrow ones and reads the activation once."""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from kiln.passes.base import add_initializer, constant_array


def _weight(node: ir.Node) -> ir.TensorProtocol | None:
    """The node's 2-D float32 constant weight, if it is a MatMul by one (its data not read yet)."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    weight = node.inputs[1].const_value
    return weight if weight is not None and len(weight.shape) == 2 and weight.dtype == ir.DataType.FLOAT else None


def _bias(node: ir.Node, n: int) -> tuple[ir.Node, ir.Value, np.ndarray] | None:
    """(the Add, its constant, the constant's data) when the MatMul's only use is an Add of one value per
    output column (n of them)."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or node.outputs[0] in node.graph.outputs:
        return None
    add = uses[0][0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = add.inputs[1 - uses[0][1]]
    vector = constant_array(other)
    return (add, other, vector) if vector is not None and vector.shape == (n,) and vector.dtype == np.float32 else None


def merge_sibling_matmuls(graph: ir.Graph) -> int:
    """Merge each group of sibling MatMuls (same activation, constant 2-D float32 weights with one K; a bias
    Add after any of them joins the merged one) into one; returns how many groups were merged."""
    groups: dict[int, list[ir.Node]] = collections.defaultdict(list)
    for node in graph:
        if _weight(node) is not None:
            groups[id(node.inputs[0])].append(node)
    merged = 0
    for nodes in groups.values():
        if len(nodes) < 2 or len({_weight(node).shape[0] for node in nodes}) != 1:
            continue
        # Read only now, once: a large model's weights are in external data.
        weights = [_weight(node).numpy() for node in nodes]
        biases = [_bias(node, w.shape[1]) for node, w in zip(nodes, weights, strict=True)]
        first, name, x = nodes[0], f"kiln_merged_{merged}_{nodes[0].name}", nodes[0].inputs[0]
        sizes = add_initializer(graph, f"{name}_split", np.array([w.shape[1] for w in weights], dtype=np.int64))
        product = ir.node("MatMul", [x, add_initializer(graph, f"{name}_weight", np.concatenate(weights, 1))])
        new_nodes, wide = [product], product.outputs[0]
        width = sum(w.shape[1] for w in weights)
        wide.type, wide.shape = x.type, None if x.shape is None else ir.Shape([*list(x.shape)[:-1], width])
        if any(b is not None for b in biases):  # zeros where a projection has no bias of its own (Flux's MLP: in FastGelu)
            vectors = [b[2] if b is not None else np.zeros(w.shape[1], np.float32) for b, w in zip(biases, weights, strict=True)]
            bias = add_initializer(graph, f"{name}_bias", np.concatenate(vectors))
            new_nodes.append(ir.node("Add", [wide, bias]))
            new_nodes[-1].outputs[0].type, new_nodes[-1].outputs[0].shape = wide.type, wide.shape
            wide = new_nodes[-1].outputs[0]
        split = ir.node("Split", [wide, sizes], attributes={"axis": -1}, num_outputs=len(nodes))
        new_nodes.append(split)
        graph.insert_before(first, new_nodes)
        replaced = []
        old_constants = [node.inputs[1] for node in nodes] + [b[1] for b in biases if b is not None]
        for i, (node, bias) in enumerate(zip(nodes, biases, strict=True)):
            old = bias[0].outputs[0] if bias is not None else node.outputs[0]
            split.outputs[i].shape, split.outputs[i].type = old.shape, old.type
            old.replace_all_uses_with(split.outputs[i], replace_graph_outputs=True)
            replaced.append((old.name, split.outputs[i]))
            graph.remove([n for n in (bias[0] if bias is not None else None, node) if n is not None], safe=True)
        for old_name, value in replaced:  # the outputs keep their names (a graph output's, a report's)
            value.name = old_name
        for constant in old_constants:
            if not constant.uses() and constant.name in graph.initializers:
                graph.initializers.pop(constant.name)
        merged += 1
    return merged
