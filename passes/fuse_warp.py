"""FILM's backward warp (TensorFlow Addons' dense_image_warp, as tf2onnx lowers it) to one GridSample.

tf2onnx turns each bilinear warp into ~60 nodes: query points split into y and x, clamped floors and
alphas, four Gathers on the image flattened to [B*H*W, C], and a two-step lerp. The semantics are
bilinear sampling at the query points (pixel minus flow) with coordinates clamped to the border, which is
GridSample with align_corners=1 and padding_mode=border, given the query points normalized to [-1, 1].
The match is strict: every lerp and alpha is checked back to the same query points, y before x; anything
else is left alone with a warning naming the warp.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from kiln.passes.base import KilnPass

_ANCESTOR_DEPTH = 16  # index arithmetic between the query points and a Gather is ~10 nodes deep


class NoMatch(Exception):
    """Why a candidate warp is not the pattern; the pass turns it into a warning."""


@dataclasses.dataclass
class Warp:
    name: str
    image: ir.Value  # [B, H, W, C], the tensor that was flattened for the Gathers
    queries: ir.Value  # [B, H*W, 2], (y, x) in pixels
    output: ir.Value  # [B, H, W, C], what the warp's final Reshape produced
    anchor: ir.Node  # that final Reshape


def _op(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _only_use(value: ir.Value, op_type: str) -> ir.Node:
    uses = list(value.uses())
    if len(uses) != 1 or uses[0].node.op_type != op_type or value.is_graph_output():
        raise NoMatch(f"{value.name!r} should feed exactly one {op_type}")
    return uses[0].node


def _reaches(value: ir.Value, targets: set[ir.Value], depth: int = _ANCESTOR_DEPTH) -> set[ir.Value]:
    """Which of targets are ancestors of value (value included), looking depth nodes up."""
    found, frontier, seen = set(), [value], set()
    for _ in range(depth + 1):
        next_frontier = []
        for v in frontier:
            if v in seen or v is None:
                continue
            seen.add(v)
            if v in targets:
                found.add(v)
                continue
            producer = v.producer()
            if producer is not None:
                next_frontier.extend(producer.inputs)
        frontier = next_frontier
    return found


def _lerp(add: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value]:
    """add = alpha * (b - a) + a  ->  (alpha, a, b)."""
    if add is None or add.op_type != "Add":
        raise NoMatch("a lerp should end in Add")
    for mul_in, base in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        mul = _op(mul_in, "Mul")
        if mul is None:
            continue
        for alpha, diff in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
            sub = _op(diff, "Sub")
            if sub is not None and sub.inputs[1] is base:
                return alpha, base, sub.inputs[0]
    raise NoMatch(f"{add.name!r} is not alpha * (b - a) + a")


def match_warp(gathers: list[ir.Node]) -> Warp:
    """The warp that four Gathers on one flattened image belong to, or NoMatch saying why not."""
    flat = gathers[0].inputs[0]
    flatten = _op(flat, "Reshape")
    if any(g.attributes.get_int("axis", 0) != 0 for g in gathers):
        raise NoMatch("the Gathers should read along axis 0 of the flattened image")
    corners = {_only_use(g.outputs[0], "Reshape").outputs[0]: g for g in gathers}
    lerp_adds = set()
    for corner in corners:  # a row lerp adds its left corner back: alpha * (right - left) + left
        lerp_adds.update(use.node for use in corner.uses() if use.node.op_type == "Add")
    if len(lerp_adds) != 2:
        raise NoMatch(f"expected two row lerps over the four corners, found {len(lerp_adds)}")
    rows = [_lerp(add) for add in lerp_adds]
    alpha_x = rows[0][0]
    if rows[1][0] is not alpha_x or {rows[0][1], rows[0][2], rows[1][1], rows[1][2]} != set(corners):
        raise NoMatch("the two row lerps should share one x alpha and use all four corners")
    row_values = {add.outputs[0] for add in lerp_adds}
    outer_uses = {use.node for v in row_values for use in v.uses()}
    outer_adds = [n for n in outer_uses if n.op_type == "Add"]
    if len(outer_adds) != 1:
        raise NoMatch("expected one column lerp over the two row lerps")
    alpha_y, top, bottom = _lerp(outer_adds[0])
    if {top, bottom} != row_values:
        raise NoMatch("the column lerp should combine the two row lerps")
    anchor = _only_use(outer_adds[0].outputs[0], "Reshape")

    split = _query_split(alpha_y)
    queries = split.inputs[0]
    y, x = split.outputs
    if _reaches(alpha_y, {y, x}) != {y} or _reaches(alpha_x, {y, x}) != {x}:
        raise NoMatch("the alphas should come from the query points' y and x, in that order")
    for gather in gathers:
        if not _reaches(gather.inputs[1], {y, x}) == {y, x}:
            raise NoMatch(f"Gather {gather.name!r} should index by both query coordinates")
    if flatten is None or flatten.inputs[0] is None:
        raise NoMatch("the Gathers should read an image flattened by Reshape")
    name = _common_prefix([g.name or "" for g in gathers]) or gathers[0].name or "warp"
    return Warp(name, flatten.inputs[0], queries, anchor.outputs[0], anchor)


def _query_split(alpha: ir.Value) -> ir.Node:
    """The Split of [B, N, 2] query points (into y and x) that an alpha derives from."""
    frontier = [alpha]
    for _ in range(_ANCESTOR_DEPTH):
        next_frontier = []
        for v in frontier:
            node = v.producer() if v is not None else None
            if node is None:
                continue
            if node.op_type == "Split" and len(node.outputs) == 2 and node.attributes.get_int("axis", 0) in (2, -1):
                return node
            next_frontier.extend(node.inputs)
        frontier = next_frontier
    raise NoMatch("no Split of the query points into y and x above the alphas")


def _common_prefix(names: list[str]) -> str:
    parts = [n.split("/") for n in names]
    prefix = []
    for segment in zip(*parts):
        if len(set(segment)) != 1:
            break
        prefix.append(segment[0])
    return "/".join(prefix)


def _const(nodes: list[ir.Node], name: str, array) -> ir.Value:
    node = ir.node("Constant", [], {"value": ir.tensor(np.asarray(array), name=name)}, name=name)
    node.outputs[0].name = name
    nodes.append(node)
    return node.outputs[0]


def _add(nodes: list[ir.Node], op: str, inputs, name: str, **attrs) -> ir.Value:
    node = ir.node(op, inputs, attrs, name=name)
    node.outputs[0].name = name
    nodes.append(node)
    return node.outputs[0]


def grid_sample_nodes(warp: Warp, prefix: str, mode: str) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing GridSample(image, normalized query points) in NHWC, and the output value."""
    nodes: list[ir.Node] = []
    shape = _add(nodes, "Shape", [warp.image], f"{prefix}/shape")
    bhw = _add(nodes, "Slice", [shape, _const(nodes, f"{prefix}/c0", [0]), _const(nodes, f"{prefix}/c3", [3])], f"{prefix}/bhw")
    hw = _add(nodes, "Slice", [shape, _const(nodes, f"{prefix}/c1", [1]), _const(nodes, f"{prefix}/c3b", [3])], f"{prefix}/hw")
    grid_shape = _add(nodes, "Concat", [bhw, _const(nodes, f"{prefix}/c2", [2])], f"{prefix}/grid_shape", axis=0)
    yx = _add(nodes, "Reshape", [warp.queries, grid_shape], f"{prefix}/yx")
    # Pixel index p in a size-n axis maps to 2 p / (n - 1) - 1 under align_corners=1.
    hw_f = _add(nodes, "Cast", [hw], f"{prefix}/hw_f", to=ir.DataType.FLOAT)
    last = _add(nodes, "Sub", [hw_f, _const(nodes, f"{prefix}/one", np.float32(1))], f"{prefix}/last")
    scale = _add(nodes, "Div", [_const(nodes, f"{prefix}/two", np.float32(2)), last], f"{prefix}/scale")
    scaled = _add(nodes, "Mul", [yx, scale], f"{prefix}/scaled")
    yx_norm = _add(nodes, "Sub", [scaled, _const(nodes, f"{prefix}/one_b", np.float32(1))], f"{prefix}/yx_norm")
    xy = _add(nodes, "Slice", [yx_norm, _const(nodes, f"{prefix}/rev_start", [-1]), _const(nodes, f"{prefix}/rev_end", [-3]),
                               _const(nodes, f"{prefix}/rev_axis", [3]), _const(nodes, f"{prefix}/rev_step", [-1])], f"{prefix}/grid")  # fmt: skip
    nchw = _add(nodes, "Transpose", [warp.image], f"{prefix}/image_nchw", perm=[0, 3, 1, 2])
    sampled = _add(nodes, "GridSample", [nchw, xy], f"{prefix}/grid_sample", mode=mode, padding_mode="border", align_corners=1)
    out = _add(nodes, "Transpose", [sampled], f"{prefix}/output", perm=[0, 2, 3, 1])
    return nodes, out


