"""The fusion pass base, and the fusions that keep to standard ONNX ops (LayerNormalization,
Conv+BatchNorm, MatMul+Add into Gemm, the adaLN rewrite) for TensorRT and the CPU.

A fusion pass runs the adaLN rewrite (fuse_adaln.py), then its own `fuse` step, then its rule list
(fuse_rules.py); FuseForOnnxRuntime (fuse_ort.py) builds on it with ONNX Runtime's contrib ops.
"""

from __future__ import annotations

import onnx_ir as ir

from kiln.passes.base import KilnPass, op_counts
from kiln.passes.fuse_adaln import FuseAdaLnModulation
from kiln.passes.fuse_rules import apply_rules, standard_rules


class FusionPass(KilnPass):
    """Runs the adaLN rewrite, then `fuse`, then the rule lists; stats count rewrites per rule."""

    def rules(self) -> list:
        return standard_rules()

    def fuse(self, model: ir.Model) -> dict[str, int]:
        return {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = op_counts(model)
        adaln = FuseAdaLnModulation()
        adaln(model)
        stats = {f"adaln_{k}": v for k, v in adaln.stats.items() if v}
        stats.update(self.fuse(model))
        counts, refusals = apply_rules(model, self.rules())
        stats.update(counts)
        _initializers_in_use_order(model.graph)
        self.stats = stats
        self.details["refused"] = {**refusals, **({"fuse-adaln": adaln.details["refused"]} if adaln.details["refused"] else {})}
        return ir.passes.PassResult(model, op_counts(model) != before)


def _initializers_in_use_order(graph: ir.Graph) -> None:
    """Order the initializers as the nodes first read them, so that the order follows from the graph alone
    and a second run writes the same bytes (onnxscript's rewriter re-registers some it touches)."""
    first_use: dict[str, int] = {}
    for index, node in enumerate(graph):
        for value in node.inputs:
            if value is not None and value.is_initializer():
                first_use.setdefault(value.name, index)
    ordered = sorted(graph.initializers.values(), key=lambda v: first_use.get(v.name, len(graph)))
    if [v.name for v in ordered] != list(graph.initializers):
        graph.initializers.clear()
        for value in ordered:
            graph.register_initializer(value)


class FuseStandardOnnx(FusionPass):
    name = "fusions"
    summary = "fuse LayerNorm, Conv+BatchNorm, MatMul+bias and adaLN modulation, in standard ONNX ops only"
