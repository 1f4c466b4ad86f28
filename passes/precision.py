"""Precision passes: run the model in float16 or bfloat16, keeping the numerically sensitive parts and
(by default) the inputs and outputs in float32. Every node kept in float32 is listed with its reason."""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from kiln.passes.base import KilnPass

F32 = ir.DataType.FLOAT
LOW = {"fp16": (ir.DataType.FLOAT16, np.float16), "bf16": (ir.DataType.BFLOAT16, ml_dtypes.bfloat16)}

_PHASE = "phases of timestep and positional embeddings reach ~1000 rad, where float16 steps by 0.5"
# Ops kept in float32 whole, and why; each gets Casts at its boundary.
KEEP_FP32_OPS: dict[str, str] = {
    "Range": "ONNX Runtime has no float16 Range kernel",
    "RandomNormal": "sampling is defined in float32",
    "RandomUniform": "sampling is defined in float32",
    "Sin": _PHASE,
    "Cos": _PHASE,
    "GridSample": "warp coordinates: at 1920 px, float16 steps near ±1 are half a pixel",
    # Also: ONNX Runtime has no float16 AffineGrid kernel and expands its function instead, and its
    # inserted Casts then repeat names across the If branches (INVALID_GRAPH, onnxruntime 1.32).
    "AffineGrid": "it makes GridSample's sampling coordinates, which stay float32",
    "MeanVarianceNormalization": "ONNX Runtime has no float16 kernel, and the function it expands instead does not type-check",
}
# Ops whose float output type an attribute sets (or its default, float32): kept float32, with Casts after.
TYPE_ATTRIBUTE_OPS: dict[str, str] = {
    "HannWindow": "output_datatype", "HammingWindow": "output_datatype", "BlackmanWindow": "output_datatype",
    "MelWeightMatrix": "output_datatype", "EyeLike": "dtype", "RandomNormalLike": "dtype",
    "RandomUniformLike": "dtype", "Bernoulli": "dtype", "BitCast": "to", "DequantizeLinear": "output_dtype",
}  # fmt: skip
# Inputs whose producing arithmetic stays float32 too, back to its sources (op -> input positions):
# the FILM flow that becomes sampling coordinates, the timestep scaled into a phase.
FP32_CHAIN_INPUTS: dict[str, tuple[int, ...]] = {"GridSample": (1,), "Sin": (0,), "Cos": (0,)}
# Ops a float32 chain extends through: cheap arithmetic and data movement on small tensors (the flow
# field, the timestep vector); anything heavier ends the chain, and its output is cast up.
CHAIN_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Exp", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Transpose",
    "Concat", "Expand", "Slice", "Split", "Gather", "Tile", "Identity", "Resize", "Where",
})  # fmt: skip
# Inputs that must stay float32 whatever the data type ((domain, op) -> input positions): ONNX defines
# Resize's and Upsample's so; ONNX Runtime's GroupNorm (fused from the VAE's InstanceNorm pattern)
# takes gamma and beta in float32 only, and fails at run time on the GPU otherwise.
FLOAT32_INPUTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("", "Resize"): (1, 2), ("", "Upsample"): (1,), ("com.microsoft", "GroupNorm"): (1, 2),
}  # fmt: skip
# Outputs that stay float32 whatever the data type ((domain, op) -> output positions): the optional mean
# and inverse standard deviation of the LayerNorm family, float32 in ONNX Runtime's kernels (its
# float16 LayerNormalization rejects a float16 Mean at load).
FLOAT32_OUTPUTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("", "LayerNormalization"): (1, 2), ("", "SimplifiedLayerNormalization"): (1,),
    ("com.microsoft", "SimplifiedLayerNormalization"): (1,), ("com.microsoft", "SkipLayerNormalization"): (1, 2),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (1, 2),
}  # fmt: skip
# Ops that stay in low precision because they keep float32 statistics inside (stash_type = 1).
FP32_INSIDE = ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "GroupNormalization")


