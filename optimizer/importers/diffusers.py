"""diffusers models -> ONNX through torch.onnx, checked against PyTorch before kiln goes on.

A directory written by diffusers' save_pretrained (config.json naming the class in `_class_name`,
safetensors weights, sharded or not) is loaded with that class from diffusers, wrapped so its inputs
and output have meaningful names, and exported in fp32 with the dynamo exporter (torch.export, then
torch.onnx); the TorchScript exporter is tried only when the dynamo exporter raises, and the record
says why. Batch, latent height and width, frames and text length are dynamic within ranges the user
sets with --shapes; each range is checked against the model's constraints before exporting, and the
export is run on ONNX Runtime and compared with PyTorch at the min, opt and max of the ranges and at
one shape that is none of those. A failing check stops the import, naming the shape.

What each model family takes (input names, how to make each input from the config, dynamic dims,
constraints, workarounds for export) is one `Adapter` (optimizer/importers/diffusion_adapters.py).
torch and diffusers are imported only inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

from kiln.optimizer.errors import InputError
from kiln.optimizer.importers.complex_lowering import lower_complex
from kiln.optimizer.importers.diffusion_adapters import (
    Adapter,
    adapter_for,
    all_sizes,
    check_sizes,
    export_sizes,
    fmt_sizes,
    input_shapes,
    make_inputs,
    resolve_ranges,
    shapes_spec,
    supported_hint,
)
from kiln.optimizer.lazy import check_installed, require
from kiln.optimizer.precision_policy import CLASS_METADATA_KEY
from kiln.optimizer.shapes import DIM_RULES_METADATA_KEY, INT_RANGES_METADATA_KEY, SHAPES_METADATA_KEY
from kiln.targets import DimRange
from kiln.targets.engine import session_options
from kiln.targets.profile import base_dim, derived_dim

CONFIG = "config.json"
PIPELINE_INDEX = "model_index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
EXTRA = "torch"
SOURCE_FORMAT = "diffusers"
# Parity with PyTorch: max |onnx - torch| <= PARITY_ATOL * max(1, max |torch|), fp32.
PARITY_ATOL = 1e-4
PARITY_RULE = "max |onnx - torch| <= 1e-4 * max(1, max |torch|)"
TORCHSCRIPT_OPSET = 17
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "diffusers", "onnxscript")


# -- Finding and loading ---------------------------------------------------------------------------


def _read_config(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_model_dir(path: Path) -> bool:
    config = _read_config(path / CONFIG)
    return config is not None and isinstance(config.get("_class_name"), str)


def is_diffusers_dir(path: Path) -> bool:
    """A diffusers model directory (config.json with _class_name), or a pipeline directory (model_index.json).

    A pipeline directory is claimed so that `load` can tell the user which subfolder to pass instead.
    """
    path = Path(path)
    return path.is_dir() and ((path / PIPELINE_INDEX).is_file() or _is_model_dir(path))


def model_subfolders(pipeline: Path) -> list[str]:
    """'NAME/ (CLASS)' for each subfolder of a pipeline directory that holds a diffusers model."""
    return [f"{sub.name}/ ({_read_config(sub / CONFIG)['_class_name']})"
            for sub in sorted(p for p in pipeline.iterdir() if p.is_dir()) if _is_model_dir(sub)]  # fmt: skip


def read_model_config(path: Path) -> dict:
    """The model's config.json; a pipeline directory is refused, naming the subfolders to pass instead."""
    if (path / PIPELINE_INDEX).is_file():
        subs = model_subfolders(path)
        raise InputError(
            f"{path} is a diffusers pipeline (it has {PIPELINE_INDEX}); kiln optimizes one model of a pipeline at a time",
            hint=f"pass the subfolder of the model to optimize: {', '.join(str(path / s) for s in subs)}" if subs
            else "pass the subfolder of the model to optimize, e.g. transformer/ or vae/",
        )  # fmt: skip
    if not _is_model_dir(path):
        raise InputError(f"{path / CONFIG} is not a diffusers model config (a JSON object with _class_name)",
                         hint="pass a directory written by a diffusers model's save_pretrained")  # fmt: skip
    return _read_config(path / CONFIG)


def _weights(path: Path) -> tuple[list[Path], list[Path]]:
    """(safetensors files and indexes, pickle files and indexes) in path."""
    files = sorted(p for p in path.iterdir() if p.is_file())
    safetensors = [p for p in files if p.name.endswith((".safetensors", ".safetensors.index.json"))]
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES or p.name.endswith(".bin.index.json")]
    return safetensors, pickles


def _variant(files: list[Path]) -> str | None:
    """diffusers' weights variant (diffusion_pytorch_model.fp16.safetensors: fp16) when there are only variants."""
    weights = r"(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?"
    if not files or any(re.fullmatch(r"[^.]+" + weights, f.name) for f in files):
        return None
    match = re.fullmatch(r"[^.]+\.([^.-]+)" + weights, files[0].name)
    return match.group(1) if match else None


