"""Fix every dynamic input dim to one size, then let inference and folding remove the shape arithmetic.

A graph with static shapes has no Shape/Gather/Concat subgraphs computing Reshape targets at run time.
ONNX Runtime then places every node on the GPU, which CUDA graph capture requires, and launches fewer
kernels.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir

from passes.base import KilnPass
from passes.cleanup import FoldConstants, InferShapes, RemoveDeadNodes


MAX_ROUNDS = 4


class FreezeShapes(KilnPass):
    name = "freeze-shapes"
    summary = "fix dynamic input dims to the profile's one size and fold the shape arithmetic away"

    def __init__(self, sizes: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.sizes = dict(sizes or {})  # dim name -> size

    def requires(self, model: ir.Model) -> None:
        used = {d.value for v in model.graph.inputs if v.shape for d in v.shape if isinstance(d, ir.SymbolicDim)}
        unset = sorted(str(d) for d in used - set(self.sizes))
        if unset:
            raise ir.passes.PreconditionError(f"no size for dynamic dim(s) {', '.join(unset)}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        frozen = 0
        for value in graph.inputs:
            if value.shape is None or value.shape.is_static():
                continue
            value.shape = ir.Shape([self.sizes[d.value] if isinstance(d, ir.SymbolicDim) else d for d in value.shape])
            frozen += 1
        if not frozen:
            return ir.passes.PassResult(model, False)
        nodes_before = sum(1 for _ in graph)
        # A Reshape whose target is computed from shapes gets a static output only once that computation
        # is folded; so infer and fold in rounds until nothing more folds.
        for _ in range(MAX_ROUNDS):
            count = sum(1 for _ in graph)
            # Forget the symbolic shapes inferred from the dynamic inputs, so inference writes static ones.
            for node in ir.traversal.RecursiveGraphIterator(graph):
                for out in node.outputs:
                    if out.shape is not None and not out.shape.is_static():
                        out.shape = None
            for inner in (InferShapes(), FoldConstants(), RemoveDeadNodes()):
                inner(model)
                self.warnings += inner.warnings
            if sum(1 for _ in graph) == count:
                break
        self.warnings = list(dict.fromkeys(self.warnings))
        self.stats = {"inputs_frozen": frozen, "nodes_removed": nodes_before - sum(1 for _ in graph)}
        return ir.passes.PassResult(model, True)

    def ensures(self, model: ir.Model) -> None:
        dynamic = [v.name for v in model.graph.inputs if v.shape is not None and not v.shape.is_static()]
        if dynamic:
            raise ir.passes.PostconditionError(f"inputs {dynamic} are still dynamic")