class WarpToGridSample(KilnPass):
    name = "warp-to-gridsample"
    summary = "rewrite each bilinear backward warp (dense_image_warp's Gathers) into one GridSample"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 0)
        groups: dict[ir.Value, list[ir.Node]] = {}
        for node in graph:
            if node.op_type == "Gather" and node.domain == "" and _op(node.inputs[0], "Reshape") is not None:
                groups.setdefault(node.inputs[0], []).append(node)
        candidates = [g for g in groups.values() if len(g) == 4]
        rewritten = 0
        for gathers in candidates:
            label = _common_prefix([g.name or "" for g in gathers]) or gathers[0].name
            if opset < 16:
                self.warnings.append(f"warp {label!r} left as is: GridSample needs opset 16, the model has {opset}")
                continue
            try:
                warp = match_warp(gathers)
            except NoMatch as exc:
                self.warnings.append(f"warp {label!r} left as is: {exc}")
                continue
            nodes, out = grid_sample_nodes(warp, f"{warp.name}/kiln_grid_sample", "linear" if opset >= 20 else "bilinear")
            graph.insert_before(warp.anchor, nodes)
            out.shape, out.type = warp.output.shape, warp.output.type
            # Ask before replacing: afterwards the old value is no graph output any more.
            was_output = warp.output.is_graph_output()
            warp.output.replace_all_uses_with(out, replace_graph_outputs=True)
            if was_output:  # keep the graph output's name; the old value goes with its dead Reshape
                name = warp.output.name
                warp.output.name = f"{name}/replaced"
                out.name = name
            rewritten += 1
        if rewritten:
            common.RemoveUnusedNodesPass()(model)
        self.stats = {"warps_rewritten": rewritten, "warps_left": len(candidates) - rewritten}
        return ir.passes.PassResult(model, rewritten > 0)

    def ensures(self, model: ir.Model) -> None:
        left = self.stats.get("warps_left", 0)
        flat_gathers = sum(
            1 for n in model.graph if n.op_type == "Gather" and _op(n.inputs[0], "Reshape") is not None
        )
        if flat_gathers < 4 * left:
            raise ir.passes.PostconditionError("a warp that was not rewritten lost its Gathers")