def load(path: Path, trust_pickle: bool = False):
    """The diffusers model in path, in fp32 and eval mode, loaded from local files only.

    Weights come from *.safetensors (one file, or shards with an index). A directory holding only pickle
    weights (.bin, .pt, .ckpt ...) is refused unless trust_pickle: unpickling can run arbitrary code.
    """
    path = Path(path)
    class_name = read_model_config(path)["_class_name"]
    why = f"importing the diffusers model {path}"
    check_installed(["torch", "diffusers", "safetensors"], EXTRA, why)
    torch = require("torch", EXTRA, why)
    with quiet_libraries():
        diffusers = require("diffusers", EXTRA, why)
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise InputError(
            f"{path / CONFIG} names the class {class_name!r}, which is not a model class of diffusers "
            f"{diffusers.__version__}",
            hint="check _class_name in config.json, or upgrade diffusers (pip install -U diffusers) if the class is newer",
        )
    safetensors, pickles = _weights(path)
    if not safetensors and not pickles:
        raise InputError(f"{path} has a config.json but no weights (no *.safetensors file)",
                         hint="save the model with save_pretrained(directory, safe_serialization=True)")  # fmt: skip
    if not safetensors and not trust_pickle:
        raise InputError(
            f"{path} holds its weights only as pickle files ({', '.join(p.name for p in pickles)}); loading a pickle "
            "file can run arbitrary code, so kiln does not load them unless told to",
            hint="convert the weights to safetensors (save_pretrained(directory, safe_serialization=True)), "
            "or pass --trust-pickle if you trust where the files came from",
        )
    kwargs = dict(local_files_only=True, low_cpu_mem_usage=True, torch_dtype=torch.float32,
                  use_safetensors=bool(safetensors))  # fmt: skip
    variant = _variant(safetensors or pickles)
    if variant:
        kwargs["variant"] = variant
    try:
        with quiet_libraries():
            model = cls.from_pretrained(os.fspath(path), **kwargs)
    except Exception as exc:  # diffusers raises many kinds; all mean the directory does not load
        hint = "check the directory was written by save_pretrained and is complete"
        if "low_cpu_mem_usage" in str(exc) and importlib.util.find_spec("accelerate") is None:
            # diffusers loads a model that keeps modules in float32 only through accelerate
            hint = "install accelerate (pip install accelerate; kiln-ml[torch] includes it)"
        raise InputError(f"diffusers could not load {class_name} from {path}: {_one_line(exc)}", hint=hint) from None
    model.eval()
    model.requires_grad_(False)
    return model


# -- Export ----------------------------------------------------------------------------------------


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    text = text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep the exporters' progress lines and warnings off stdout and stderr (`kiln --json` needs stdout clean;
    kiln reports what fails itself)."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        # stderr too: the TorchScript exporter prints the whole graph there when it fails
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def wrapped_model(model, adapter: Adapter):
    """A module whose forward takes the adapter's inputs in order and returns the output tensor."""
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return adapter.call(self.model, *inputs)

    return Wrapped().eval()


@contextlib.contextmanager
def _patched(model, adapter: Adapter) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for patch in adapter.patches:
            stack.enter_context(patch.apply(model))
        yield


