"""Fix every dynamic input dim to one size, then let inference and folding remove the shape arithmetic.

A graph with static shapes has no Shape/Gather/Concat subgraphs computing Reshape targets at run time.
ONNX Runtime then places every node on the GPU, which CUDA graph capture requires, and launches fewer
kernels.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx_ir as ir

from kiln.passes.base import KilnPass, count_nodes, dim_name
from kiln.passes.cleanup import FoldConstants, InferShapes, RemoveDeadNodes
from kiln.passes.manager import PassManager
from kiln.targets.profile import base_dim, dim_size

MAX_ROUNDS = 4


class ForgetSymbolicShapes(KilnPass):
    name = "forget-symbolic-shapes"
    summary = "drop the node outputs' shapes that are not static, so that inference writes them anew"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        forgotten = 0
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            for out in node.outputs:
                if out.shape is not None and not out.shape.is_static():
                    out.shape = None
                    forgotten += 1
        self.stats["shapes_forgotten"] = forgotten
        return ir.passes.PassResult(model, forgotten > 0)


def shape_state(model: ir.Model) -> tuple:
    """The node count and every node output's type and shape: what a round of freeze-shapes can change."""
    values = tuple(
        (out.name, out.dtype, None if out.shape is None else tuple(str(d) for d in out.shape))
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        for out in node.outputs
    )
    return count_nodes(model), values


def freeze_rounds() -> PassManager:
    """Rounds of forget, infer, fold and prune, until a round leaves the shapes and nodes as they were.

    A Reshape whose target is computed from shapes gets a static output only once that computation is
    folded, which the next round's inference sees. Forgetting and re-inferring always reports modified,
    so a round counts as a change only when shape_state differs after it.
    """
    passes = [ForgetSymbolicShapes(), InferShapes(), FoldConstants(), RemoveDeadNodes()]
    return PassManager(passes, steps=MAX_ROUNDS, fingerprint=shape_state, name="freeze-rounds")


class FreezeShapes(KilnPass):
    """details: "rounds" run and "passes", the inner records (PassRecord.to_json), as a nested manager's."""

    name = "freeze-shapes"
    summary = "fix dynamic input dims to the profile's one size and fold the shape arithmetic away"

    def __init__(self, sizes: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.sizes = dict(sizes or {})  # dim name -> size

    def requires(self, model: ir.Model) -> None:
        used = {base_dim(dim_name(v, axis)) for v in model.graph.inputs if v.shape for axis, d in enumerate(v.shape) if not isinstance(d, int)}
        unset = sorted(used - set(self.sizes))
        if unset:
            raise ir.passes.PreconditionError(f"no size for dynamic dim(s) {', '.join(unset)}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        frozen = 0
        for value in graph.inputs:
            if value.shape is None or value.shape.is_static():
                continue
            value.shape = ir.Shape([d if isinstance(d, int) else dim_size(dim_name(value, axis), self.sizes) for axis, d in enumerate(value.shape)])
            frozen += 1
        self.stats = {"inputs_frozen": frozen, "nodes_removed": 0}
        if not frozen:
            return ir.passes.PassResult(model, False)
        nodes_before = sum(1 for _ in graph)
        rounds = freeze_rounds()
        rounds(model)
        self.warnings = list(rounds.warnings)
        self.stats["nodes_removed"] = nodes_before - sum(1 for _ in graph)
        self.details = {"rounds": rounds.stats["rounds"], "passes": rounds.details["passes"]}
        return ir.passes.PassResult(model, True)

    def ensures(self, model: ir.Model) -> None:
        dynamic = [v.name for v in model.graph.inputs if v.shape is not None and not v.shape.is_static()]
        if dynamic:
            raise ir.passes.PostconditionError(f"inputs {dynamic} are still dynamic")
