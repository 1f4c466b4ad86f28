"""Complex tensors in an exported program, rewritten as real ones: each complex value becomes a real
tensor with a trailing axis of 2 (real, imaginary), as torch.view_as_real lays it out.

Rotary embeddings are often written with complex numbers (torch.polar, view_as_complex, a complex
product). torch.onnx translates a few complex ops and fails on the rest (expand, unsqueeze, split of a
complex table); ONNX has no complex type at all. This pass rewrites every op on complex values that it
knows into real ops, so nothing complex reaches the translation. An op it does not know is left as it
is, and the translation names it.
"""

from __future__ import annotations

import operator

# Ops that only move elements: the same op on the real layout, their dim arguments pointed at the same axes.
_DIM_ARGS = {  # op name -> positions of dim arguments (after the tensor)
    "unsqueeze.default": (1,), "squeeze.dim": (1,), "select.int": (1,), "slice.Tensor": (1,),
    "split_with_sizes.default": (2,), "split.Tensor": (2,), "flatten.using_ints": (1, 2), "transpose.int": (1, 2),
    "clone.default": (), "contiguous.default": (), "alias.default": (), "index.Tensor": (),
}  # fmt: skip
_SIZE_ARGS = {"expand.default", "view.default", "_unsafe_view.default", "reshape.default"}
_REAL_OF = {"complex64": "float32", "complex128": "float64", "complex32": "float16"}


def _is_complex(value) -> bool:
    return getattr(value, "is_complex", lambda: False)()


def _op_name(target) -> str:
    return f"{target._opname}.{target._overloadname}" if hasattr(target, "_overloadname") else ""


def lower_complex(ep) -> tuple[object, int]:
    """(ep with its complex values rewritten, how many ops were rewritten: 0 where it has none)."""
    import torch
    from torch._guards import detect_fake_mode

    if not any(_is_complex(n.meta.get("val")) for n in ep.graph.nodes):
        return ep, 0
    if any(isinstance(n.target, torch._ops.HigherOrderOperator) for n in ep.graph.nodes):
        ep = ep.run_decompositions({})  # inlines regions (autocast) whose ops would otherwise hide in submodules
    graph = ep.graph_module.graph
    nodes = list(graph.nodes)
    aten = torch.ops.aten
    fake_mode = detect_fake_mode([n.meta.get("val") for n in nodes if n.op == "placeholder"])
    real: dict = {}  # a complex node -> the node holding its real layout

    def call(target, *args, **kwargs):
        node = graph.call_function(target, args, kwargs)
        fake = torch.fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
        with fake_mode:
            node.meta["val"] = target(*fake[0], **fake[1])
        return node

    def part(z, index):
        return call(aten.select.int, real[z], -1, index)

    done, dead = 0, []
    for node in nodes:
        if node.op != "call_function":
            continue
        val = node.meta.get("val")
        inputs = [a for a in node.all_input_nodes if a in real]
        if not inputs and not _is_complex(val) and not (isinstance(val, (list, tuple)) and any(map(_is_complex, val))):
            continue
        name, args = _op_name(node.target), node.args
        with graph.inserting_before(node):
            if node.target is aten.view_as_complex.default:
                real[node] = args[0]
            elif node.target is aten.view_as_real.default:
                node.replace_all_uses_with(real[args[0]])
            elif node.target is aten._assert_tensor_metadata.default:
                pass
            elif node.target is aten.polar.default:
                magnitude, angle = args
                parts = [call(aten.mul.Tensor, magnitude, call(f, angle)) for f in (aten.cos.default, aten.sin.default)]
                real[node] = call(aten.stack.default, parts, -1)
            elif node.target is aten.mul.Tensor and all(a in real for a in args[:2] if isinstance(a, torch.fx.Node)):
                a, b = args
                if isinstance(b, torch.fx.Node):  # (a0 + i a1)(b0 + i b1)
                    a0, a1, b0, b1 = part(a, 0), part(a, 1), part(b, 0), part(b, 1)
                    re = call(aten.sub.Tensor, call(aten.mul.Tensor, a0, b0), call(aten.mul.Tensor, a1, b1))
                    im = call(aten.add.Tensor, call(aten.mul.Tensor, a0, b1), call(aten.mul.Tensor, a1, b0))
                    real[node] = call(aten.stack.default, [re, im], -1)
                else:
                    real[node] = call(aten.mul.Tensor, real[a], b)
            elif node.target is aten.mul.Tensor:  # a complex tensor times a real one
                z, r = (args[0], args[1]) if args[0] in real else (args[1], args[0])
                real[node] = call(aten.mul.Tensor, real[z], call(aten.unsqueeze.default, r, -1))
            elif node.target in (aten.add.Tensor, aten.sub.Tensor) and all(a in real for a in args[:2]):
                real[node] = call(node.target, real[args[0]], real[args[1]])
            elif node.target in (aten._to_copy.default, aten.to.dtype_layout, aten.to.dtype) and args[0] in real:
                dtype = node.kwargs.get("dtype", args[1] if len(args) > 1 else None)
                dtype = getattr(torch, _REAL_OF[str(dtype).removeprefix("torch.")]) if dtype is not None else None
                real[node] = call(aten._to_copy.default, real[args[0]], dtype=dtype)
            elif node.target in (aten.cat.default, aten.stack.default):
                tensors, dim = args[0], args[1] if len(args) > 1 else 0
                rank = tensors[0].meta["val"].dim() + (node.target is aten.stack.default)
                real[node] = call(node.target, [real[t] for t in tensors], dim % rank)
            elif node.target is aten.permute.default:
                rank = args[0].meta["val"].dim()
                real[node] = call(node.target, real[args[0]], [d % rank for d in args[1]] + [rank])
            elif node.target is aten.repeat.default:
                real[node] = call(node.target, real[args[0]], [*args[1], 1])
            elif name in _SIZE_ARGS:
                real[node] = call(node.target, real[args[0]], [*args[1], 2])
            elif name in _DIM_ARGS:
                rank = args[0].meta["val"].dim() + (node.target is aten.unsqueeze.default)
                new = [real[args[0]], *args[1:]]
                for i in _DIM_ARGS[name]:
                    if i < len(new) and isinstance(new[i], int):
                        new[i] %= rank
                real[node] = call(node.target, *new, **node.kwargs)
            elif node.target is operator.getitem and args[0] in real:
                real[node] = call(operator.getitem, real[args[0]], args[1])
            else:  # unknown: left complex, for the translation to name
                continue
        done += 1
        dead.append(node)
    for node in reversed(dead):
        if not node.users:
            graph.erase_node(node)
    graph.lint()
    ep.graph_module.recompile()
    return ep, done