def _is_f32(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == F32


def _attr_int(node: ir.Node, name: str) -> int:
    attr = node.attributes.get(name)
    return 0 if attr is None else attr.as_int()


def _all_names(graph: ir.Graph) -> set[str]:
    """Every value and node name in graph and its subgraphs."""
    names = {v.name for v in (*graph.inputs, *graph.initializers.values())}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        names.add(node.name)
        names.update(v.name for v in node.outputs)
        for sub in _subgraphs(node):
            names.update(v.name for v in sub.inputs)
    names.discard(None)
    return names


@functools.cache
def _formal_types(op_type: str, opset: int) -> tuple[tuple[frozenset[str], ...], tuple[frozenset[str], ...]]:
    """The types ONNX allows for each of op_type's formal inputs and outputs at opset (none if the op is unknown)."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return (), ()
    constraints = {c.type_param_str: frozenset(c.allowed_type_strs) for c in schema.type_constraints}
    return tuple(
        tuple(constraints.get(p.type_str, frozenset({p.type_str})) for p in params) for params in (schema.inputs, schema.outputs)
    )


_TYPE_NAMES = {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
_CONSTANT_OPS = ("Constant", "ConstantOfShape")


def _constant_data(node: ir.Node) -> np.ndarray | None:
    """The float32 data a Constant or ConstantOfShape node makes, else None."""
    if node.op_type not in _CONSTANT_OPS or node.domain != "" or not _is_f32(node.outputs[0]):
        return None
    for name, attr in node.attributes.items():
        if name in ("value_float", "value_floats"):
            return np.asarray(attr.value, dtype=np.float32)
        if name == "value" and attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype == F32:
            return attr.as_tensor().numpy()
    return None


def _subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


def _attribute_key(node: ir.Node, name: str) -> str:
    """How details name an attribute's tensor: a constant's by its output, any other by node and attribute."""
    if node.op_type in _CONSTANT_OPS and node.domain == "":
        return node.outputs[0].name
    return f"{node.name or node.op_type}.{name}"


def _lacks_type(node: ir.Node, low: ir.DataType, opset: int) -> bool:
    """Whether node is a standard op with a float32 input or output where ONNX allows float32 but not
    the low type (Resize's scales, LayerNormalization's Mean and the like, which stay float32 anyway, aside)."""
    if node.domain != "":
        return False
    wanted = f"tensor({_TYPE_NAMES[low]})"
    fixed = (FLOAT32_INPUTS.get(("", node.op_type), ()), FLOAT32_OUTPUTS.get(("", node.op_type), ()))
    for values, formals, fixed in zip((node.inputs, node.outputs), _formal_types(node.op_type, opset), fixed):
        for i, value in enumerate(values):
            allowed = formals[min(i, len(formals) - 1)] if formals else frozenset()  # the last one may repeat
            if _is_f32(value) and i not in fixed and "tensor(float)" in allowed and wanted not in allowed:
                return True
    return False


_LINEAR_ATTENTION = ("a linear attention's sums and their normalization (x / (sum + eps), eps <= 1e-6), which "
                     "diffusers computes in float32 (Sana, DC-AE)")  # fmt: skip


def _scalar(value: ir.Value) -> float | None:
    data = value.const_value.numpy() if value.const_value is not None else None
    if data is None and value.producer() is not None:
        data = _constant_data(value.producer())
    return float(data.reshape(-1)[0]) if data is not None and data.size == 1 else None


def _linear_attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    """A Div by (x + eps) with a tiny eps, and what makes its operands back to the MatMuls of two activations
    (not projections: a MatMul by a weight ends the walk, and so does any op outside the cheap chain ops)."""
    found: list[ir.Node] = []
    for div in graph:
        add = div.inputs[1].producer() if div.op_type == "Div" and div.domain == "" and div.inputs[1] is not None else None
        if add is None or add.op_type != "Add" or add.domain != "":
            continue
        eps = [v for v in (_scalar(i) for i in add.inputs if i is not None) if v is not None]
        if not eps or not 0 < abs(eps[0]) <= 1e-6:
            continue
        found += [div, add]
        stack = [v for v in (*div.inputs, *add.inputs) if v is not None]
        while stack:
            producer = stack.pop().producer()
            if producer is None or producer in found or producer.domain != "":
                continue
            if producer.op_type == "MatMul" and any(v.const_value is not None for v in producer.inputs):
                continue
            if producer.op_type not in CHAIN_OPS | {"MatMul", "Pad"}:
                continue
            found.append(producer)
            stack.extend(v for v in producer.inputs if v is not None and _is_f32(v))
    return found


def fp32_nodes(graph: ir.Graph, low: ir.DataType = ir.DataType.FLOAT16, opset: int = 18) -> dict[ir.Node, str]:
    """The nodes of graph that stay float32, each with the reason."""
    kept: dict[ir.Node, str] = dict.fromkeys(_linear_attention_nodes(graph), _LINEAR_ATTENTION)
    for node in graph:
        if node.domain not in ("", "com.microsoft") and any(_is_f32(v) for v in (*node.inputs, *node.outputs)):
            kept[node] = f"kiln does not know which types {node.domain or 'the'} {node.op_type} takes"
            continue
        if node.domain != "":
            continue
        reduction = node.attributes.get("reduction")
        if node.op_type in ("ScatterND", "ScatterElements") and reduction is not None and reduction.as_string() != "none":
            kept[node] = f"ONNX Runtime's CPU {node.op_type} has no {_TYPE_NAMES[low]} form with reduction {reduction.as_string()!r}"
            continue
        if node.op_type == "DequantizeLinear" and not _attr_int(node, "output_dtype"):
            continue  # its output takes its scale's type, which converts with the other initializers
        if node.op_type in TYPE_ATTRIBUTE_OPS and any(_is_f32(out) for out in node.outputs):
            kept[node] = f"its output type comes from its {TYPE_ATTRIBUTE_OPS[node.op_type]} attribute"
            continue
        if node.op_type not in KEEP_FP32_OPS:
            if _lacks_type(node, low, opset):
                kept[node] = f"ONNX {node.op_type} (opset {opset}) has no {_TYPE_NAMES[low]} form"
            continue
        kept[node] = KEEP_FP32_OPS[node.op_type]
        reason = f"feeds {node.op_type} ({KEEP_FP32_OPS[node.op_type]})"
        # Only float data is followed: integer shape arithmetic has no precision to lose.
        stack = [node.inputs[i] for i in FP32_CHAIN_INPUTS.get(node.op_type, ()) if i < len(node.inputs)]
        while stack:
            value = stack.pop()
            producer = value.producer() if _is_f32(value) else None
            if producer is None or producer in kept or producer.domain != "" or producer.op_type not in CHAIN_OPS:
                continue
            kept[producer] = reason
            stack.extend(producer.inputs)
    return kept


class ConvertPrecision(KilnPass):
    """Every float32 tensor becomes float16 (or bfloat16), except the nodes `fp32_nodes` keeps and,
    unless io_float32 is off, the graph's inputs and outputs; Casts join the two.

    A constant with finite values beyond the low type's range (float16's ±65504) would become inf.
    An initializer or a main-graph Constant/ConstantOfShape holding one stays float32, and so do the
    nodes reading it: a Cast to float16 in front of them would make the same inf at run time. Where
    that is not possible (other tensor attributes, constants in or read from subgraphs) the values
    are clamped to the finite range. Each such tensor is in details["out_of_range"] with the reason.
    """

    summary = "convert float32 weights and activations to float16 or bfloat16, keeping float32 IO and sensitive ops"

    def __init__(self, precision: str = "fp16", io_float32: bool = True) -> None:
        super().__init__()
        self.name = precision
        self.low, self.np_low = LOW[precision]
        self.io_float32 = io_float32
        self.finite_max = float(ml_dtypes.finfo(self.np_low).max)
        self._kept: dict[ir.Node, str] = {}
        self._out_of_range: dict[str, str] = {}
        self._names: set[str] = set()

    def requires(self, model: ir.Model) -> None:
        untyped = [v.name for v in model.graph.outputs if v.dtype is None]
        if untyped:
            raise ir.passes.PreconditionError(f"outputs {untyped} have no type; run infer-shapes first")

    def _is_fp32_slot(self, node: ir.Node, index: int) -> bool:
        """Whether input `index` of node must be float32: any input of a kept node, or a FLOAT32_INPUTS position."""
        return node in self._kept or index in FLOAT32_INPUTS.get((node.domain, node.op_type), ())

    def _only_feeds_fp32(self, value: ir.Value) -> bool:
        uses = list(value.uses())
        return bool(uses) and all(self._is_fp32_slot(use.node, use.idx) for use in uses)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._names = _all_names(graph)
        float32_outputs = {i for i, v in enumerate(graph.outputs) if _is_f32(v)}  # not those already low
        self._kept = fp32_nodes(graph, self.low, model.opset_imports.get("", 18))
        self._out_of_range = {}
        self._keep_out_of_range(graph)
        converted = 0
        subgraph_initializers = [v for n in ir.traversal.RecursiveGraphIterator(graph) for g in _subgraphs(n) for v in g.initializers.values()]
        for init in [*graph.initializers.values(), *subgraph_initializers]:
            # One that only feeds float32 slots (Range bounds, Resize scales, phase tables) keeps its exact value.
            if _is_f32(init) and init.const_value is not None and not self._only_feeds_fp32(init):
                init.const_value = self._low_tensor(init.const_value, init.name)
                init.dtype = self.low
                converted += 1
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            if node in self._kept or self._is_fp32_boundary_cast(node):
                continue
            self._convert_attributes(node)
            fixed = FLOAT32_OUTPUTS.get((node.domain, node.op_type), ())
            for i, out in enumerate(node.outputs):
                if _is_f32(out) and i not in fixed:
                    out.dtype = self.low
                    converted += 1
            # A Loop's or Scan's body takes the loop state and scan slices it is fed, now low precision.
            for sub in _subgraphs(node):
                for value in sub.inputs:
                    if _is_f32(value):
                        value.dtype = self.low
                        converted += 1
        if not self.io_float32:
            for value in graph.inputs:
                if _is_f32(value) and not self._only_feeds_fp32(value):
                    value.dtype = self.low
                    converted += 1
        if converted:
            self._join(graph)
            if self.io_float32:
                self._keep_io_float32(graph, float32_outputs)
        self.stats = {"values_converted": converted, "nodes_kept_fp32": len(self._kept)}
        self.details["kept_fp32"] = {node.name or node.op_type: reason for node, reason in self._kept.items()}
        inside = sorted({n.op_type for n in graph if n.op_type in FP32_INSIDE})
        if inside:
            self.details["fp32_inside"] = {op: "runs in low precision; its statistics accumulate in float32" for op in inside}
        if self._out_of_range:
            self.details["out_of_range"] = dict(self._out_of_range)
            self.stats["tensors_out_of_range"] = len(self._out_of_range)
        return ir.passes.PassResult(model, converted > 0)

    def ensures(self, model: ir.Model) -> None:
        for init in model.graph.initializers.values():
            if _is_f32(init) and not all(
                use.node.op_type == "Cast" or self._is_fp32_slot(use.node, use.idx)
                for use in init.uses()
            ):
                raise ir.passes.PostconditionError(f"initializer {init.name!r} is still float32")

    def _unique(self, name: str) -> str:
        """name, or name_2, name_3 ... if the graph has it already: ONNX values need unique names, and
        two unnamed nodes of one op type would otherwise give their Casts the same one."""
        candidate, n = name, 1
        while candidate in self._names:
            n += 1
            candidate = f"{name}_{n}"
        self._names.add(candidate)
        return candidate

    def _cast(self, value: ir.Value, to: ir.DataType, name: str) -> ir.Node:
        name = self._unique(name)
        out = ir.Value(name=name, type=ir.TensorType(to), shape=value.shape)
        return ir.node("Cast", [value], {"to": to}, outputs=[out], name=self._unique(f"{name}_cast"))

    def _is_fp32_boundary_cast(self, node: ir.Node) -> bool:
        """A Cast to float32 that only feeds float32 slots or graph outputs, such as the ones this pass
        inserts; converting it again would make the pass add a second layer of Casts."""
        if node.op_type != "Cast" or node.domain != "" or not _is_f32(node.outputs[0]):
            return False
        out = node.outputs[0]
        uses = list(out.uses())
        if not uses and not out.is_graph_output():
            return False
        return all(self._is_fp32_slot(use.node, use.idx) for use in uses)

    def _beyond_range(self, data: np.ndarray) -> float | None:
        """The largest finite |value| in data when it exceeds the low type's range, else None."""
        peak = float(np.max(np.abs(data), initial=0.0))
        if peak <= self.finite_max:
            return None
        if not np.isfinite(peak):  # an inf or nan already there is not this pass's doing
            finite = np.abs(data[np.isfinite(data)])
            peak = float(finite.max(initial=0.0))
        return peak if peak > self.finite_max else None

    def _note_out_of_range(self, key: str, peak: float, action: str) -> None:
        self._out_of_range[key] = f"max |value| {peak:g} is beyond {_TYPE_NAMES[self.low]}'s ±{self.finite_max:g}; {action}"

    def _keep_out_of_range(self, graph: ir.Graph) -> None:
        """Keep float32 the constants beyond the low type's range and the nodes that read them, where
        every reader is a main-graph node without subgraphs (Casts join only the main graph)."""
        constants = [(init, None, None) for init in graph.initializers.values() if _is_f32(init) and init.const_value is not None]
        for node in graph:
            data = _constant_data(node)
            if data is not None and node not in self._kept:
                constants.append((node.outputs[0], node, data))
        for value, producer, data in constants:
            uses = list(value.uses())
            if not uses or (producer is None and self._only_feeds_fp32(value)):
                continue  # a dead one is clamped, one that feeds float32 slots only stays exact anyway
            peak = self._beyond_range(value.const_value.numpy() if data is None else data)
            if peak is None or any(use.node.graph is not graph or _subgraphs(use.node) for use in uses):
                continue
            reason = f"reads {value.name}, whose values are beyond {_TYPE_NAMES[self.low]}'s range"
            if producer is not None:
                self._kept[producer] = f"its value is beyond {_TYPE_NAMES[self.low]}'s range"
            for use in uses:
                self._kept.setdefault(use.node, reason)
            self._note_out_of_range(value.name, peak, "kept in float32")

    def _low_data(self, data: np.ndarray, key: str) -> np.ndarray:
        """data in the low type, its finite values clamped to the low type's range (noted when they were beyond).

        A nonzero scalar that the low type would round to 0 is raised to its smallest subnormal: such a
        scalar is an epsilon guarding a division (Sana's linear attention adds 1e-15 to its denominator),
        and as 0 it gives 0 / 0. (Its smallest normal, 6.1e-5 in float16, would move Sana's outputs.)"""
        peak = self._beyond_range(data)
        if peak is not None:
            data = np.where(np.isfinite(data), np.clip(data, -self.finite_max, self.finite_max), data)
            self._note_out_of_range(key, peak, f"clamped to ±{self.finite_max:g}")
        tiny = float(ml_dtypes.finfo(self.np_low).smallest_subnormal)
        if data.size == 1 and 0 < abs(float(data.reshape(-1)[0])) < tiny / 2:
            self._out_of_range[key] = (f"|value| {abs(float(data.reshape(-1)[0])):g} rounds to 0 in {_TYPE_NAMES[self.low]}; "
                                       f"raised to {tiny:g}, as 0 it would give 0 / 0")  # fmt: skip
            data = np.copysign(np.full(data.shape, tiny, np.float32), data)
        return data.astype(self.np_low)

    def _low_tensor(self, tensor: ir.TensorProtocol, key: str) -> ir.Tensor:
        return ir.tensor(self._low_data(tensor.numpy(), key), name=tensor.name)

    def _convert_attributes(self, node: ir.Node) -> None:
        if node.op_type == "ConstantOfShape" and node.domain == "" and "value" not in node.attributes and _is_f32(node.outputs[0]):
            # Without a value it makes float32 zeros; a low-precision zero makes low-precision ones.
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros(1, self.np_low)))
        if node.op_type == "Constant" and node.domain == "":
            # value_float(s) make a float32 output whatever the value's type says; store low precision instead.
            for name in ("value_float", "value_floats"):
                attr = node.attributes.pop(name, None)
                if attr is not None:
                    data = self._low_data(np.asarray(attr.value, dtype=np.float32), _attribute_key(node, name))
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(data))
        to = node.attributes.get("to")
        if node.op_type == "Cast" and to is not None and to.as_int() == F32:
            node.attributes["to"] = ir.AttrInt64("to", self.low)
        for name, attr in list(node.attributes.items()):
            if attr.type == ir.AttributeType.TENSOR and attr.as_tensor().dtype == F32:
                node.attributes[name] = ir.AttrTensor(name, self._low_tensor(attr.as_tensor(), _attribute_key(node, name)))

    def _join(self, graph: ir.Graph) -> None:
        """Casts where a low-precision value meets a float32 slot, and where a kept node's float32
        output meets a converted node."""
        for node in list(graph):
            for i, value in enumerate(node.inputs):
                if value is not None and value.dtype == self.low and self._is_fp32_slot(node, i):
                    cast = self._cast(value, F32, f"{node.name or node.op_type}_in{i}_fp32")
                    graph.insert_before(node, cast)
                    node.replace_input_with(i, cast.outputs[0])
            fixed = FLOAT32_OUTPUTS.get((node.domain, node.op_type), ())
            for i, out in enumerate(node.outputs):
                if node not in self._kept and i not in fixed:
                    continue
                uses = [u for u in out.uses() if u.node not in self._kept and not self._is_fp32_slot(u.node, u.idx)]
                if out.dtype == F32 and uses:
                    cast = self._cast(out, self.low, f"{out.name}_{self.name}")
                    graph.insert_after(node, cast)
                    for use in uses:
                        use.node.replace_input_with(use.idx, cast.outputs[0])

    def _keep_io_float32(self, graph: ir.Graph, float32_outputs: set[int]) -> None:
        for value in graph.inputs:
            # Float32 slots (Range bounds, Resize scales, kept nodes) keep reading the float32 input.
            uses = [use for use in value.uses() if not self._is_fp32_slot(use.node, use.idx)]
            if _is_f32(value) and uses:
                cast = self._cast(value, self.low, f"{value.name}_{self.name}")
                for use in uses:
                    use.node.replace_input_with(use.idx, cast.outputs[0])
                graph.insert_before(next(iter(graph)), cast)
        for i, value in enumerate(graph.outputs):
            if value.dtype != self.low or value.is_graph_input() or i not in float32_outputs:
                continue
            name = value.name
            value.name = self._unique(f"{name}_{self.name}")
            cast = ir.node("Cast", [value], {"to": F32}, outputs=[ir.Value(name=name, type=ir.TensorType(F32), shape=value.shape)],
                           name=self._unique(f"{name}_cast"))  # fmt: skip
            graph.append(cast)
            graph.outputs[i] = cast.outputs[0]


class ConvertToFloat16(ConvertPrecision):
    def __init__(self, io_float32: bool = True) -> None:
        super().__init__("fp16", io_float32)
