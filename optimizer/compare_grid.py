"""The grid of `kiln compare`: the `kiln optimize` options it varies, each point's options, and the
refusals, all before any build.

A point's options come from the same parser and the same assembly as `kiln optimize`'s, so a point
is exactly the engine `kiln optimize` would build with its flags.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import math
from collections.abc import Callable
from pathlib import Path

from kiln.optimizer.errors import InputError

MAX_POINTS = 24  # a larger grid needs --yes: each point is a build, minutes on a large model
GRID_OPTIONS = ("precision", "io-dtype", "quantize", "quant-backend", "calib-samples", "calib-method", "smoothquant",
                "keep", "quality", "disable-pass")  # fmt: skip
# Settings that only mean something with --quantize: a point without it drops them.
QUANT_ONLY = ("quant-backend", "calib-samples", "calib-method", "smoothquant", "keep", "quality")
QUANT_FLAGS = (*QUANT_ONLY, "calib")  # what kiln optimize refuses without --quantize
NONE = "none"  # the value that leaves an option out
OR = "|"  # what --or puts between grids in the list of --grid entries

# How a setting reads in a short label ("{}": its value alone).
_SHORT = {"calib-samples": "{} samples", "smoothquant": "SQ {}", "keep": "keep {}", "quant-backend": "{} Q/DQ",
          "io-dtype": "{} IO", "disable-pass": "no {}"}  # fmt: skip

_SAME_INPUTS = "every point is verified and measured on the same inputs"
_SHARED = {
    "target": "a sweep builds for one target; give --target",
    "shapes": _SAME_INPUTS, "int-range": _SAME_INPUTS, "verify-inputs": _SAME_INPUTS, "seed": _SAME_INPUTS,
    "calib": "every point's quality is measured on the same samples held out of --calib",
    "bench-runs": "every point is measured the same way", "verify-each": "every point is measured the same way",
    "no-verify": "every point is measured the same way",
    **{k: "the model is imported once for every point" for k in
       ("signature", "outputs", "opset", "layout", "align", "import-timeout", "trust-pickle", "video-decoder")},
}  # fmt: skip


@dataclasses.dataclass
class GridPoint:
    settings: dict[str, str]  # option -> value, as given (only those that apply)
    options: object | None  # config.Options; None when skipped
    skipped: str | None = None  # why the point is not built

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items()) or "defaults"

    @property
    def short_label(self) -> str:
        """The settings in a few words, for plots: "fp16 int8 32 samples"."""
        words = [_SHORT.get(k, "{}").format(v) for k, v in self.settings.items() if v != NONE]
        return " ".join(words) or "defaults"

    @property
    def flags(self) -> list[str]:
        """The `kiln optimize` flags that build this point, beyond the shared ones."""
        return [part for k, v in self.settings.items() if v != NONE for part in (f"--{k}", v)]

    def command_flags(self, shared: list[str]) -> list[str]:
        """shared (flags and their values), less the quantization ones if this point does not quantize,
        then this point's flags."""
        if self.options is not None and not self.options.quantize:
            drop = {f"--{k}" for k in QUANT_FLAGS}
            kept, skip = [], False
            for part in shared:
                if skip:
                    skip = False
                elif part in drop:
                    skip = True
                else:
                    kept.append(part)
            shared = kept
        return [*shared, *self.flags]


@dataclasses.dataclass
class Sweep:
    model: Path
    points: list[GridPoint]
    base: object  # config.Options shared by every point (the grid's options left at their defaults)
    base_flags: list[str]  # the shared options as given on the command line


def read_grid(args: argparse.Namespace) -> Sweep:
    """The sweep `kiln compare` args ask for."""
    from kiln.optimizer.cli import build_parser, engine_flags, options_from_args  # the cli imports this module
    from kiln.optimizer.optimize import choose_target

    parse = build_parser().parse_args
    groups = _recipe_grids(args.config) if args.config else []
    if args.grid:  # the command line's grids replace the recipe's
        groups = [{}]
        for entry in args.grid:
            if entry == OR:
                groups.append({})
                continue
            key, values = _split(entry, "--grid")
            groups[-1][key] = values
    if not groups or not all(groups):
        raise InputError("the grid is empty: give it with --grid OPTION=V1,V2 (--or between grids) or in a recipe's [compare.grid]",
                         hint="e.g. kiln compare MODEL -o OUT --grid quantize=none,int8 --grid calib-samples=32,128")  # fmt: skip
    parsed = [{key: [(value, _parse_value(key, value, parse, options_from_args)) for value in values] for key, values in group.items()}
              for group in groups]  # fmt: skip
    total = sum(math.prod(len(values) for values in group.values()) for group in parsed)
    if total > MAX_POINTS and not args.yes:
        raise InputError(f"--grid gives {total} points, more than {MAX_POINTS}; each is a build",
                         hint="pass --yes to run them all, or give fewer values")  # fmt: skip

    # The shared options, less the quantization settings when they are not shared by every point (the
    # points without --quantize drop them); --calib stays: it holds the samples quality is measured on.
    base = options_from_args(args if args.quantize else _without_quantization(args))
    base.calib = base.calib or args.calib
    if not base.verify or not base.bench_runs:
        raise InputError(f"kiln compare measures every point's quality and latency; {'--no-verify' if not base.verify else '--bench-runs 0'} "
                         "would leave nothing to compare", hint="leave it out")  # fmt: skip
    choose_target(base)  # the shared target must exist and run here (exit 2 before any work)
    points, seen = [], set()
    combinations = [c for group in parsed for c in itertools.product(*[[(key, *pair) for pair in pairs] for key, pairs in group.items()])]
    for combination in combinations:
        settings = {key: text for key, text, _ in combination}
        quantized = any(key == "quantize" and value is not None for key, _, value in combination) or (
            "quantize" not in settings and base.quantize)
        if not quantized:  # a calibration setting means nothing without quantization
            combination = tuple(c for c in combination if c[0] not in QUANT_ONLY)
            settings = {key: text for key, text, _ in combination}
        if tuple(settings.items()) in seen:
            continue
        seen.add(tuple(settings.items()))
        points.append(_point(args if quantized else _without_quantization(args), settings, combination, options_from_args, choose_target))
    return Sweep(args.model, points, base, engine_flags(args))


