"""kiln's own fusion rules, for the patterns onnxscript's rule sets miss in diffusion and FILM graphs.

Each rule is an onnxscript rewrite rule: a pattern, a check that names the reason it refused a match
(kept for the report), and a rewrite. STANDARD_RULES produce standard ONNX only, for TensorRT and the
CPU; ORT_RULES produce ONNX Runtime contrib ops (com.microsoft).
"""

from __future__ import annotations

import collections

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import fuse_batchnorm_into_conv_rule, matmul_add_to_gemm_rule
from onnxscript.rewriter.rules.fusion._layer_norm import layer_normalization_rules

from kiln.passes.base import constant_array

MS = "com.microsoft"


class KilnRule(pattern.RewriteRuleClassBase):
    """A rewrite rule that counts the reasons its check refused matches."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.refusals: collections.Counter[str] = collections.Counter()

    def refuse(self, reason: str) -> pattern.MatchResult:
        self.refusals[reason] += 1
        return pattern.MatchResult().fail(reason)

    def as_rule(self) -> pattern.RewriteRule:
        return pattern.RewriteRule(self.pattern, self.rewrite, self.check, name=self.name)


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is None or len(value.shape) == 0:
        return None
    dim = value.shape[-1]
    return dim if isinstance(dim, int) else None


def _check_channel_vector(rule: KilnRule, vector: ir.Value, x: ir.Value, what: str) -> pattern.MatchResult:
    """vector must be a constant 1-D tensor as long as x's last dim (what the contrib ops broadcast)."""
    data = constant_array(vector)
    if data is None:
        return rule.refuse(f"{what} is not a constant")
    if data.ndim != 1:
        return rule.refuse(f"{what} has shape {list(data.shape)}, not one value per channel")
    if _last_dim(x) != data.shape[0]:
        return rule.refuse(f"{what} has {data.shape[0]} values but the input's last dim is {_last_dim(x)}")
    return pattern.MatchResult()


class SkipLayerNorm(KilnRule):
    """LayerNormalization(a + b) where the sum is also the residual stream: one SkipLayerNormalization
    that returns both. onnxscript's rule needs a LayerNorm bias; DiT's norms have none."""

    def __init__(self) -> None:
        super().__init__("skip-layer-norm")

    def pattern(self, op, a, b, gamma):
        total = op.Add(a, b)
        return op.LayerNormalization(total, gamma, _allow_other_attributes=True, _outputs=["normed"]), total

    def check(self, context, a, b, gamma, normed, **_) -> pattern.MatchResult:
        attrs = normed.producer().attributes
        if a.shape is None or b.shape is None or a.shape != b.shape or len(a.shape) != 3:
            return self.refuse("the residual add's inputs do not share one known [batch, tokens, channels] shape")
        if attrs.get_int("axis", -1) not in (-1, 2):
            return self.refuse("LayerNormalization does not normalize the last axis")
        if attrs.get_int("stash_type", 1) != 1:
            return self.refuse("LayerNormalization keeps its statistics in a type other than float32")
        return _check_channel_vector(self, gamma, a, "the LayerNorm scale")

    def rewrite(self, op, a, b, gamma, normed, **_):
        epsilon = normed.producer().attributes.get_float("epsilon", 1e-5)
        out, _mean, _inv_std, total = op.SkipLayerNormalization(a, b, gamma, epsilon=epsilon, _outputs=4, _domain=MS)
        return out, total


class BiasTanhGelu(KilnRule):
    """Gelu(x + bias, approximate="tanh") into FastGelu(x, bias): the bias add rides in the GELU kernel.
    onnxscript's BiasGelu rule covers the exact GELU only."""

    def __init__(self) -> None:
        super().__init__("bias-tanh-gelu")

    def pattern(self, op, x, bias):
        return op.Gelu(op.Add(x, bias), _allow_other_attributes=True, _outputs=["gelu"])

    def check(self, context, x, bias, gelu, **_) -> pattern.MatchResult:
        if gelu.producer().attributes.get_string("approximate", "none") != "tanh":
            return self.refuse("exact GELU (onnxscript's bias-gelu rule takes it)")
        return _check_channel_vector(self, bias, x, "the bias")

    def rewrite(self, op, x, bias, **_):
        return op.FastGelu(x, bias, _domain=MS)


# cuDNN's fused convolution (ONNX Runtime CUDA's FusedConv) has these activations and no others.
CUDNN_ACTIVATIONS = ("Relu", "Sigmoid", "Tanh")


class ConvActivation(KilnRule):
    """Conv followed by an activation into one com.microsoft.FusedConv."""

    def __init__(self, activation: str) -> None:
        super().__init__(f"conv-{activation.lower()}")
        self.activation = activation

    def pattern(self, op, x, w):
        conv = op.Conv(x, w, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["conv"])
        return getattr(op, self.activation)(conv, _allow_other_attributes=True)

    def check(self, context, conv, **_) -> pattern.MatchResult:
        if self.activation not in CUDNN_ACTIVATIONS:
            return self.refuse(f"cuDNN's fused convolution has no {self.activation}; TensorRT fuses it itself")
        if len(conv.shape or ()) != 4:
            return self.refuse("not a 2-D convolution")
        return pattern.MatchResult()

    def rewrite(self, op, x, w, conv, **_):
        node = conv.producer()
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        return op.FusedConv(*node.inputs, activation=self.activation, **attributes, _domain=MS)


def standard_rules() -> list:
    """Rules whose rewrites use standard ONNX ops only."""
    return [
        *layer_normalization_rules,
        fuse_batchnorm_into_conv_rule,
        matmul_add_to_gemm_rule,
    ]


def kiln_ort_rules() -> list[KilnRule]:
    return [SkipLayerNorm(), BiasTanhGelu(), *(ConvActivation(a) for a in (*CUDNN_ACTIVATIONS, "LeakyRelu"))]


def apply_rules(model: ir.Model, rules: list) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Apply each rule to a fixed point; return the rewrites per rule and the refusals per kiln rule."""
    counts, refusals = {}, {}
    for rule in rules:
        rewrite_rule = rule.as_rule() if isinstance(rule, KilnRule) else rule
        n = pattern.RewriteRuleSet([rewrite_rule]).apply_to_model(model)
        if n:
            counts[rewrite_rule.name or type(rule).__name__] = n
        if isinstance(rule, KilnRule) and rule.refusals:
            refusals[rule.name] = dict(rule.refusals)
    return counts, refusals
