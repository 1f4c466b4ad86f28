"""Fusions for ONNX Runtime: attention, GELU, normalization and bias patterns into its contrib ops
(com.microsoft.Attention, SkipLayerNormalization, FastGelu, BiasGelu, FusedConv, ...).

onnxscript's ort_fusions do attention and the patterns they know; kiln's rules (fuse_rules.py) and the
adaLN rewrite (fuse_adaln.py) take what they miss. The result runs only on ONNX Runtime; TensorRT
targets take FuseStandardOnnx (fusion.py) instead.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from kiln.passes.fuse_rules import kiln_ort_rules, standard_rules
from kiln.passes.fusion import FusionPass


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
