"""Transformer fusions for ONNX Runtime: attention, GELU, normalization and bias patterns into the fused
contrib ops (com.microsoft.Attention, MultiHeadAttention, BiasGelu, SkipLayerNormalization, ...), by
onnxscript's ort_fusions. The result runs only on ONNX Runtime; TensorRT targets need standard ONNX."""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from passes.base import KilnPass, op_counts


class FuseForOnnxRuntime(KilnPass):
    name = "ort-fusions"
    summary = "fuse attention, GELU, normalization and bias patterns into ONNX Runtime's contrib ops"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = op_counts(model)
        fused, counts = optimize_for_ort(model)
        if fused is not model:  # onnxscript works in place; keep the onnx-ir in-place contract explicit
            raise ir.passes.PostconditionError("optimize_for_ort returned a new model")
        self.stats = {name: n for name, n in counts.items() if n}
        return ir.passes.PassResult(model, op_counts(model) != before)
