"""Precision passes: run the model in float16 while its inputs and outputs stay float32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.base import KilnPass

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16

# Ops kept in float32 whole, and why; each gets Casts around it.
KEEP_FP32_OPS: dict[str, str] = {
    "Range": "ONNX Runtime has no float16 Range kernel",
    "RandomNormal": "sampling is defined in float32",
    "RandomUniform": "sampling is defined in float32",
}
# Inputs that ONNX defines as float32 whatever the data type (op -> input positions).
FLOAT32_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (1, 2), "Upsample": (1,)}


def _is_f32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == F32


def _is_fp32_slot(node: ir.Node, index: int) -> bool:
    """Whether input `index` of node must be float32: any input of a kept op, or a FLOAT32_INPUTS position."""
    if node.domain != "":
        return False
    return node.op_type in KEEP_FP32_OPS or index in FLOAT32_INPUTS.get(node.op_type, ())


def _only_feeds_fp32(value: ir.Value) -> bool:
    """Whether every use of value is a float32 slot (so it must stay float32 to keep its exact value)."""
    uses = list(value.uses())
    return bool(uses) and all(_is_fp32_slot(use.node, use.idx) for use in uses)


def _to_f16_tensor(tensor: ir.TensorProtocol) -> ir.Tensor:
    return ir.tensor(tensor.numpy().astype(np.float16), name=tensor.name)


def _cast(value: ir.Value, to: ir.DataType, name: str) -> ir.Node:
    out = ir.Value(name=name, type=ir.TensorType(to), shape=value.shape)
    return ir.node("Cast", [value], {"to": to}, outputs=[out], name=f"{name}_cast")


class ConvertToFloat16(KilnPass):
    """Every float32 tensor becomes float16, except the graph's inputs and outputs and the ops in
    KEEP_FP32_OPS, which get Casts at their boundary."""

    name = "fp16"
    summary = "convert float32 weights and activations to float16, keeping float32 IO"

    def requires(self, model: ir.Model) -> None:
        untyped = [v.name for v in model.graph.outputs if v.dtype is None]
        if untyped:
            raise ir.passes.PreconditionError(f"outputs {untyped} have no type; run infer-shapes first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        kept: dict[str, str] = {}
        converted = 0
        for init in graph.initializers.values():
            # One that only feeds float32 slots (Range bounds, Resize scales) keeps its exact value.
            if _is_f32(init) and init.const_value is not None and not _only_feeds_fp32(init):
                init.const_value = _to_f16_tensor(init.const_value)
                init.dtype = F16
                converted += 1
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            if node.op_type in KEEP_FP32_OPS and node.domain == "":
                kept[node.name or node.op_type] = KEEP_FP32_OPS[node.op_type]
                continue
            if self._is_fp32_boundary_cast(node):
                continue
            self._convert_attributes(node)
            for out in node.outputs:
                if _is_f32(out):
                    out.dtype = F16
                    converted += 1
        modified = converted > 0
        if modified:
            self._wrap_fp32_nodes(graph)
            self._keep_io_float32(graph)
        self.stats = {"values_converted": converted, "nodes_kept_fp32": len(kept)}
        self.details["kept_fp32"] = kept
        return ir.passes.PassResult(model, modified)

    def ensures(self, model: ir.Model) -> None:
        for init in model.graph.initializers.values():
            if _is_f32(init) and not all(
                use.node.op_type == "Cast" or _is_fp32_slot(use.node, use.idx) for use in init.uses()
            ):
                raise ir.passes.PostconditionError(f"initializer {init.name!r} is still float32")

    @staticmethod
    def _is_fp32_boundary_cast(node: ir.Node) -> bool:
        """A Cast to float32 that only feeds float32 slots or graph outputs, such as the ones this pass
        inserts; converting it again would make the pass add a second layer of Casts."""
        if node.op_type != "Cast" or node.domain != "" or not _is_f32(node.outputs[0]):
            return False
        out = node.outputs[0]
        uses = list(out.uses())
        if not uses and not out.is_graph_output():
            return False
        return all(_is_fp32_slot(use.node, use.idx) for use in uses)

    @staticmethod
    def _convert_attributes(node: ir.Node) -> None:
        if node.op_type == "Constant" and node.domain == "":
            # value_float(s) make a float32 output whatever the value's type says; store float16 instead.
            for name in ("value_float", "value_floats"):
                attr = node.attributes.pop(name, None)
                if attr is not None:
                    data = np.asarray(attr.value, dtype=np.float16)
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(data))
        to = node.attributes.get("to")
        if node.op_type == "Cast" and to is not None and to.as_int() == F32:
            node.attributes["to"] = ir.AttrInt64("to", F16)
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype == F32:
                node.attributes[name] = ir.AttrTensor(name, _to_f16_tensor(attr.as_tensor()))

    @staticmethod
    def _wrap_fp32_nodes(graph: ir.Graph) -> None:
        for node in list(graph):
            for i, value in enumerate(node.inputs):
                if value is not None and value.dtype == F16 and _is_fp32_slot(node, i):
                    cast = _cast(value, F32, f"{node.name or node.op_type}_in{i}_fp32")
                    graph.insert_before(node, cast)
                    node.replace_input_with(i, cast.outputs[0])
            if node.op_type not in KEEP_FP32_OPS or node.domain != "":
                continue
            for out in node.outputs:
                if out.dtype == F32 and out.uses():
                    cast = _cast(out, F16, f"{out.name}_fp16")
                    graph.insert_after(node, cast)
                    for use in list(out.uses()):
                        if use.node is not cast:
                            use.node.replace_input_with(use.idx, cast.outputs[0])

    @staticmethod
    def _keep_io_float32(graph: ir.Graph) -> None:
        for value in graph.inputs:
            # Float32 slots (Range bounds, Resize scales) keep reading the float32 input.
            uses = [use for use in value.uses() if not _is_fp32_slot(use.node, use.idx)]
            if _is_f32(value) and uses:
                cast = _cast(value, F16, f"{value.name}_fp16")
                for use in uses:
                    use.node.replace_input_with(use.idx, cast.outputs[0])
                graph.insert_before(next(iter(graph)), cast)
        for i, value in enumerate(graph.outputs):
            if value.dtype != F16 or value.is_graph_input():
                continue
            name = value.name
            value.name = f"{name}_fp16"
            cast = _cast(value, F32, name)
            graph.append(cast)
            graph.outputs[i] = cast.outputs[0]