def _export_dims(adapter: Adapter, ranges: Mapping[str, DimRange], sizes: Mapping[str, int]) -> dict[str, object]:
    """torch.export Dims by dim name, spanning the range and the export size; multiples as derived dims."""
    from torch.export import Dim

    dims: dict[str, object] = {}
    for rule in adapter.dynamic_dims:
        r, m, size = ranges[rule.name], rule.multiple, sizes[rule.name]
        lo, hi = max(1, min(r.min, size) // m), max(r.max, size + m) // m
        # The export's dim reaches a step past the traced size: traced at the top of its range, torch.export
        # can take a transposed tensor for a contiguous one and write a view that fails (LTX-Video, batch=1..2)
        dims[rule.name] = Dim(rule.name, min=lo, max=hi) if m == 1 else m * Dim(f"{rule.name}_over_{m}", min=lo, max=hi)
    dims.update({r.name: dims[r.same_as] for r in adapter.dims if r.same_as is not None})
    for axis in {a for i in adapter.inputs for a in i.axes if isinstance(a, str) and a not in dims}:
        if base_dim(axis) in dims:
            dims[axis] = _derived_export_dim(adapter, axis, dims)
    return dims


def _derived_export_dim(adapter: Adapter, axis: str, dims: Mapping[str, object]):
    """torch.export's Dim for an axis derived from a dynamic dim (height/2: a*root + b, where root is the dim
    or, for one in multiples of m, the dim over m)."""
    base, scale, divisor, offset = derived_dim(axis)
    rule = adapter.rule(base)
    step = scale * rule.multiple
    if step % divisor:
        raise ValueError(f"{adapter.class_name}: axis {axis} is not whole for every size of {base}")
    root = dims[base] if rule.multiple == 1 else dims[base].root  # m * Dim(base_over_m)'s Dim
    return step // divisor * root + offset if (step // divisor, offset) != (1, 0) else root


def _repeat_interleave_int(self, repeats, dim=None, output_size=None):
    """aten.repeat_interleave.self_int as unsqueeze, expand, reshape."""
    if dim is None:
        self, dim = self.reshape(-1), 0
    dim = dim % self.dim()
    shape = list(self.shape)
    expanded = self.unsqueeze(dim + 1).expand(*shape[: dim + 1], repeats, *shape[dim + 1 :])
    shape[dim] = shape[dim] * repeats
    return expanded.reshape(shape)


def _fix_exported_program(ep) -> tuple[object, list[str], dict]:
    """Rewrite what torch.onnx translates into graphs that fail at sizes other than the traced ones; returns
    (program, fixes, decompositions for torch.onnx's own decomposition of the program)."""
    import torch

    aten, fixes, decompositions = torch.ops.aten, [], {}
    ep, lowered = lower_complex(ep)
    if lowered:
        fixes.append(f"{lowered} op(s) on complex tensors (rotary tables) rewritten as real arithmetic "
                     "(ONNX has no complex type; torch.onnx translates few complex ops)")  # fmt: skip
    if any(n.target == aten.repeat_interleave.self_int for n in ep.graph.nodes):
        # torchlib puts a dynamic repeat count on the wrong axis of its Expand (Latte, CogVideoX).
        decompositions[aten.repeat_interleave.self_int] = _repeat_interleave_int
        fixes.append("repeat_interleave by a dynamic count exported as unsqueeze-expand-reshape "
                     "(torch.onnx expands on the wrong axis)")  # fmt: skip
    graph, dropped = ep.graph_module.graph, 0
    for node in list(graph.nodes):
        # x.squeeze(d) where dim d is dynamic and not 1 when traced leaves x as it is, but torchlib writes an ONNX
        # Squeeze, which fails whenever the dim is not 1 (PixArt's squeeze(1) of the token axis).
        if node.op == "call_function" and node.target in (aten.squeeze.dim, aten.squeeze.dims):
            before, after = node.args[0].meta.get("val"), node.meta.get("val")
            if before is not None and after is not None and before.dim() == after.dim():
                if not any(user.op == "output" for user in node.users):
                    node.replace_all_uses_with(node.args[0])
                    graph.erase_node(node)
                    dropped += 1
    if dropped:
        ep.graph_module.recompile()
        fixes.append(f"{dropped} squeeze(s) of a dynamic dim, no-ops at the traced size, left out "
                     "(ONNX Squeeze fails whenever the dim is not 1)")  # fmt: skip
    interleaved = _interleaved_writes(graph)
    if interleaved:
        ep.graph_module.recompile()
        fixes.append(f"{interleaved} pair(s) of strided writes (out[..., 0::2], out[..., 1::2]) as one interleaving stack")
    logical = _logical_masked_fills(graph)
    if logical:
        ep.graph_module.recompile()
        fixes.append(f"{logical} masked_fill(s) of a boolean tensor as logical ops (ONNX Runtime has no boolean Where)")
    return ep, fixes, decompositions


@contextlib.contextmanager
def _onnx_decompositions(extra: dict) -> Iterator[None]:
    """torch.onnx decomposes the exported program once, before translating it; extra joins its table there,
    so a fix costs no retrace of its own (about 10 s for a video transformer on 2 cores)."""
    from torch.onnx._internal.exporter import _decomp

    original = _decomp.create_onnx_friendly_decomposition_table
    _decomp.create_onnx_friendly_decomposition_table = lambda ops: {**original(ops), **extra}
    try:
        yield
    finally:
        _decomp.create_onnx_friendly_decomposition_table = original


def _logical_masked_fills(graph) -> int:
    """x.masked_fill(mask, value) on a boolean x as x & ~mask (value False) or x | mask (value True)."""
    import torch

    aten, done = torch.ops.aten, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.masked_fill.Scalar:
            continue
        x, mask, value = node.args
        if getattr(x.meta.get("val"), "dtype", None) != torch.bool:
            continue
        with graph.inserting_before(node):
            if value:
                new = graph.call_function(aten.logical_or.default, (x, mask))
            else:
                inverted = graph.call_function(aten.logical_not.default, (mask,))
                inverted.meta["val"] = mask.meta.get("val")
                new = graph.call_function(aten.logical_and.default, (x, inverted))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        done += 1
    return done


def _interleaved_writes(graph) -> int:
    """out = empty_like(x); out[..., 0::2] = a; out[..., 1::2] = b (Wan's rotary embedding) as
    stack([a, b], -1).flatten(-2): torch.onnx writes the strided copies as ScatterNDs between transposes, which
    cost a pass over the activation each and hide the rotary from kiln's fusion."""
    import torch

    aten, order, done = torch.ops.aten, {n: i for i, n in enumerate(graph.nodes)}, 0
    for empty in [n for n in graph.nodes if n.op == "call_function" and n.target == aten.empty_like.default]:
        rank, users = empty.meta["val"].dim(), list(empty.users)
        writes = {}  # start -> (slice, copy_)
        for user in users:
            if user.target == aten.slice.Tensor and len(user.args) == 5 and user.args[1] in (-1, rank - 1) \
                    and user.args[4] == 2 and user.args[3] >= 2**62 and len(user.users) == 1:
                (copy,) = user.users
                if copy.target == aten.copy_.default and copy.args[0] is user and not copy.users:
                    writes.setdefault(user.args[2], []).append((user, copy))
        if sorted(writes) != [0, 1] or any(len(w) != 1 for w in writes.values()):
            continue
        ((even_slice, even),), ((odd_slice, odd),) = writes[0], writes[1]
        a, b = even.args[1], odd.args[1]
        if any(len(v.users) != 1 or v.meta["val"].dtype != empty.meta["val"].dtype
               or v.meta["val"].shape != even_slice.meta["val"].shape for v in (a, b)):  # fmt: skip
            continue  # a value read elsewhere might be changed in place before the stack reads it
        readers = [u for u in users if u not in (even_slice, odd_slice)]
        last = max(even, odd, key=order.get)
        if any(order[r] < order[last] for r in readers):
            continue
        with graph.inserting_after(last):
            stacked = graph.call_function(aten.stack.default, ([a, b], rank))
        with graph.inserting_after(stacked):
            flat = graph.call_function(aten.flatten.using_ints, (stacked, rank - 1, rank))
        with a.meta["val"].fake_mode:
            stacked.meta["val"] = torch.stack([a.meta["val"], b.meta["val"]], rank)
        flat.meta = dict(empty.meta)
        for reader in readers:
            reader.replace_input_with(empty, flat)
        for node in (even, odd, even_slice, odd_slice, empty):
            graph.erase_node(node)
        done += 1
    return done


@contextlib.contextmanager
def _exact_rewrites() -> Iterator[list[str]]:
    """Keep onnxscript's graph optimizer (which torch.onnx runs) from dropping x + 1e-15 and the like.

    Its no-op rules (x + 0, x - 0, x * 1, x / 1) match constants within abs 1e-8 / rel 1e-5, so an
    epsilon guarding a division disappears and 0 / 0 gives NaN (SanaTransformer2DModel's linear
    attention divides by sum + 1e-15). They are left out while exporting; yields what was done.
    """
    try:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _no_op

        original, no_op = rewriter._DEFAULT_REWRITE_RULES, {id(rule) for rule in _no_op.rules.rules}
    except (ImportError, AttributeError):  # another onnxscript: its rules as they are
        yield []
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(rule for rule in original if id(rule) not in no_op)
    try:
        yield ["onnxscript's approximate no-op rewrites (x + c -> x for |c| < 1e-8) left out of the graph optimization"]
    finally:
        rewriter._DEFAULT_REWRITE_RULES = original


GUARD_POINTS = 1_000_000  # the most sizes a deferred guard is checked at


def _deferred_guards_checked(ep) -> int | str:
    """How many run-time asserts torch deferred into ep, each checked true at every size (every combination
    of its symbols' ranges); or why the export cannot be kept: an assert false at some size, or one that
    cannot be checked (a symbol without a finite range, too many sizes)."""
    import itertools
    import math

    import sympy
    import torch

    ranges = {symbol: (r.lower, r.upper) for symbol, r in ep.range_constraints.items()}
    count = 0
    for node in ep.graph.nodes:
        if node.target != torch.ops.aten._assert_scalar.default:
            continue
        expr = node.args[0].meta["val"].node.expr
        symbols = sorted(expr.free_symbols, key=str)
        spans = [ranges.get(s, (None, None)) for s in symbols]
        if not all(isinstance(lo, (int, sympy.Integer)) and isinstance(hi, (int, sympy.Integer)) for lo, hi in spans):
            return f"the guard {expr} cannot be checked: one of its sizes has no finite range"
        sizes = [range(int(lo), int(hi) + 1) for lo, hi in spans]
        if math.prod(len(r) for r in sizes) > GUARD_POINTS:
            return f"the guard {expr} cannot be checked: its ranges hold more than {GUARD_POINTS} sizes"
        for point in itertools.product(*sizes):
            if not bool(expr.xreplace({s: sympy.Integer(v) for s, v in zip(symbols, point, strict=True)})):
                return f"the guard {expr} is false at {dict(zip(map(str, symbols), point, strict=True))}"
        count += 1
    return count


def _dynamo_export(wrapper, args, dynamic_shapes, adapter: Adapter):
    """(ONNXProgram, fixes): torch.export.export, fixes, then torch.onnx.export of the ExportedProgram.

    torch.onnx.export given the module and dynamic_shapes itself takes dims with equal ranges for one dim
    (an SD3 export at 12x10 then fails at every non-square shape); given the ExportedProgram it does not.
    """
    import torch

    deferred = []
    try:
        ep = torch.export.export(wrapper, tuple(args), dynamic_shapes=(tuple(dynamic_shapes),), strict=False)
    except torch._dynamo.exc.UserError as exc:
        if "Constraints violated" not in str(exc):
            raise
        # A guard torch could not prove over the ranges (torch 2.11 cannot prove min(2w, 4w) == 2w for the
        # strides of Wan's step decoder): export with the guards as asserts, which the ONNX graph drops,
        # and keep the export only if every one holds at every size in the ranges.
        ep = torch.export.export(wrapper, tuple(args), dynamic_shapes=(tuple(dynamic_shapes),), strict=False,
                                 prefer_deferred_runtime_asserts_over_guards=True)  # fmt: skip
        checked = _deferred_guards_checked(ep)
        if isinstance(checked, str):
            raise RuntimeError(f"{_one_line(exc)}; {checked}") from None
        guard = re.search(r"generated guard (.*?)\.(\s|$)", _one_line(exc, 1000))
        deferred.append(f"{checked} guard(s) torch could not prove over the ranges, checked at every size in them"
                        + (f" (the first: {guard.group(1)})" if guard else ""))
    ep, fixes, decompositions = _fix_exported_program(ep)
    with _exact_rewrites() as done, _onnx_decompositions(decompositions):
        program = torch.onnx.export(ep, input_names=adapter.input_names, output_names=list(adapter.outputs), dynamo=True,
                                    optimize=True, verbose=False)  # fmt: skip
    return program, deferred + fixes + done


def _torchscript_export(wrapper, args, adapter: Adapter, path: Path) -> None:
    import torch

    axes = {i.name: {a: n for a, n in enumerate(i.axes) if isinstance(n, str) and _is_dynamic(adapter, n)}
            for i in adapter.inputs}  # fmt: skip
    axes[adapter.outputs[0]] = {a: n for a, n in enumerate(adapter.output_axes) if isinstance(n, str)}
    torch.onnx.export(wrapper, tuple(args), os.fspath(path), dynamo=False, input_names=adapter.input_names,
                      output_names=list(adapter.outputs), dynamic_axes=axes, opset_version=TORCHSCRIPT_OPSET)  # fmt: skip


def _is_dynamic(adapter: Adapter, name: str) -> bool:
    return adapter.rule(base_dim(name)).fixed is None


def _onnx_dim_name(adapter: Adapter, name: str) -> str:
    """The ONNX name of a dim: a follower (DiT's width) is named for the dim it follows."""
    known = {r.name: r for r in adapter.dims}
    return (known[name].same_as or name) if name in known else name


def _name_dims(model, adapter: Adapter) -> None:
    """Give the exported model's symbolic dims the adapter's names, wherever the exporter's names appear."""
    import onnx_ir as ir

    rename: dict[str, str] = {}
    for value, rule in zip(model.graph.inputs, adapter.inputs, strict=True):
        if value.shape is None:
            continue
        dims = list(value.shape)
        for axis, name in enumerate(rule.axes):
            # A dim the exporter made static stays static: the check against PyTorch then names the shape it fails at.
            if isinstance(name, str) and _is_dynamic(adapter, name) and not isinstance(dims[axis], int):
                if dims[axis].value:
                    rename[dims[axis].value] = _onnx_dim_name(adapter, name)
                dims[axis] = ir.SymbolicDim(_onnx_dim_name(adapter, name))
        value.shape = ir.Shape(dims)

    def renamed(shape):
        dims = [ir.SymbolicDim(rename[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in rename else d for d in shape]
        return ir.Shape(dims) if dims != list(shape) else None

    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if value.shape is not None and (new := renamed(value.shape)) is not None:
                value.shape = new
    inputs = {v.name: v for v in model.graph.inputs}
    for value in model.graph.outputs:
        if value.name in adapter.output_like:
            value.shape = ir.Shape(list(inputs[adapter.output_like[value.name]].shape))
    value = model.graph.outputs[0]
    if value.shape is not None and len(adapter.output_axes) == len(value.shape):
        dims = list(value.shape)
        for axis, name in enumerate(adapter.output_axes):
            if isinstance(name, str) and not isinstance(dims[axis], int):
                dims[axis] = ir.SymbolicDim(_onnx_dim_name(adapter, name))
        value.shape = ir.Shape(dims)


def export(model, adapter: Adapter, ranges: Mapping[str, DimRange], out_path: Path) -> dict:
    """Export model as adapter says to out_path, weights in out_path + '.data'; returns a record of how.

    The dynamo exporter first; the TorchScript exporter only if it raises (the record says why).
    """
    import onnx_ir as ir

    torch = require("torch", EXTRA, f"exporting {adapter.class_name}")
    out_path = Path(out_path)
    sizes = export_sizes(adapter, ranges)
    args = make_inputs(adapter, sizes, seed=0)
    wrapper = wrapped_model(model, adapter)
    where = fmt_sizes(all_sizes(adapter, sizes))
    try:
        with torch.no_grad(), quiet_libraries():
            wrapper(*args)
    except Exception as exc:  # the model's own error: the adapter does not fit it
        raise InputError(f"{adapter.class_name} does not run in PyTorch on the inputs kiln made from its config "
                         f"({where}): {_one_line(exc)}",
                         hint=supported_hint()) from None  # fmt: skip
    dims = _export_dims(adapter, ranges, sizes)
    dynamic = [{a: dims[n] for a, n in enumerate(i.axes) if isinstance(n, str) and n in dims} for i in adapter.inputs]
    record = {"class": adapter.class_name, "family": adapter.family, "exporter": "dynamo", "fallback_reason": None,
              "export_sizes": all_sizes(adapter, sizes), "workarounds": [f"{p.what}: {p.why}" for p in adapter.patches],
              "fixes": [], "torch": torch.__version__}  # fmt: skip
    started = time.perf_counter()
    program, raw = None, out_path.with_name(out_path.stem + ".torchscript.onnx")
    with torch.no_grad(), quiet_libraries(), _patched(model, adapter):
        try:
            program, record["fixes"] = _dynamo_export(wrapper, args, dynamic, adapter)
        except Exception as exc:  # any failure of torch.export or torch.onnx: try the TorchScript exporter
            record["exporter"], record["fallback_reason"] = "torchscript", f"the dynamo exporter failed: {_one_line(exc)}"
            try:
                _torchscript_export(wrapper, args, adapter, raw)
            except Exception as exc2:
                raise InputError(f"neither ONNX exporter could export {adapter.class_name} ({where}): "
                                 f"{record['fallback_reason']}; the TorchScript exporter failed: {_one_line(exc2)}",
                                 hint="report the class to kiln, with these messages") from None  # fmt: skip
    onnx_model = program.model if program is not None else ir.load(raw)
    _name_dims(onnx_model, adapter)
    onnx_model.metadata_props.update({
        "kiln.source": SOURCE_FORMAT,
        CLASS_METADATA_KEY: adapter.class_name,
        SHAPES_METADATA_KEY: shapes_spec(ranges),
        INT_RANGES_METADATA_KEY: json.dumps(adapter.int_ranges(), sort_keys=True),
        DIM_RULES_METADATA_KEY: json.dumps({r.name: {"multiple": r.multiple, "min": r.min, "max": r.max, "why": r.why}
                                            for r in adapter.dynamic_dims if r.multiple > 1 or r.min or r.max}, sort_keys=True),  # fmt: skip
        **adapter.metadata,
    })  # fmt: skip
    record["opset"] = onnx_model.opset_imports.get("")
    with quiet_libraries():
        if program is not None:
            program.save(os.fspath(out_path), external_data=True)
        else:
            ir.save(onnx_model, out_path, external_data=out_path.name + ".data")
    for leftover in (raw, raw.with_name(raw.name + ".data")):
        leftover.unlink(missing_ok=True)
    del program, onnx_model
    gc.collect()
    record["export_s"] = round(time.perf_counter() - started, 3)
    return record


# -- Parity with PyTorch ---------------------------------------------------------------------------


def _compare(got, want, result: dict) -> None:
    import numpy as np

    if got.shape != want.shape:
        result["error"] = f"output shape {list(got.shape)} from ONNX Runtime, {list(want.shape)} from PyTorch"
        return
    diff = np.nan_to_num(np.abs(got.astype(np.float64) - want.astype(np.float64)), nan=np.inf)
    finite = np.abs(want[np.isfinite(want)])
    ref = float(finite.max()) if finite.size else 0.0
    result.update(max_abs=float(diff.max()) if diff.size else 0.0, max_ref=ref, limit=PARITY_ATOL * max(1.0, ref))
    result["passed"] = result["max_abs"] <= result["limit"]
    if not result["passed"]:
        result["error"] = (f"max |onnx - torch| = {result['max_abs']:.3g} > {result['limit']:.3g} "
                           f"(1e-4 x max(1, max |torch| = {ref:.3g}))")  # fmt: skip


def _compare_outputs(names, got, want, result: dict) -> None:
    """_compare for each output: the first that fails, named if there are several, else the worst."""
    worst = None
    for name, g, w in zip(names, got, want, strict=True):
        one: dict = {}
        _compare(g, w, one)
        if not one.get("passed"):
            one["error"] = f"{name}: {one['error']}" if len(names) > 1 else one["error"]
            result.update(one)
            return
        if worst is None or one["max_abs"] / one["limit"] > worst["max_abs"] / worst["limit"]:
            worst = one
    result.update(worst)


CPU_CHECK = ("CPUExecutionProvider",)


def check_providers(target_name: str) -> tuple:
    """The ONNX Runtime providers the import is checked on: the target's GPU when PyTorch sees one too (a
    real-size video VAE's check takes minutes a step on the CPU), else the CPU. fp32 either way: TF32 off."""
    import onnxruntime as ort

    from kiln.optimizer.calibrate import calibration_providers
    from kiln.targets import get_target

    torch = require("torch", EXTRA, "checking an export against PyTorch")
    if not torch.cuda.is_available() or "CUDAExecutionProvider" not in calibration_providers(get_target(target_name)):
        return CPU_CHECK
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return CPU_CHECK
    return ("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"


def checking_session(onnx_path: Path, providers):
    """An fp32 ONNX Runtime session, graph optimizations off, on providers: on the GPU for certain when asked
    (ONNX Runtime would otherwise fall back to the CPU, printing to stdout, and say nothing else)."""
    import onnxruntime as ort

    options = session_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL, log_level=4)
    with contextlib.redirect_stdout(io.StringIO()):
        session = ort.InferenceSession(os.fspath(onnx_path), options, providers=list(providers))
    if providers != CPU_CHECK:
        if session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"ONNX Runtime could not use its CUDA provider (it has {session.get_providers()})")
        session.disable_fallback()
    return session


@contextlib.contextmanager
def checked_on(model, providers):
    """model on the device of providers (check_providers) while the checks run, TF32 off; back on the CPU after."""
    import torch

    if providers == CPU_CHECK:
        yield
        return
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        model.to("cuda")  # inside: a model half moved when memory runs out goes back too
        yield
    finally:
        model.to("cpu")
        torch.cuda.empty_cache()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def verify_against_torch(model, adapter: Adapter, onnx_path: Path, ranges: Mapping[str, DimRange],
                         seed: int = 0, providers=CPU_CHECK) -> list[dict]:  # fmt: skip
    """Run the export on ONNX Runtime (fp32, graph optimizations off, on providers: check_providers) and the
    original model in PyTorch (on the model's device) on the same seeded inputs at each shape of check_sizes
    (min, opt, max, off-corner); returns a result per shape, or raises InputError naming the first shape
    that fails and its error.

    A shape passes when the output shapes agree and max |onnx - torch| <= 1e-4 * max(1, max |torch|).
    """
    torch = require("torch", EXTRA, f"checking the export of {adapter.class_name}")
    try:
        session = checking_session(onnx_path, providers)
    except Exception as exc:
        raise InputError(f"ONNX Runtime cannot load the export of {adapter.class_name}: {_one_line(exc)}",
                         hint="report the class to kiln, with this message") from None  # fmt: skip
    wrapper = wrapped_model(model, adapter)
    device = next(model.parameters()).device
    results = []
    for i, (label, sizes) in enumerate(check_sizes(adapter, ranges)):
        tensors = make_inputs(adapter, sizes, seed + i)
        result = {"label": label, "sizes": all_sizes(adapter, sizes),
                  "shapes": {k: list(v) for k, v in input_shapes(adapter, sizes).items()},
                  "passed": False, "max_abs": None, "max_ref": None, "limit": None, "error": None}  # fmt: skip
        started = time.perf_counter()
        try:
            with torch.no_grad(), quiet_libraries():
                want = wrapper(*(t.to(device) for t in tensors))
            want = [w.float().cpu().numpy() for w in (want if isinstance(want, tuple) else (want,))]
        except Exception as exc:
            result["error"] = f"PyTorch failed: {_one_line(exc)}"
        else:
            try:
                got = session.run(list(adapter.outputs), {n: t.numpy() for n, t in zip(adapter.input_names, tensors, strict=True)})
            except Exception as exc:
                result["error"] = f"ONNX Runtime failed: {_one_line(exc)}"
            else:
                _compare_outputs(adapter.outputs, got, want, result)
        result["seconds"] = round(time.perf_counter() - started, 3)
        results.append(result)
    failed = [r for r in results if not r["passed"]]
    if failed:
        more = f" (and at {len(failed) - 1} more of {len(results)} shapes)" if len(failed) > 1 else ""
        raise InputError(
            f"the ONNX export of {adapter.class_name} does not match PyTorch at {fmt_sizes(failed[0]['sizes'])} "
            f"({failed[0]['label']}){more}: {failed[0]['error']}",
            hint="narrow the ranges with --shapes to sizes that work, or report the class to kiln",
        )
    return results


# -- The importer ----------------------------------------------------------------------------------


def _check_export(model, adapter: Adapter, path: Path, ranges, seed: int, providers, record: dict) -> list[dict]:
    """verify_against_torch and the adapter's own check (into record), on providers' device."""
    with checked_on(model, providers):
        checks = verify_against_torch(model, adapter, path, ranges, seed=seed, providers=providers)
        if adapter.check is not None:
            sizes = all_sizes(adapter, {k: r.opt for k, r in ranges.items()})
            record["decode_check"] = adapter.check(model, path, sizes, providers)
    return checks


def import_diffusers(directory: Path, workdir: Path, options) -> tuple[Path, dict, list[str]]:
    """Load, check the ranges, export, check against PyTorch: (ONNX path, source record, notes for the report).

    Reads options.shapes (a list of (source, 'NAME=MIN..OPT..MAX')), options.seed and options.trust_pickle.
    """
    from kiln.optimizer.onnx_files import hash_directory

    directory = Path(directory)
    model = load(directory, trust_pickle=bool(getattr(options, "trust_pickle", False)))
    adapter = adapter_for(model, step=getattr(options, "video_decoder", "clip") == "step")
    ranges, default_notes = resolve_ranges(adapter, list(getattr(options, "shapes", [])))
    path = Path(workdir) / "imported.onnx"
    record = export(model, adapter, ranges, path)
    started = time.perf_counter()
    providers, seed = check_providers(getattr(options, "target", "cpu")), int(getattr(options, "seed", 0))
    checks = None
    try:
        checks = _check_export(model, adapter, path, ranges, seed, providers, record)
    except Exception as exc:  # noqa: BLE001 - on the GPU: a mismatch, a device error, out of memory
        if providers == CPU_CHECK:
            raise
        record["gpu_check_failed"] = _one_line(exc)
    if checks is None:  # kiln's adapters are tested on the CPU: a check that failed on the GPU is decided there
        require("torch", EXTRA, "checking an export").cuda.empty_cache()  # what the failed attempt held
        providers = CPU_CHECK
        checks = _check_export(model, adapter, path, ranges, seed, providers, record)
    record["verify_s"] = round(time.perf_counter() - started, 3)
    record["checked_on"] = "cpu" if providers == CPU_CHECK else "cuda"
    diffusers = require("diffusers", EXTRA, "the diffusers importer")
    source = {
        "path": str(directory), "format": SOURCE_FORMAT, "hash": hash_directory(directory),
        "diffusers": diffusers.__version__, "inputs": adapter.input_names, "outputs": list(adapter.outputs),
        "ranges": {k: str(v) for k, v in ranges.items()}, "int_ranges": adapter.int_ranges(),
        "timestep_max": next((i.high for i in adapter.inputs if i.name == "timestep"), None),
        "converter": f"torch.onnx ({record['exporter']} exporter)", **record,
        "torch_parity": {"rule": PARITY_RULE, "shapes": checks},
    }  # fmt: skip
    worst = max(checks, key=lambda c: c["max_abs"] / c["limit"])
    notes = [*adapter.notes, *default_notes,
             f"exported {adapter.class_name} with the {record['exporter']} exporter at "
             f"{fmt_sizes(record['export_sizes'])} in {record['export_s']:.1f} s"]  # fmt: skip
    if record["fallback_reason"]:
        notes.append(f"the TorchScript exporter was used: {record['fallback_reason']}")
    if record.get("gpu_check_failed"):
        notes.append(f"the checks failed on the GPU and were run again on the CPU: {record['gpu_check_failed']}")
    notes += [f"export workaround: {w}" for w in record["workarounds"]]
    notes += [f"export fix: {f}" for f in record["fixes"]]
    notes.append(f"the ONNX export matches PyTorch at {len(checks)} shapes ({', '.join(c['label'] for c in checks)}); "
                 f"worst max |diff| {worst['max_abs']:.2g} at {fmt_sizes(worst['sizes'])}"
                 + (" (checked on the GPU: PyTorch and ONNX Runtime's CUDA provider, fp32, TF32 off)"
                    if record["checked_on"] == "cuda" else ""))  # fmt: skip
    for check in record.get("decode_check", ()):
        notes.append(f"decoded chunk after chunk, {check['frames']} latent frames {check['shape']} match diffusers' own "
                     f"decode: max |diff| {check['max_abs']:.2g}")  # fmt: skip
    del model
    gc.collect()
    return path, source, notes
