"""The profile lint: what is wrong with an engine's profiles, found before anything is built.

Each finding names the dim and says what to do. An error stops `kiln optimize` with exit 2; a warning
goes into the report. The checks:
- alignment: sizes the model pads to (FILM's 64) or takes only in multiples of (a DiT's patch size);
- reach: sizes past a model's positional table (pos_embed_max_size, a temporal embedding's frames);
- memory: the weights and the activations at a profile's max against the target's memory;
- overlap: two profiles that hold the same shapes (a request there runs on the smaller);
- gaps: request shapes no profile holds (an error), and sizes between profiles that none holds.
(min <= opt <= max is checked where a range is read, by `--shapes` and the recipe, with the same exit.)
"""

from __future__ import annotations

import dataclasses
import json

import onnx_ir as ir

from kiln import targets
from kiln.optimizer.errors import InputError
from kiln.optimizer.shapes import DIM_RULES_METADATA_KEY, machine_memory
from kiln.targets import Profile
from kiln.targets.work import peak_activation_bytes

MEMORY_WARNING = 0.8  # of the target's memory: above this a warning, above all of it an error


@dataclasses.dataclass(frozen=True)
class Finding:
    level: str  # "error" or "warning"
    check: str  # alignment, reach, memory, overlap, gap
    dim: str | None
    message: str  # what is wrong
    hint: str  # what to do

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _label(profiles: tuple[Profile, ...], index: int) -> str:
    return f"profile {index + 1}" if len(profiles) > 1 else "the profile"


