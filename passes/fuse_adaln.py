"""The adaLN modulation of DiT-style blocks: fewer, larger kernels for shift, scale and gate.

A block computes `mod = Gemm(silu(emb))`, splits it into shift/scale/gate chunks of [batch, channels],
unsqueezes each chunk to [batch, 1, channels] and adds 1 to each scale. This pass unsqueezes `mod`
once and splits on the last axis (one kernel instead of one per chunk), and folds the `1 +` into the
Gemm's bias, so no Add is left on the chunks. It is a graph walk rather than an onnxscript pattern:
the Split has a variable number of outputs, each with its own consumers.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir

from kiln.passes.base import KilnPass, add_initializer, constant_array


def _unsqueeze_axes(node: ir.Node) -> list[int] | None:
    if node.op_type != "Unsqueeze" or node.domain != "":
        return None
    if len(node.inputs) > 1:
        axes = constant_array(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    attr = node.attributes.get("axes")
    return None if attr is None else list(attr.as_ints())


def _adds_one(node: ir.Node, value: ir.Value) -> bool:
    """Whether node is `value + 1` with a scalar constant 1."""
    if node.op_type != "Add" or node.domain != "" or len(node.inputs) != 2:
        return False
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    data = constant_array(other)
    return data is not None and data.size == 1 and float(data.reshape(())) == 1.0


class FuseAdaLnModulation(KilnPass):
    name = "fuse-adaln"
    summary = "adaLN shift/scale/gate: one Unsqueeze and Split per block, and the scale's 1+ folded into the Gemm bias"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        refusals: collections.Counter[str] = collections.Counter()
        fused = folded = 0
        for node in list(model.graph):
            if node.op_type != "Split" or node.domain != "":
                continue
            reason = self.check(node)
            if reason:
                if reason != "not a modulation split":
                    refusals[reason] += 1
                continue
            folded += self.rewrite(model.graph, node)
            fused += 1
        self.stats = {"modulations": fused, "one_plus_folded": folded}
        self.details["refused"] = dict(refusals)
        return ir.passes.PassResult(model, fused > 0)

    @staticmethod
    def check(split: ir.Node) -> str | None:
        """None when split is a modulation split this pass rewrites, else why not."""
        consumers = [list(out.uses()) for out in split.outputs]
        if not all(len(uses) == 1 and _unsqueeze_axes(uses[0].node) == [1] for uses in consumers):
            return "not a modulation split"
        source = split.inputs[0]
        if source.shape is None or len(source.shape) != 2:
            return "the modulation vector is not [batch, channels]"
        if split.attributes.get_int("axis", 0) not in (1, -1):
            return "the split is not along the channels"
        chunks = [*split.outputs, *(uses[0].node.outputs[0] for uses in consumers)]
        if any(value.is_graph_output() for value in chunks):
            return "a chunk is a graph output"
        return None

    def rewrite(self, graph: ir.Graph, split: ir.Node) -> int:
        """Rewire split's consumers to a channel-axis split of the unsqueezed vector; return the 1+'s folded."""
        source = split.inputs[0]
        axes = add_initializer(graph, f"{split.name}_axes", np.array([1], np.int64))
        wide = ir.node("Unsqueeze", [source, axes], name=f"{split.name}_unsqueeze")
        attributes = {k: v for k, v in split.attributes.items() if k != "axis"}
        chunks = ir.node(
            "Split", [wide.outputs[0], *split.inputs[1:]], attributes, num_outputs=len(split.outputs),
            name=f"{split.name}_channels",
        )
        chunks.attributes["axis"] = ir.AttrInt64("axis", 2)
        graph.insert_after(split, [wide, chunks])
        gemm = source.producer()
        bias = constant_array(gemm.inputs[2]) if gemm is not None and gemm.op_type == "Gemm" and len(gemm.inputs) > 2 else None
        width = None
        if bias is not None and bias.ndim == 1 and bias.shape[0] % len(split.outputs) == 0 and len(split.inputs) == 1:
            width = bias.shape[0] // len(split.outputs)  # equal chunks: the offset of chunk k is k * width
        folded, new_bias = 0, None if bias is None else bias.copy()
        dead = []
        for k, (old, new) in enumerate(zip(split.outputs, chunks.outputs)):
            unsqueeze = next(iter(old.uses())).node
            result = unsqueeze.outputs[0]
            new.shape, new.dtype = result.shape, result.dtype
            uses = list(result.uses())
            if width is not None and len(uses) == 1 and _adds_one(uses[0].node, result) and not uses[0].node.outputs[0].is_graph_output():
                add = uses[0].node
                new_bias[k * width : (k + 1) * width] += 1
                ir.convenience.replace_all_uses_with(add.outputs[0], new)
                dead.append(add)
                folded += 1
            ir.convenience.replace_all_uses_with(result, new)
            dead.append(unsqueeze)
        graph.remove([*dead, split], safe=True)
        if folded:
            value = add_initializer(graph, f"{gemm.name}_bias_plus_one", new_bias.astype(bias.dtype))
            old_bias = gemm.inputs[2]
            gemm.replace_input_with(2, value)
            if not old_bias.uses() and old_bias.name in graph.initializers:
                graph.initializers.pop(old_bias.name)
        return folded
