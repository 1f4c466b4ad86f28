"""kiln's own fusion rules, for the patterns onnxscript's rule sets miss in diffusion and FILM graphs.

Each rule is an onnxscript rewrite rule: a pattern, a check that names the reason it refused a match
(kept for the report), and a rewrite. STANDARD_RULES produce standard ONNX only, for TensorRT and the
CPU; ORT_RULES produce ONNX Runtime contrib ops (com.microsoft).
"""

from __future__ import annotations

import collections

import numpy as np
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


class _Rotary(KilnRule):
    """Rotary embedding on interleaved pairs into one com.microsoft.RotaryEmbedding (interleaved), in place of
    seven or more kernels over the activation. The tables must be constants, one row per token: a static
    graph's, folded. Subclasses match how a model family writes it."""

    full: bool  # the tables are full width, each value twice (once per element of its pair), or half width

    def check(self, context, x, cos, sin, pairs, first, second, stacked, out, **_) -> pattern.MatchResult:
        """x [batch, tokens, heads, dim] or [batch, tokens, heads x dim] seen as pairs [batch, tokens, heads, dim/2,
        2]; first and second the pairs' elements; stacked the two results interleaved back on the last axis;
        out the result, [batch, tokens, heads, dim]."""
        if pairs.shape is None or len(pairs.shape) != 5 or not all(isinstance(d, int) for d in pairs.shape[1:]):
            return self.refuse("the input is not [batch, tokens, heads, pairs, 2] with its sizes known (only a static graph's are)")
        _, tokens, heads, half, two = pairs.shape
        if x.shape is None or list(x.shape)[1:] not in ([tokens, heads, 2 * half], [tokens, heads * 2 * half]) or two != 2:
            return self.refuse("the pairs are not the input's last axis, token by token")
        if [_slice_index(v.producer().inputs[0]) for v in (first, second)] != [0, 1] or \
                any(v.shape is None or list(v.shape)[1:] != [tokens, heads, half] for v in (first, second)):
            return self.refuse("the slices do not take a pair's first and second element")
        concat = stacked.producer()
        axes = [constant_array(n.producer().inputs[1]) for n in concat.inputs]
        if concat.attributes.get_int("axis", 0) not in (-1, 4) or any(a is None or a.tolist() not in ([-1], [4]) for a in axes):
            return self.refuse("the results are not interleaved back on the last axis")
        if out.shape is None or list(out.shape)[1:] != [tokens, heads, 2 * half]:
            return self.refuse("the result is not [batch, tokens, heads, dim]")
        if self.half_tables(pairs, cos, sin) is None:
            width = "dim] tables, each value twice" if self.full else "dim/2] tables"
            return self.refuse(f"cos and sin are not constant [1, tokens, 1, {width}")
        return pattern.MatchResult()

    def half_tables(self, pairs, cos, sin) -> list[np.ndarray] | None:
        """cos and sin as [tokens, dim/2] tables, or None."""
        _, tokens, _, half, _ = pairs.shape
        tables = [constant_array(v) for v in (cos, sin)]
        if any(t is None or t.shape != (1, tokens, 1, 2 * half if self.full else half) for t in tables):
            return None
        if self.full and any(not np.array_equal(t[..., 0::2], t[..., 1::2]) for t in tables):
            return None
        return [np.ascontiguousarray(t[0, :, 0, 0::2] if self.full else t[0, :, 0, :]) for t in tables]

    def rewrite(self, op, x, cos, sin, pairs, out, **_):
        """RotaryEmbedding over x seen as [batch, tokens, heads x dim], reshaped as out."""
        tables = self.half_tables(pairs, cos, sin)
        _, _, heads, half, _ = pairs.shape
        flat = op.Reshape(x, op.Constant(value_ints=[0, 0, heads * 2 * half]))
        start = op.Constant(value=ir.tensor(np.zeros(1, np.int64)))  # positions 0 .. tokens - 1
        cos, sin = (op.Constant(value=ir.tensor(t)) for t in tables)
        rotated = op.RotaryEmbedding(flat, start, cos, sin, interleaved=1, num_heads=heads, _domain=MS)
        return op.Reshape(rotated, op.Constant(value_ints=[0, *list(out.shape)[1:]]))


def _pairs(op, x):
    """x's interleaved pairs and their first and second elements, as the exporters write unflatten and unbind."""
    pairs = op.Reshape(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["pairs"])
    first = op.Squeeze(op.Slice(pairs, _allow_other_inputs=True), _allow_other_inputs=True, _outputs=["first"])
    second = op.Squeeze(op.Slice(pairs, _allow_other_inputs=True), _allow_other_inputs=True, _outputs=["second"])
    return first, second


def _interleave(op, a, b, name: str):
    stacked = op.Concat(op.Unsqueeze(a, _allow_other_inputs=True), op.Unsqueeze(b, _allow_other_inputs=True),
                        _allow_other_attributes=True, _outputs=["stacked"])  # fmt: skip
    return op.Reshape(stacked, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=[name])


class RotateHalfPairs(_Rotary):
    """Flux's form: x·cos + rotated(x)·sin, rotated(x) the pairs (x0, x1) turned to (−x1, x0), with full-width
    tables holding each value twice."""

    full = True

    def __init__(self) -> None:
        super().__init__("rotary-flux")

    def pattern(self, op, x, cos, sin):
        first, second = _pairs(op, x)
        return op.Add(op.Mul(x, cos), op.Mul(_interleave(op, op.Neg(second), first, "rotated"), sin), _outputs=["out"])


class RotatedPairs(_Rotary):
    """Wan's form: the pairs (x0, x1) become (x0 cos − x1 sin, x0 sin + x1 cos), interleaved back, with
    half-width tables."""

    full = False

    def __init__(self) -> None:
        super().__init__("rotary-wan")

    def pattern(self, op, x, cos, sin):
        first, second = _pairs(op, x)
        even = op.Sub(op.Mul(first, cos), op.Mul(second, sin))
        odd = op.Add(op.Mul(first, sin), op.Mul(second, cos))
        return _interleave(op, even, odd, "out")


def _slice_index(value: ir.Value) -> int | None:
    """i when value is Slice(t, [i], [i + 1], [-1]) (step 1): element i of the last axis, kept as an axis of 1."""
    bounds = [constant_array(v) for v in value.producer().inputs[1:]]
    if len(bounds) not in (3, 4) or any(b is None or b.size != 1 for b in bounds):
        return None
    start, end, axis, *step = (int(b.reshape(-1)[0]) for b in bounds)
    return start if end == start + 1 and axis == -1 and step in ([], [1]) else None


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
    return [SkipLayerNorm(), BiasTanhGelu(), RotateHalfPairs(), RotatedPairs(), *(ConvActivation(a) for a in (*CUDNN_ACTIVATIONS, "LeakyRelu"))]


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