def lint_profiles(model: ir.Model, profiles: tuple[Profile, ...], multiples: dict[str, int], requests: list[dict[str, int]] = ()) -> list[Finding]:
    """Findings on profiles (the engine's one, or each of several) for the model: its dims' alignment
    (multiples: dim -> the multiple the engine pads to) and its own rules, and the request shapes."""
    findings = []
    rules = json.loads(model.metadata_props.get(DIM_RULES_METADATA_KEY) or "{}")
    for index, profile in enumerate(profiles):
        where = _label(profiles, index)
        for dim, r in sorted(profile.dims.items()):
            rule = rules.get(dim, {})
            why = f" ({rule['why']})" if rule.get("why") else ""
            for multiple, what in ((multiples.get(dim), "the engine pads it to"), (rule.get("multiple"), "the model takes")):
                bad = [v for v in (r.min, r.max) if multiple and v % multiple]
                if bad:
                    lo, hi = -(-r.min // multiple) * multiple, -(-r.max // multiple) * multiple
                    findings.append(Finding("error", "alignment", dim, f"{where}: {dim} {r} holds {bad[0]}, not a multiple of {multiple}, which {what}{why}",
                                            f"give multiples of {multiple}, e.g. --shapes {dim}={lo}..{hi}"))  # fmt: skip
            if rule.get("max") is not None and r.max > rule["max"]:
                findings.append(Finding("error", "reach", dim, f"{where}: {dim} reaches {r.max}, past the {rule['max']} the model takes{why}",
                                        f"keep {dim} at most {rule['max']} (--shapes {dim}={min(r.min, rule['max'])}..{rule['max']})"))  # fmt: skip
            if rule.get("min") is not None and r.min < rule["min"]:
                findings.append(Finding("error", "reach", dim, f"{where}: {dim} starts at {r.min}, below the {rule['min']} the model takes{why}",
                                        f"keep {dim} at least {rule['min']}"))  # fmt: skip
    return findings + _overlaps(profiles) + _gaps(profiles, requests, multiples)


def _overlaps(profiles: tuple[Profile, ...]) -> list[Finding]:
    findings = []
    for i, a in enumerate(profiles):
        for j in range(i + 1, len(profiles)):
            b = profiles[j]
            common = {d: (max(a.dims[d].min, b.dims[d].min), min(a.dims[d].max, b.dims[d].max)) for d in a.dims}
            if common and all(lo <= hi for lo, hi in common.values()):
                smaller = i if a.volume() <= b.volume() else j
                span = ", ".join(f"{d} {lo}..{hi}" if lo < hi else f"{d} {lo}" for d, (lo, hi) in sorted(common.items()))
                findings.append(Finding("warning", "overlap", None, f"profiles {i + 1} and {j + 1} overlap at {span}: a request there runs on profile {smaller + 1}",
                                        "nothing to do if that is meant; else give fewer profiles (--profiles)"))  # fmt: skip
    return findings


def _gaps(profiles: tuple[Profile, ...], requests: list[dict[str, int]], multiples: dict[str, int]) -> list[Finding]:
    """Requests no profile holds (errors), and per dim, sizes between the profiles' ranges (warnings;
    with an alignment, the sizes requests pad to)."""
    findings = []
    for request in requests:
        if any(all(_holds(p, d, size) for d, size in request.items()) for p in profiles):
            continue
        shape = ", ".join(f"{d} {size}" for d, size in request.items())
        dim = next((d for d, size in request.items() if not any(_holds(p, d, size) for p in profiles)), None)
        findings.append(Finding("error", "gap", dim, f"the request {shape} is in no profile",
                                f"widen {dim or 'the dims'} with --shapes, or leave --shapes out so that the requests make the profiles"))  # fmt: skip
    if len(profiles) > 1:
        static = all(p.is_static() for p in profiles)
        then = "is refused (every profile is static)" if static else "runs unverified on the largest dynamic profile"
        for dim in sorted(profiles[0].dims):
            ranges, holes = sorted((p.dims[dim].min, p.dims[dim].max) for p in profiles), []
            reach = ranges[0][1]
            step = multiples.get(dim, 1)  # a size between profiles that pads into one is no hole
            for lo, hi in ranges[1:]:
                first, last = -(-(reach + 1) // step) * step, (lo - 1) // step * step
                if first <= last:
                    holes.append(f"{first}..{last}" if last > first else str(first))
                reach = max(reach, hi)
            if holes:
                findings.append(Finding("warning", "gap", dim, f"{dim} {', '.join(holes)} {'is' if len(holes) == 1 else 'are'} in no profile: a request there {then}",
                                        "add those sizes to the requests if they come"))  # fmt: skip
    return findings


def _holds(profile: Profile, dim: str, size: int) -> bool:
    r = profile.dims.get(dim)
    return r is None or r.min <= size <= r.max


def lint_memory(model: ir.Model, profiles: tuple[Profile, ...], target: targets.Target, precision: str = "fp32",
                quantize: str | None = None) -> list[Finding]:  # fmt: skip
    """The weights and the activations at each profile's max (peak_activation_bytes) against the memory
    the target runs in. model is the imported one, in fp32: its floats are scaled to precision (fp16 and
    bf16 halve them; 8-bit quantization takes a byte a weight). Each static profile of several holds
    its own weights (a session of its own), and the dynamic ones one copy between them."""
    memory, where = _target_memory(target)
    if memory is None:
        return []
    scale = 0.5 if precision in ("fp16", "bf16") else 1.0
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    weights *= 0.25 if quantize else scale
    sessions = sum(p.is_static() for p in profiles) + any(not p.is_static() for p in profiles) if len(profiles) > 1 else 1
    findings = []
    for index, profile in enumerate(profiles):
        try:
            activations = scale * peak_activation_bytes(model, profile.shapes(profile.sizes("max")))
        except Exception:  # onnxscript's folding or shape inference on an op it cannot take: no estimate
            continue
        need = sessions * weights + activations
        if need > MEMORY_WARNING * memory:
            largest = max(profile.dims, key=lambda d: profile.dims[d].max, default=None)
            copies = f"{sessions} sessions' " if sessions > 1 else ""
            findings.append(Finding("error" if need > memory else "warning", "memory", largest,
                                    f"{_label(profiles, index)} at its max needs about {need / 1e9:.1f} GB ({sessions * weights / 1e9:.1f} GB of {copies}weights, "
                                    f"{activations / 1e9:.1f} GB of activations), {need / memory:.0%} of {where}'s {memory / 1e9:.0f} GB",
                                    f"lower the max of {largest} with --shapes, or build for a target with more memory" if largest else "build for a target with more memory"))  # fmt: skip
    return findings


def _target_memory(target: targets.Target) -> tuple[int | None, str]:
    if target.gpu is not None:
        return int(target.gpu.memory_gb * 1e9), f"the {target.gpu.label}"
    if target.name == "cpu":
        return machine_memory(), "this machine"
    return None, ""  # the generic cuda target: whatever GPU it lands on


def check(findings: list[Finding]) -> list[str]:
    """Raise InputError for the first error (saying how many there are); the warnings as report notes."""
    errors = [f for f in findings if f.level == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more finding{'s' if len(errors) > 2 else ''} of the profile lint)" if len(errors) > 1 else ""
        raise InputError(f"{errors[0].message}{more}", hint=errors[0].hint)
    return [f"profile lint: {f.message}; {f.hint}" for f in findings]
