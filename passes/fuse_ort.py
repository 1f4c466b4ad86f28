"""Fusions for ONNX Runtime: attention, GELU, normalization and bias patterns into its contrib ops
(com.microsoft.Attention, SkipLayerNormalization, FastGelu, BiasGelu, FusedConv, ...).

onnxscript's ort_fusions do attention and the patterns they know; kiln's rules (fuse_rules.py) and the
adaLN rewrite (fuse_adaln.py) take what they miss. The result runs only on ONNX Runtime; TensorRT
targets take FuseStandardOnnx (fusion.py) instead.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _fusion_utils, pattern
from onnxscript.rewriter.ort_fusions import _core as ort_fusions_core
from onnxscript.rewriter.ort_fusions import optimize_for_ort
from onnxscript.rewriter.ort_fusions.mha_bias import FuseBiasMHA

from kiln.passes.base import add_initializer
from kiln.passes.fuse_rules import kiln_ort_rules, standard_rules
from kiln.passes.fusion import FusionPass


class FuseForOnnxRuntime(FusionPass):
    name = "ort-fusions"
    summary = "fuse attention, GELU, normalization, bias and adaLN patterns into ONNX Runtime's contrib ops"

    def __init__(self, pack_qkv: bool = True):
        super().__init__()
        # A model to be quantized keeps its Q, K and V projections as three MatMuls (each an 8-bit GEMM)
        # feeding MultiHeadAttention, instead of one com.microsoft.Attention holding them packed in float.
        self.pack_qkv = pack_qkv

    def rules(self) -> list:
        return [*standard_rules(), *kiln_ort_rules()]

    def fuse(self, model: ir.Model) -> dict[str, int]:
        renamed = last_axis_as_minus_one(model.graph)
        with contextlib.ExitStack() as stack:
            stack.enter_context(_vector_biases_only())
            if not self.pack_qkv:
                stack.enter_context(_no_packed_attention())
            fused, counts = optimize_for_ort(model)
        if fused is not model:  # onnxscript works in place; keep the onnx-ir in-place contract explicit
            raise ir.passes.PostconditionError("optimize_for_ort returned a new model")
        return {**({"last_axis_as_minus_one": renamed} if renamed else {}), **{name: n for name, n in counts.items() if n}}


def last_axis_as_minus_one(graph: ir.Graph) -> int:
    """ReduceMean over the last axis named as axis -1, as onnxscript's RMSNorm fusion matches it: torch.export
    writes RMSNorm's mean over a 3-D tensor as axes [2] (Wan's q and k norms), which the fusion passes over.
    Returns how many were renamed."""
    minus_one, renamed = graph.initializers.get("kiln_last_axis"), 0  # an earlier run's
    for node in graph:
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        x, axes = node.inputs[0], node.inputs[1] and ir.convenience.get_const_tensor(node.inputs[1])  # or a Constant's
        rank = None if x.shape is None else len(x.shape)
        if axes is None or rank is None or axes.numpy().reshape(-1).tolist() != [rank - 1]:
            continue
        if minus_one is None:
            minus_one = add_initializer(graph, "kiln_last_axis", np.array([-1], dtype=np.int64))
        node.replace_input_with(1, minus_one)
        renamed += 1
    return renamed


class _VectorBiasMHA(FuseBiasMHA):
    """onnxscript's FuseBiasMHA where every bias it folds is a vector. Alone it also takes the last Add of a
    rotary embedding (q cos + rotated(q) sin, LTX-Video) for a bias add, and concatenates activations into
    MultiHeadAttention's bias, which ONNX Runtime then cannot load."""

    def check(self, context, **bindings) -> pattern.MatchResult:
        for name in ("q_bias", "k_bias", "v_bias"):
            bias = bindings.get(name)
            if bias is not None and (bias.shape is None or len(bias.shape) != 1):
                return pattern.MatchResult().fail(f"{name} is not a vector", bias)
        return super().check(context, **bindings)


@contextlib.contextmanager
def _vector_biases_only():
    original = ort_fusions_core.fuse_mha_bias
    ort_fusions_core.fuse_mha_bias = _fusion_utils.apply_fusion_rules(pattern.RewriteRuleSet([_VectorBiasMHA.rule()]))
    try:
        yield
    finally:
        ort_fusions_core.fuse_mha_bias = original


@contextlib.contextmanager
def _no_packed_attention():
    """onnxscript's fusion list has no switch for its MultiHeadAttention -> Attention step: skip it here."""
    original = ort_fusions_core.fuse_attention
    ort_fusions_core.fuse_attention = lambda model, **kwargs: 0
    try:
        yield
    finally:
        ort_fusions_core.fuse_attention = original
