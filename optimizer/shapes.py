"""The model's inputs and outputs, and the dynamic-shape profile from --shapes, recipes and metadata."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import onnx_ir as ir

from kiln.optimizer.errors import InputError
from kiln.passes.base import dim_name
from kiln.targets import DimRange, Profile, TensorSpec
from kiln.targets.profile import base_dim

# Models may carry their own ranges, as "batch=1..2..8,seq=1..128" (set by kiln's importers and examples).
SHAPES_METADATA_KEY = "kiln.shapes"
# {dim: {"multiple", "min", "max", "why"}}: sizes the model takes (its patch size, its positional table), from kiln's diffusers importer
DIM_RULES_METADATA_KEY = "kiln.dim_rules"
# And the value ranges of integer inputs, as JSON: {"class_labels": [0, 1000]}.
INT_RANGES_METADATA_KEY = "kiln.int_ranges"
DEFAULT_MIN, DEFAULT_MAX = 1, 8
_SPEC = re.compile(r"^\s*([^=\s]+)\s*=\s*(\d+)(?:\.\.(\d+))?(?:\.\.(\d+))?\s*$")
_INT_RANGE = re.compile(r"^\s*([^=\s]+)\s*=\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")


# The element types an engine's inputs and outputs may have: what numpy and ONNX Runtime's Python API
# both hold, so kiln can make test data, run the engine and compare (no strings, bfloat16, float8, int4).
BOUNDARY_DTYPES = frozenset({
    "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
})  # fmt: skip
_KINDS = {ir.SequenceType: "a sequence", ir.OptionalType: "an optional", ir.SparseTensorType: "a sparse tensor"}


def check_io(model: ir.Model) -> None:
    """Refuse graph inputs and outputs kiln cannot feed or compare: non-tensors and other element types."""
    hint = "make the model take and return plain tensors of these types; sequences, optionals and other types can stay inside it"
    initializers = model.graph.initializers
    values = [("input", v) for v in model.graph.inputs if v.name not in initializers] + [("output", v) for v in model.graph.outputs]
    if not model.graph.outputs:
        raise InputError("the model has no outputs", hint="re-export it with the graph's outputs declared")
    for where, value in values:
        kind = _KINDS.get(type(value.type))
        if kind:
            raise InputError(f"{where} {value.name!r} is {kind}, not a tensor; kiln's engines take and return tensors", hint=hint)
        if value.dtype is None:
            continue  # an untyped output; an untyped input is refused by input_specs
        try:
            numpy_name = np.dtype(value.dtype.numpy()).name if value.dtype != ir.DataType.STRING else "str"
        except TypeError:  # UNDEFINED, or a type numpy has no form of
            numpy_name = value.dtype.name.lower()
        if numpy_name not in BOUNDARY_DTYPES:
            raise InputError(
                f"{where} {value.name!r} is {value.dtype.name.lower()}; kiln's engines take and return "
                f"{', '.join(sorted(BOUNDARY_DTYPES))}",
                hint=hint + " (Cast at the boundary)",
            )


def _spec(value: ir.Value, graph_name: str) -> TensorSpec:
    if value.shape is None or value.dtype is None:
        raise InputError(
            f"{graph_name} {value.name!r} has no {'shape' if value.dtype else 'type'} in the model",
            hint="re-export the model with typed, ranked inputs and outputs",
        )
    dims = tuple(dim if isinstance(dim, int) else dim_name(value, axis) for axis, dim in enumerate(value.shape))
    if any(isinstance(dim, int) and dim < 0 for dim in dims):
        raise InputError(f"{graph_name} {value.name!r} has shape {list(dims)}; a size cannot be negative",
                         hint="re-export the model; a dim of unknown size is a name, not a negative number")  # fmt: skip
    return TensorSpec(value.name, np.dtype(value.dtype.numpy()).name, dims)


def int_ranges(model: ir.Model) -> dict[str, tuple[int, int]]:
    text = model.metadata_props.get(INT_RANGES_METADATA_KEY)
    return {name: (int(lo), int(hi)) for name, (lo, hi) in json.loads(text).items()} if text else {}


def input_specs(model: ir.Model) -> tuple[TensorSpec, ...]:
    return tuple(_spec(v, "input") for v in model.graph.inputs if v.name not in model.graph.initializers)


def output_specs(model: ir.Model) -> tuple[TensorSpec, ...]:
    specs = []
    for value in model.graph.outputs:
        # Outputs may be untyped before shape inference; report what is known.
        if value.dtype is None or value.shape is None:
            specs.append(TensorSpec(value.name, "unknown", ()))
        else:
            specs.append(_spec(value, "output"))
    return tuple(specs)


def parse_shape_spec(text: str, source: str = "--shapes") -> tuple[str, DimRange]:
    """'NAME=MIN..MAX', 'NAME=MIN..OPT..MAX' or 'NAME=SIZE' -> (NAME, range); opt defaults to the middle."""
    match = _SPEC.match(text)
    if not match:
        raise InputError(
            f"{source} {text!r} is not NAME=MIN..MAX",
            hint="write e.g. batch=1..8, batch=1..4..8 (min..opt..max) or x:1=16..128 (input x, axis 1)",
        )
    name, *numbers = match.groups()
    values = [int(n) for n in numbers if n is not None]
    if len(values) == 1:
        lo = opt = hi = values[0]
    elif len(values) == 2:
        lo, hi = values
        opt = (lo + hi) // 2
    else:
        lo, opt, hi = values
    if lo > hi:
        raise InputError(f"{source} {text!r}: min {lo} is greater than max {hi}", hint="write MIN..MAX with MIN <= MAX")
    if lo < 1:
        raise InputError(f"{source} {text!r}: sizes must be at least 1")
    if not lo <= opt <= hi:
        raise InputError(f"{source} {text!r}: opt {opt} is outside {lo}..{hi}")
    return name, DimRange(lo, opt, hi)


def parse_int_range(text: str, source: str = "--int-range") -> tuple[str, tuple[int, int]]:
    """'NAME=LO..HI' (both included) -> (NAME, (LO, HI + 1)), the half-open range random data is drawn from."""
    match = _INT_RANGE.match(text)
    if not match:
        raise InputError(f"{source} {text!r} is not NAME=LO..HI", hint="write e.g. frame_length=16..64 (both ends included)")
    name, lo, hi = match.group(1), int(match.group(2)), int(match.group(3))
    if lo > hi:
        raise InputError(f"{source} {text!r}: {lo} is greater than {hi}", hint="write LO..HI with LO <= HI")
    return name, (lo, hi + 1)


def _int_ranges(inputs: tuple[TensorSpec, ...], specs: list[tuple[str, str]]) -> dict[str, tuple[int, int]]:
    ints = [spec.name for spec in inputs if np.dtype(spec.dtype).kind in "iu"]
    ranges = {}
    for source, text in specs:
        name, values = parse_int_range(text, source)
        if name not in ints:
            what = "is not an integer input" if any(spec.name == name for spec in inputs) else "is not an input"
            raise InputError(f"{source} {text!r}: {name!r} {what} of the model",
                             hint=f"integer inputs: {', '.join(ints)}" if ints else "the model has no integer inputs")  # fmt: skip
        ranges[name] = values
    return ranges


def _describe_dims(inputs: tuple[TensorSpec, ...]) -> str:
    where: dict[str, list[str]] = {}
    for spec in inputs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str):
                derived = f" as {dim}" if base_dim(dim) != dim else ""
                where.setdefault(base_dim(dim), []).append(f"{spec.name}:{axis}{derived}")
    if not where:
        return "the model has no dynamic dims"
    return "dynamic dims: " + ", ".join(f"{d} ({', '.join(w)})" for d, w in where.items())


def _resolve_name(name: str, inputs: tuple[TensorSpec, ...], dims: list[str], source: str, text: str) -> str:
    if name in dims:
        return name
    by_name = {spec.name: spec for spec in inputs}
    input_name, _, axis = name.rpartition(":")
    if input_name in by_name and re.fullmatch(r"-?[0-9]+", axis):
        spec = by_name[input_name]
        axis_i = int(axis)
        if not -len(spec.shape) <= axis_i < len(spec.shape):
            raise InputError(
                f"{source} {text!r}: input {input_name!r} has rank {len(spec.shape)}, no axis {axis_i}",
                hint=_describe_dims(inputs),
            )
        dim = spec.shape[axis_i]
        if isinstance(dim, int):
            raise InputError(
                f"{source} {text!r}: axis {axis_i} of input {input_name!r} is static ({dim}) and takes no range",
                hint=_describe_dims(inputs),
            )
        if base_dim(dim) != dim:
            raise InputError(f"{source} {text!r}: axis {axis_i} of input {input_name!r} is {dim}, which follows "
                             f"{base_dim(dim)!r}", hint=f"give {base_dim(dim)} a range instead")  # fmt: skip
        return dim
    if name in by_name:
        raise InputError(f"{source} {text!r} names input {name!r} but no axis", hint=f"write {name}:AXIS=MIN..MAX")
    raise InputError(
        f"{source} {text!r}: the model has no input or dynamic dim called {name!r}",
        hint=_describe_dims(inputs),
    )


def build_profile(
    inputs: tuple[TensorSpec, ...],
    specs: list[tuple[str, str]],
    metadata_spec: str | None = None,
    int_ranges: dict[str, tuple[int, int]] | None = None,
    int_specs: list[tuple[str, str]] | None = None,
) -> tuple[Profile, list[str]]:
    """The profile for inputs from (source, spec) pairs, later ones winning; also notes on defaults used.

    Ranges come from the model's metadata first, then the recipe and the command line; so do the value
    ranges of integer inputs (int_ranges from metadata, then int_specs: (source, 'NAME=LO..HI') pairs).
    """
    dims = list(dict.fromkeys(d for spec in inputs for d in spec.dynamic_dims))
    all_specs = [("model metadata", s) for s in (metadata_spec or "").split(",") if s.strip()] + specs
    ranges: dict[str, DimRange] = {}
    for source, text in all_specs:
        name, dim_range = parse_shape_spec(text, source)
        ranges[_resolve_name(name, inputs, dims, source, text)] = dim_range
    notes = []
    for dim in dims:
        if dim not in ranges:
            ranges[dim] = DimRange(DEFAULT_MIN, (DEFAULT_MIN + DEFAULT_MAX) // 2, DEFAULT_MAX)
            notes.append(
                f"dynamic dim {dim!r} has no range; using {ranges[dim]} (set it with --shapes {dim}=MIN..MAX)"
            )
    profile = Profile(inputs, ranges, {**(int_ranges or {}), **_int_ranges(inputs, int_specs or [])})
    _check_fits_in_memory(profile)
    return profile, notes


def machine_memory() -> int | None:
    """This machine's memory in bytes, where the system says."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return None


def _check_fits_in_memory(profile: Profile) -> None:
    """Refuse a profile whose largest inputs could not even be held: verification and the benchmark
    make them (a typo such as seq=1..99999999999 would otherwise end in a MemoryError)."""
    memory = machine_memory()
    shapes = profile.shapes(profile.sizes("max"))
    needed = sum(int(np.prod(shapes[s.name], dtype=np.float64)) * np.dtype(s.dtype).itemsize for s in profile.inputs)
    # Half: the reference run and the engine each hold their own inputs and outputs besides.
    if memory and needed > memory / 2:
        largest = max(profile.inputs, key=lambda s: np.prod(shapes[s.name], dtype=np.float64))
        raise InputError(
            f"at the profile's max the inputs take {needed / 2**30:,.0f} GiB ({largest.name!r} is {list(shapes[largest.name])}); "
            f"more than half of this machine's {memory / 2**30:,.0f} GiB",
            hint="lower the max of the dims with --shapes NAME=MIN..MAX",
        )
