"""Cleanup passes: the graph means the same after each, with less in it."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants

from kiln.passes.base import KilnPass, add_initializer, check_topological_order, op_counts

# Ops with effects beyond their outputs, never removed as dead.
_SIDE_EFFECT_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"})


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # onnx-ir logs a failed inference as "...failed: %s..." with the exception only in exc_info.
        exc = record.exc_info[1] if record.exc_info else None
        message = f"{type(exc).__name__}: {str(exc).strip()}" if exc is not None else record.getMessage()
        self.messages.append(message)


def _restore_initializer_order(graph: ir.Graph, order: list[str]) -> None:
    """onnx-ir's shape inference takes large initializers out and puts them back at the end; put them
    back where they were, so that a pass that changed nothing leaves the same serialized model."""
    initializers = graph.initializers
    if list(initializers) == order:
        return
    for name in [n for n in order if n in initializers] + [n for n in initializers if n not in order]:
        initializers[name] = initializers.pop(name)


class InferShapes(KilnPass):
    name = "infer-shapes"
    summary = "ONNX shape and type inference, with data propagation for shape subgraphs"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # onnx-ir logs and leaves the model unchanged when inference fails; keep that as a warning.
        collector = _WarningCollector()
        logger = logging.getLogger(common.shape_inference.__name__)
        logger.addHandler(collector)
        order = list(model.graph.initializers)
        try:
            result = common.ShapeInferencePass(strict_mode=True)(model)
        finally:
            logger.removeHandler(collector)
            _restore_initializer_order(model.graph, order)
        self.warnings.extend(f"shape inference skipped: {m}" for m in collector.messages)
        return ir.passes.PassResult(model, result.modified)


# Elements a folded node may read or write. onnxscript's defaults (8192 in, 262,144 out) leave a static graph's
# rotary tables computed at run time (Flux at 1024²: 4608 tokens x 128), where kiln's rotary fusion needs them
# as constants; 2^22 float32 elements are 16 MB.
FOLD_SIZE_LIMIT = 1 << 22


class FoldConstants(KilnPass):
    name = "fold-constants"
    summary = "evaluate subgraphs whose inputs are all constant and store their results"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = sum(op_counts(model).values())
        split = _split_constants(model.graph)
        result = fold_constants(model, input_size_limit=FOLD_SIZE_LIMIT, output_size_limit=FOLD_SIZE_LIMIT)
        self.stats["nodes_folded"] = before - sum(op_counts(model).values())
        _make_contiguous(model.graph)
        return ir.passes.PassResult(model, bool(result.modified) or split > 0)


def _split_constants(graph: ir.Graph) -> int:
    """Split a constant into constants: onnxscript folds no node of several outputs, so what Wan's rotary
    tables are made from (one table split per axis) would stay computed. A graph input's initializer (which
    a caller may override), a graph output, opset 12's split attribute and tables past the fold limit are left
    as they are. Returns how many Splits went."""
    done = 0
    for node in list(graph):
        data = node.inputs[0] if node.op_type == "Split" and node.domain in ("", "ai.onnx") else None
        if data is None or data.const_value is None or data.is_graph_input() or "split" in node.attributes:
            continue
        sizes = node.inputs[1] if len(node.inputs) > 1 else None
        if (sizes is not None and sizes.const_value is None) or any(out.is_graph_output() or not out.name for out in node.outputs):
            continue
        if data.const_value.size > FOLD_SIZE_LIMIT:
            continue
        array, axis = data.const_value.numpy(), node.attributes.get_int("axis", 0)
        if sizes is not None:
            parts = np.split(array, np.cumsum(sizes.const_value.numpy())[:-1], axis=axis)
        elif array.shape[axis] % len(node.outputs) == 0:
            parts = np.split(array, len(node.outputs), axis=axis)
        else:
            continue  # opset 18's uneven split by num_outputs: left to ONNX Runtime
        for out, part in zip(node.outputs, parts, strict=True):
            out.replace_all_uses_with(add_initializer(graph, f"{out.name}_folded", np.ascontiguousarray(part)))
        graph.remove(node, safe=True)
        done += 1
    return done


def _make_contiguous(graph: ir.Graph) -> None:
    """Folding a Transpose can leave a strided numpy view as a constant, which hashing and saving
    cannot read; store a contiguous copy instead."""
    for value in graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, np.ndarray) and not tensor.raw.flags.c_contiguous:
            value.const_value = ir.tensor(np.ascontiguousarray(tensor.raw), name=tensor.name)


class LiftConstants(KilnPass):
    name = "lift-constants"
    summary = "turn Constant nodes into initializers"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        return ir.passes.PassResult(model, result.modified)

    def ensures(self, model: ir.Model) -> None:
        # A Constant that is itself a graph output stays (onnx-ir does not lift those).
        for node in model.graph:
            if node.op_type == "Constant" and node.domain == "" and not node.outputs[0].is_graph_output():
                raise ir.passes.PostconditionError("a Constant node is left in the main graph")


def _identity_must_stay(node: ir.Node) -> bool:
    """y = Identity(x) where y is a graph output and x a graph input, an initializer or another graph
    output: removing it would rename or drop one of the graph's inputs or outputs. Also where x comes
    from outside y's graph (a subgraph returning an outer value): x's name belongs to the outer graph."""
    source, out = node.inputs[0], node.outputs[0]
    if source is None or not out.is_graph_output():
        return False
    if source.is_graph_input() or source.is_initializer() or source.is_graph_output():
        return True
    producer = source.producer()
    return producer is None or producer.graph is not node.graph


def _is_identity(node: ir.Node) -> bool:
    return node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1 and len(node.outputs) == 1


def _merged_shape(kept: ir.Shape | None, other: ir.Shape | None) -> ir.Shape | None:
    """kept, with the dims only other knows: the Identity's output may carry a declared output shape."""
    if kept is None or other is None or len(kept) != len(other):
        return kept if kept is not None else other
    return ir.Shape([b if isinstance(b, int) and not isinstance(a, int) else a for a, b in zip(kept, other)])


