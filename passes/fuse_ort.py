"""Fusions for ONNX Runtime: attention, GELU, normalization and bias patterns into its contrib ops
(com.microsoft.Attention, SkipLayerNormalization, FastGelu, BiasGelu, FusedConv, ...).

onnxscript's ort_fusions do attention and the patterns they know; kiln's rules (fuse_rules.py) and the
adaLN rewrite (fuse_adaln.py) take what they miss. The result runs only on ONNX Runtime; TensorRT
targets take FuseStandardOnnx instead.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from passes.base import KilnPass, op_counts
from passes.fuse_adaln import FuseAdaLnModulation
from passes.fuse_rules import apply_rules, kiln_ort_rules, standard_rules


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
        self.stats = stats
        self.details["refused"] = {**refusals, **({"fuse-adaln": adaln.details["refused"]} if adaln.details["refused"] else {})}
        return ir.passes.PassResult(model, op_counts(model) != before)


class FuseStandardOnnx(FusionPass):
    name = "fusions"
    summary = "fuse LayerNorm, Conv+BatchNorm, MatMul+bias and adaLN modulation, in standard ONNX ops only"


class FuseForOnnxRuntime(FusionPass):
    name = "ort-fusions"
    summary = "fuse attention, GELU, normalization, bias and adaLN patterns into ONNX Runtime's contrib ops"

    def rules(self) -> list:
        return [*standard_rules(), *kiln_ort_rules()]

    def fuse(self, model: ir.Model) -> dict[str, int]:
        fused, counts = optimize_for_ort(model)
        if fused is not model:  # onnxscript works in place; keep the onnx-ir in-place contract explicit
            raise ir.passes.PostconditionError("optimize_for_ort returned a new model")
        return {name: n for name, n in counts.items() if n}
