"""Tensor specs and dynamic-shape profiles: the shapes an engine is built, verified and benchmarked for."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Mapping

import numpy as np

CORNERS = ("min", "opt", "max")
# Integer inputs are drawn from [1, 8) unless a range is given: small enough to index any axis of a few
# elements, and never 0, since an integer input is often a step, a length or a divisor. ONNX Runtime
# refuses most zeros (Range's delta, Slice's step, STFT's frame_step), but STFT with frame_length 0
# kills the process with SIGFPE (onnxruntime 1.32).
DEFAULT_INT_RANGE = (1, 8)


# Up to this many dynamic dims, verification checks all 2^k combinations of their extremes.
EXHAUSTIVE_DIMS = 4


def _extreme_combinations(k: int) -> list[tuple[str, ...]]:
    """Assignments of min or max to k dims: all 2^k up to EXHAUSTIVE_DIMS; above, a covering array of
    strength 2. Its columns are distinct sets of ceil(n/2) of rows 1..n-1 (row 0 is all min): two such
    sets each hold a row the other lacks, and share one, so every pair of dims sees every pair of extremes."""
    if k <= EXHAUSTIVE_DIMS:
        return list(itertools.product(("min", "max"), repeat=k))
    n = 2
    while math.comb(n - 1, math.ceil(n / 2)) < k:
        n += 1
    columns = list(itertools.islice(itertools.combinations(range(1, n), math.ceil(n / 2)), k))
    return [tuple("max" if row in column else "min" for column in columns) for row in range(n)]


# A dim derived from another, as an input's axis may be named: [A*]NAME[/K][+B or -B], A*size/K + B (GLM-Image's
# prior tokens, one per 2x2 patch: height/2; Wan-Animate's pose video, a frame shorter: frames-1).
_DERIVED = re.compile(r"(?:(\d+)\*)?([A-Za-z_]\w*)(?:/(\d+))?(?:([+-]\d+))?")


def derived_dim(dim: str) -> tuple[str, int, int, int] | None:
    """(base, A, K, B) of a derived dim's name; None for a dim of its own."""
    match = _DERIVED.fullmatch(dim)
    if not match or match.group(2) == dim:
        return None
    scale, base, divisor, offset = match.groups()
    scale, divisor, offset = int(scale or 1), int(divisor or 1), int(offset or 0)
    return (base, scale, divisor, offset) if scale and divisor else None  # 0*h and h/0 are names, not sizes


def base_dim(dim: str) -> str:
    """The dim a profile gives a range for: the dim itself, or the one a derived dim is made from."""
    derived = derived_dim(dim)
    return derived[0] if derived else dim


def dim_size(dim: str, sizes: Mapping[str, int]) -> int:
    """The size of a dim, derived or not, given its base dim's size."""
    derived = derived_dim(dim)
    if derived is None:
        return sizes[dim]
    base, scale, divisor, offset = derived
    return scale * sizes[base] // divisor + offset


