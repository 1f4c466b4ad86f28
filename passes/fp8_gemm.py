"""Lower FP8 Q/DQ matrix products to ONNX Runtime's com.microsoft.GemmFloat8 (CUDA, compute capability 8.9+).

ONNX Runtime's CUDA provider runs `MatMul(DequantizeLinear(QuantizeLinear(x)), DequantizeLinear(W8))`
as written: it dequantizes both sides and multiplies in fp16, so FP8 Q/DQ saves no time there. This
pass rewrites each such product into one cuBLASLt FP8 GEMM:

    x [.., K] -> Reshape [M, K] -> QuantizeLinear (E4M3, the calibrated activation scale)
      -> GemmFloat8(A, W8ᵀ [N, K], scaleA, scaleB, transB=1) -> Reshape [.., N] (-> * per-channel weight scales)

The weight is stored transposed, as [N, K], because cuBLASLt's FP8 kernels take only the "TN" layout.
A per-tensor weight scale goes into scaleB; per-channel scales multiply the output. K and N must be
multiples of 16 (cuBLASLt's FP8 alignment); other products keep their Q/DQ form, with the reason.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from kiln.passes.base import KilnPass, add_initializer, constant_array
from kiln.passes.qdq import Names

MS = "com.microsoft"
F8 = ir.DataType.FLOAT8E4M3FN
_ALIGN = 16


def _dq_input(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") else None


def _is_fp8(dq: ir.Node) -> bool:
    """Whether a DequantizeLinear reads E4M3 (its input's type, or its zero point's when the input has none)."""
    quantized, zero = dq.inputs[0], dq.inputs[2] if len(dq.inputs) > 2 else None
    return quantized.dtype == F8 or (quantized.dtype is None and zero is not None and zero.dtype == F8)


def _weight_fp8(dq: ir.Node) -> np.ndarray | None:
    """The E4M3 weight a DequantizeLinear reads: a constant (kiln's Q/DQ), or the QuantizeLinear of a
    constant float weight (ModelOpt's), folded here with its scale and axis."""
    stored = constant_array(dq.inputs[0])
    if stored is not None:
        return stored
    q = dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or len(q.inputs) < 3:
        return None
    weight, scale = constant_array(q.inputs[0]), constant_array(q.inputs[1])
    if weight is None or scale is None or q.inputs[2] is None or q.inputs[2].dtype != F8:
        return None
    if scale.size > 1:
        axis = q.attributes["axis"].as_int() if "axis" in q.attributes else 1
        scale = np.expand_dims(scale, tuple(i for i in range(weight.ndim) if i != axis % weight.ndim))
    return np.clip(weight.astype(np.float32) / scale.astype(np.float32), -448, 448).astype(ml_dtypes.float8_e4m3fn)


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_array(value)
    return float(array) if array is not None and array.size == 1 else None


class LowerFp8Gemm(KilnPass):
    name = "lower-fp8-gemm"
    summary = "rewrite FP8 Q/DQ MatMul and Gemm into com.microsoft.GemmFloat8 (cuBLASLt FP8 GEMM)"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, names = model.graph, Names(model.graph)
        self._quantized: dict[int, ir.Value] = {}  # one [M, K] E4M3 activation per QuantizeLinear, shared by its products
        lowered, refused = 0, {}
        for node in list(graph):
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
                continue
            why = self._lower(graph, names, node)
            if why is None:
                lowered += 1
            elif why:
                refused[node.name] = why
        if lowered:
            model.opset_imports.setdefault(MS, 1)
            for name, value in list(graph.initializers.items()):  # float weights ModelOpt quantized in the graph
                if not value.uses() and value not in graph.outputs:
                    graph.initializers.pop(name)
        self.stats = {"lowered": lowered}
        self.details["refused"] = refused
        return ir.passes.PassResult(model, bool(lowered))

    def _lower(self, graph: ir.Graph, names: Names, node: ir.Node) -> str | None:
        """None when lowered; "" when node is no FP8 Q/DQ product; else why it stays."""
        a_dq, w_dq = _dq_input(node.inputs[0]), _dq_input(node.inputs[1])
        if a_dq is None or w_dq is None:
            return ""
        a_q = a_dq.inputs[0].producer() if a_dq.inputs[0] is not None else None
        w8 = _weight_fp8(w_dq)
        if a_q is None or a_q.op_type != "QuantizeLinear" or not _is_fp8(a_dq) or w8 is None or not _is_fp8(w_dq):
            return ""
        a_scale, w_scale = _scalar(a_dq.inputs[1]), constant_array(w_dq.inputs[1])
        if a_scale is None or w_scale is None or w8.ndim != 2:
            return "the activation scale is not one constant, or the weight is not a 2-D constant"
        attrs = {k: v.value for k, v in node.attributes.items()}
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            return "Gemm with transA, alpha or beta"
        trans_b = bool(attrs.get("transB", 0)) if node.op_type == "Gemm" else False
        w_nk = w8 if trans_b else w8.T  # [N, K]
        n, k = w_nk.shape
        if n % _ALIGN or k % _ALIGN:
            return f"K={k} and N={n} must be multiples of {_ALIGN} for cuBLASLt's FP8 GEMM"
        x = a_q.inputs[0]  # the activation before quantization, in the model's compute type
        out = node.outputs[0]
        dtype = out.dtype
        if dtype not in (ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.BFLOAT16):
            return f"output type {dtype} is not one GemmFloat8 writes"
        rank = len(x.shape) if x.shape is not None else None
        if rank is None or rank < 2:
            return "the activation's rank is unknown"

        def const(base: str, array: np.ndarray) -> ir.Value:
            return add_initializer(graph, names(base), array)

        def add(op: str, inputs, domain: str = "", **attributes) -> ir.Value:
            new = ir.Node(domain, op, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attributes.items()],
                          name=names(f"{node.name}_{op}"), num_outputs=1)  # fmt: skip
            graph.insert_before(node, new)
            return new.outputs[0]

        per_channel = w_scale.size > 1
        xq = self._quantized.get(id(a_q))
        if xq is None:
            x2 = add("Reshape", [x, const(f"{node.name}_mk", np.array([-1, k], np.int64))]) if rank > 2 else x
            xq = add("QuantizeLinear", [x2, a_q.inputs[1], a_q.inputs[2]])
            xq.dtype = F8
            self._quantized[id(a_q)] = xq
        w_value = const(f"{node.name}_weight_nk", np.ascontiguousarray(w_nk))
        scale_a = const(f"{node.name}_scale_a", np.array(a_scale, np.float32))
        scale_b = const(f"{node.name}_scale_b", np.array(1.0 if per_channel else float(w_scale), np.float32))
        y = add("GemmFloat8", [xq, w_value, None, scale_a, scale_b], MS, transA=0, transB=1, alpha=1.0, beta=0.0,
                dtype=int(dtype), activation="NONE")  # fmt: skip
        y.dtype = dtype
        if per_channel:
            y = add("Mul", [y, const(f"{node.name}_weight_scales", w_scale.reshape(-1).astype(dtype.numpy()))])
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            y = add("Add", [y, node.inputs[2]])
        if rank > 2:
            lead = add("Slice", [add("Shape", [x]), const(f"{node.name}_zero", np.array([0], np.int64)),
                                 const(f"{node.name}_minus_one", np.array([-1], np.int64))])  # fmt: skip
            shape = add("Concat", [lead, const(f"{node.name}_n", np.array([n], np.int64))], axis=0)
            y = add("Reshape", [y, shape])
        y.shape, y.dtype = out.shape, dtype
        is_output = out in graph.outputs
        out.replace_all_uses_with(y, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if is_output:
            name = out.name
            out.name = None
            y.name = name
        for dead in (a_dq, w_dq, a_q, w_dq.inputs[0].producer()):
            if dead is None:
                continue
            if all(not v.uses() for v in dead.outputs) and dead.graph is graph:
                graph.remove(dead, safe=True)
        return None