def _without_quantization(args: argparse.Namespace) -> argparse.Namespace:
    """args without the settings kiln optimize takes only with --quantize."""
    namespace = copy.deepcopy(args)
    for key in QUANT_FLAGS:
        dest = key.replace("-", "_")
        setattr(namespace, dest, [] if isinstance(getattr(namespace, dest), list) else None)
    return namespace


def _point(args, settings, combination, options_from_args, choose_target) -> GridPoint:
    namespace = copy.deepcopy(args)
    for key, _, value in combination:
        dest = key.replace("-", "_")
        if isinstance(getattr(namespace, dest), list):  # --keep, --disable-pass: one more
            value = getattr(namespace, dest) + ([] if value is None else [value])
        setattr(namespace, dest, value)
    try:
        options = options_from_args(namespace)
        target = choose_target(options)
    except InputError as exc:  # the point makes no sense here: FP8 on the cpu target, SmoothQuant on FP8
        return GridPoint(settings, None, exc.message)
    from kiln.optimizer.build import select_passes

    select_passes(options, target)  # an unknown pass name is a typo, not a combination: exit 2 before any build
    return GridPoint(settings, options)


def _split(entry: str, where: str) -> tuple[str, list[str]]:
    key, sep, text = entry.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key:
        raise InputError(f"{where} {entry!r}: expected OPTION=V1,V2", hint="e.g. --grid quantize=none,int8,fp8")
    _check_key(key, where)
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise InputError(f"{where} {key}= gives no values", hint=f"e.g. --grid {key}=V1,V2 ('none' leaves the option out)")
    return key, values


def _check_key(key: str, where: str) -> None:
    if key in GRID_OPTIONS:
        return
    hint = f"grid options: {', '.join(GRID_OPTIONS)}"
    if key in _SHARED:
        raise InputError(f"{where}: --{key} cannot vary across points: {_SHARED[key]}",
                         hint=f"give --{key} once, outside the grid; {hint}")  # fmt: skip
    raise InputError(f"{where}: {key!r} is not an option kiln compare can vary", hint=hint)


def _parse_value(key: str, value: str, parse: Callable, options_from_args: Callable):
    """The value as `kiln optimize --KEY VALUE` parses it (None for 'none'), or an InputError naming it.
    A quantization setting is also checked on its own, with INT8 (--calib-samples 0, a bad --keep
    pattern): a value no point could take is a typo, not a combination to skip."""
    if value == NONE:
        return None
    try:
        parsed = parse(["optimize", "MODEL", "-o", "OUTDIR", f"--{key}", value, *(["--quantize", "int8"] if key in QUANT_ONLY else [])])
        if key in QUANT_ONLY:
            options_from_args(parsed)
    except InputError as exc:
        raise InputError(f"--grid {key}={value}: {exc.message.removeprefix('kiln optimize: ')}", hint=exc.hint) from None
    found = getattr(parsed, key.replace("-", "_"))
    return found[-1] if isinstance(found, list) else found


def _recipe_grids(path: Path) -> list[dict[str, list[str]]]:
    """The grids of a recipe: [compare.grid], a table of OPTION = [values], or [[compare.grid]], several."""
    from kiln.optimizer.config import read_recipe

    data = read_recipe(Path(path))
    section = data.get("compare", {})
    tables = section.get("grid", []) if isinstance(section, dict) else None
    tables = [tables] if isinstance(tables, dict) else tables
    if not isinstance(tables, list) or set(section) - {"grid"} or not all(isinstance(t, dict) for t in tables):
        raise InputError(f"recipe {path}: [compare] holds [compare.grid], a table of OPTION = [values] (or [[compare.grid]] tables, one per grid)",
                         hint='e.g. [compare.grid]\nquantize = ["none", "int8"]')  # fmt: skip
    grids = []
    for table in tables:
        grid = {}
        for key, values in table.items():
            _check_key(key, f"recipe {path} [compare.grid]")
            values = values if isinstance(values, list) else [values]
            if not values or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
                raise InputError(f"recipe {path}: compare.grid.{key} must be a list of values, like [\"none\", \"int8\"]")
            grid[key] = [str(v) for v in values]
        grids.append(grid)
    return grids
