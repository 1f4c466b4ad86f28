"""The base every kiln pass builds on: an onnx-ir in-place pass with a name, a summary and notes."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir


class KilnPass(ir.passes.InPlacePass):
    """An in-place onnx-ir pass that reports through `stats`, `details` and `warnings`, never by printing.

    `name` is what recipes and reports call the pass; `requires` / `ensures` (from onnx-ir) check
    the model before and after `call`.
    """

    name: str = ""
    summary: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, int] = {}
        self.details: dict[str, object] = {}
        self.warnings: list[str] = []

    def __call__(self, model_or_result):
        self.stats, self.details, self.warnings = {}, {}, []
        return super().__call__(model_or_result)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data when it is a constant (an initializer with data), else None."""
    return None if value is None or value.const_value is None else value.const_value.numpy()


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer of graph named name, holding array."""
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
    graph.register_initializer(value)
    return value


def dim_name(value: ir.Value, axis: int) -> str:
    """A dynamic dim's name, or INPUT:AXIS for one without a name (as kiln's profiles call it)."""
    dim = value.shape[axis]
    return dim.value if isinstance(dim, ir.SymbolicDim) and dim.value else f"{value.name}:{axis}"


def count_nodes(model: ir.Model) -> int:
    """Nodes in the main graph and all subgraphs."""
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def op_counts(model: ir.Model) -> dict[str, int]:
    """Node count per op type ('domain::Op' outside the default domain), subgraphs included."""
    counts: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def check_topological_order(graph: ir.Graph) -> None:
    """Raise PostconditionError if a node in graph uses a value that no earlier node produced."""
    defined = set(graph.inputs) | set(graph.initializers.values())
    for node in graph:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.graph is graph and value not in defined:
                raise ir.passes.PostconditionError(
                    f"node {node.name!r} ({node.op_type}) uses {value.name!r} before it is produced"
                )
        defined.update(node.outputs)


def content_hash(model: ir.Model) -> str:
    """sha256 over the graph and the weights' bytes, independent of how the weights are stored on disk."""
    digest = hashlib.sha256()
    for name, init in sorted(model.graph.initializers.items()):
        digest.update(f"{name}:{init.dtype}:{init.shape}\n".encode())
        if isinstance(init.const_value, ir.StringTensor):  # strings have no one byte layout
            digest.update(b"\0".join(init.const_value.string_data()))
        elif init.const_value is not None:
            digest.update(init.const_value.tobytes())
    graph = model.graph
    # A view without initializers: their bytes were hashed above, whatever their storage.
    view = ir.GraphView(graph.inputs, graph.outputs, nodes=list(graph), name=graph.name)
    digest.update(ir.serde.serialize_graph(view).SerializeToString(deterministic=True))
    digest.update(repr(sorted(graph.opset_imports.items())).encode())
    return digest.hexdigest()