def derived_mismatch(inputs: tuple[TensorSpec, ...], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why an axis derived from a dim (height/2) does not follow that dim's size in shapes, or None."""
    sizes = {d: size for spec in inputs for d, size in zip(spec.shape, shapes[spec.name]) if isinstance(d, str) and base_dim(d) == d}
    for spec in inputs:
        for axis, (dim, got) in enumerate(zip(spec.shape, shapes[spec.name])):
            if isinstance(dim, str) and base_dim(dim) != dim and base_dim(dim) in sizes and dim_size(dim, sizes) != got:
                base = base_dim(dim)
                return (f"input {spec.name!r} axis {axis} ({dim}) is {got}, but {base} is {sizes[base]}, "
                        f"so it must be {dim_size(dim, sizes)}")  # fmt: skip
    return None


def profile_label(index: int, profile: Profile, corner: str) -> str:
    """How reports name a corner of one of an engine's several profiles: "profile 2: opt", or "profile 3"
    for a static one."""
    return f"profile {index + 1}" if profile.is_static() else f"profile {index + 1}: {corner}"


@dataclasses.dataclass(frozen=True)
class DimRange:
    """The range one dynamic dimension may take, with the size to tune for."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self.min}..{self.opt}..{self.max}")

    def __str__(self) -> str:
        return f"{self.min}..{self.opt}..{self.max}"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, numpy dtype name, and shape with dynamic dims named."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @property
    def dynamic_dims(self) -> tuple[str, ...]:
        """The profile's dims this spec's shape uses (a derived dim's base)."""
        return tuple(dict.fromkeys(base_dim(d) for d in self.shape if isinstance(d, str)))

    def concrete(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(dim_size(d, sizes) if isinstance(d, str) else d for d in self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclasses.dataclass(frozen=True)
class Profile:
    """Inputs plus a range for every dynamic dim they use, and the value range of integer inputs
    (class labels, timesteps) for making test data."""

    inputs: tuple[TensorSpec, ...]
    dims: Mapping[str, DimRange]
    int_ranges: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        used = {d for spec in self.inputs for d in spec.dynamic_dims}
        if used != set(self.dims):
            raise ValueError(f"profile dims {sorted(self.dims)} do not match the inputs' dims {sorted(used)}")

    def is_static(self) -> bool:
        """Whether every dim has one size (so the engine can be built for exactly that shape)."""
        return all(r.min == r.max for r in self.dims.values())

    def sizes(self, corner: str) -> dict[str, int]:
        return {name: getattr(r, corner) for name, r in self.dims.items()}

    def shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {spec.name: spec.concrete(sizes) for spec in self.inputs}

    def shapes_text(self, corner: str) -> str:
        """'input:1x4x32x32,other:8': every input's shape at one corner (TensorRT's profile shape syntax)."""
        return ",".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in self.shapes(self.sizes(corner)).items())

    def volume(self) -> int:
        """The product of the dims' maxima: how much a request padded to this profile's max computes."""
        return math.prod(r.max for r in self.dims.values())

    def corners(self) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
        """(label, input shapes) at min, opt and max; one 'static' entry when nothing is dynamic."""
        if not self.dims:
            return [("static", self.shapes({}))]
        seen, result = set(), []
        for corner in CORNERS:
            shapes = self.shapes(self.sizes(corner))
            key = tuple(sorted(shapes.items()))
            if key not in seen:
                seen.add(key)
                result.append((corner, shapes))
        return result

    def check_points(self) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
        """(label, input shapes) for verification: opt and every combination of each dim at its min or
        max, as exporters go wrong where one dim is at its max and another at its min. Above
        EXHAUSTIVE_DIMS dims, a covering set instead, in which every pair of dims meets at all four
        pairs of extremes."""
        if not self.dims:
            return [("static", self.shapes({}))]
        names = sorted(self.dims)
        points = [[corner] * len(names) for corner in ("min", "opt", "max")]
        points += [list(p) for p in _extreme_combinations(len(names)) if len(set(p)) > 1]
        seen, result = set(), []
        for point in points:
            sizes = {name: getattr(self.dims[name], corner) for name, corner in zip(names, point)}
            shapes = self.shapes(sizes)
            key = tuple(sorted(shapes.items()))
            if key not in seen:
                seen.add(key)
                label = point[0] if len(set(point)) == 1 else ", ".join(f"{n} {c}" for n, c in zip(names, point) if self.dims[n].min != self.dims[n].max)
                result.append((label, shapes))
        return result

    def contains(self, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        """None if the shapes fit the profile, else the reason they do not."""
        for spec in self.inputs:
            shape = shapes[spec.name]
            for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
                if isinstance(want, str) and want in self.dims:  # a derived dim follows its base's range
                    r = self.dims[want]
                    if not r.min <= got <= r.max:
                        return f"{spec.name} axis {axis} ({want}) is {got}, outside the profile {r.min}..{r.max}"
        return None

    def random_inputs(self, shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
        """Seeded inputs: floats uniform in [-1, 1), integers in their int_ranges entry (default
        DEFAULT_INT_RANGE)."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for spec in self.inputs:
            shape, dtype = shapes[spec.name], np.dtype(spec.dtype)
            if dtype.kind == "f":
                feeds[spec.name] = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
            elif dtype.kind in "iu":
                lo, hi = self.int_ranges.get(spec.name, DEFAULT_INT_RANGE)
                feeds[spec.name] = rng.integers(lo, hi, size=shape).astype(dtype)
            elif dtype.kind == "b":
                feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                raise ValueError(f"cannot make random data for input {spec.name!r} of dtype {dtype}")
        return feeds

    def to_json(self) -> dict:
        return {
            "inputs": [spec.to_json() for spec in self.inputs],
            "dims": {name: dataclasses.asdict(r) for name, r in sorted(self.dims.items())},
            "int_ranges": {name: list(r) for name, r in sorted(self.int_ranges.items())},
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Profile:
        return cls(
            tuple(TensorSpec.from_json(s) for s in data["inputs"]),
            {name: DimRange(**r) for name, r in data["dims"].items()},
            {name: tuple(r) for name, r in data.get("int_ranges", {}).items()},
        )
