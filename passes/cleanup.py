"""Cleanup passes: the graph means the same after each, with less in it."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants

from passes.base import KilnPass, check_topological_order, op_counts

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


class FoldConstants(KilnPass):
    name = "fold-constants"
    summary = "evaluate subgraphs whose inputs are all constant and store their results"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = sum(op_counts(model).values())
        result = fold_constants(model)
        self.stats["nodes_folded"] = before - sum(op_counts(model).values())
        _make_contiguous(model.graph)
        return ir.passes.PassResult(model, bool(result.modified))


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
    output: removing it would rename or drop one of the graph's inputs or outputs."""
    source, out = node.inputs[0], node.outputs[0]
    return (
        source is not None
        and out.is_graph_output()
        and (source.is_graph_input() or source.is_initializer() or source.is_graph_output())
    )


class _IdentityElimination(common.IdentityEliminationPass):
    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        # onnx-ir would rename x to y when both are graph outputs, leaving the outputs (y, y).
        is_identity = node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1
        if is_identity and _identity_must_stay(node):
            return False
        return super()._try_eliminate_identity_node(node)


class RemoveIdentity(KilnPass):
    name = "remove-identity"
    summary = "remove Identity nodes, rewiring their consumers"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = op_counts(model).get("Identity", 0)
        result = _IdentityElimination()(model)
        self.stats["identities_removed"] = before - op_counts(model).get("Identity", 0)
        return ir.passes.PassResult(model, result.modified)

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