def _remove_identity(node: ir.Node) -> bool:
    """Rewire y = Identity(x)'s consumers to x and remove it; when y is a graph output, x takes y's
    place and name there, so the graph's output names stay."""
    if node.inputs[0] is None or _identity_must_stay(node):
        return False
    graph, source, out = node.graph, node.inputs[0], node.outputs[0]
    source.shape = _merged_shape(source.shape, out.shape)
    if source.type is None:
        source.type = out.type
    name = out.name
    positions = [i for i, value in enumerate(graph.outputs) if value is out]
    for i in positions:  # first: onnx-ir refuses to rewire a value that is still a graph output
        graph.outputs[i] = source
    out.replace_all_uses_with(source)
    graph.remove(node, safe=True)
    if positions:
        source.name = name
    return True


class RemoveIdentity(KilnPass):
    """Walks subgraphs and functions too; graph input and output names never change."""

    name = "remove-identity"
    summary = "remove Identity nodes, rewiring their consumers"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graphs = [model.graph, *model.functions.values()]
        # Listed first: removing nodes while a graph is iterated would skip some.
        nodes = [n for g in graphs for n in ir.traversal.RecursiveGraphIterator(g) if _is_identity(n)]
        removed = sum(_remove_identity(n) for n in nodes)
        self.stats["identities_removed"] = removed
        return ir.passes.PassResult(model, removed > 0)

    def ensures(self, model: ir.Model) -> None:
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.op_type != "Identity" or node.domain != "":
                continue
            if not _identity_must_stay(node):
                raise ir.passes.PostconditionError(f"Identity node {node.name!r} was not removed")


class EliminateCommonSubexpressions(KilnPass):
    name = "cse"
    summary = "merge nodes that compute the same thing from the same inputs"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = common.CommonSubexpressionEliminationPass()(model)
        return ir.passes.PassResult(model, result.modified)


class DeduplicateInitializers(KilnPass):
    name = "dedupe-initializers"
    summary = "share initializers that hold identical data"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(model.graph.initializers)
        result = common.DeduplicateHashedInitializersPass()(model)
        self.stats["initializers_merged"] = before - len(model.graph.initializers)
        return ir.passes.PassResult(model, result.modified)


class RemoveDeadNodes(KilnPass):
    name = "remove-dead-nodes"
    summary = "remove nodes, initializers, functions and opset imports nothing uses"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = sum(op_counts(model).values())
        modified = False
        for inner in (
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ):
            modified |= inner(model).modified
        self.stats["nodes_removed"] = before - sum(op_counts(model).values())
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type in _SIDE_EFFECT_OPS:
                continue
            if all(not out.uses() and not out.is_graph_output() for out in node.outputs):
                raise ir.passes.PostconditionError(f"node {node.name!r} ({node.op_type}) is still dead")


class SortTopologically(KilnPass):
    name = "topological-sort"
    summary = "order nodes so every value is produced before it is used"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        order = [id(n) for n in model.graph]
        common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, order != [id(n) for n in model.graph])

    def ensures(self, model: ir.Model) -> None:
        check_topological_order(model.graph)


def cleanup_passes() -> list[KilnPass]:
    """The default cleanup pipeline, in the order kiln runs it."""
    return [
        InferShapes(),
        LiftConstants(),
        FoldConstants(),
        RemoveIdentity(),
        EliminateCommonSubexpressions(),
        DeduplicateInitializers(),
        RemoveDeadNodes(),
        SortTopologically(),
    ]
