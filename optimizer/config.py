"""Options for one `kiln optimize` run, from a recipe.toml and the command line (which wins)."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from kiln.optimizer.errors import InputError
from kiln.optimizer.profile_synthesis import AUTO_RULE

PRECISIONS = ("fp32", "fp16", "bf16")
IO_DTYPES = ("float32", "float16")
LAYOUTS = ("nhwc", "nchw")
VIDEO_DECODERS = ("clip", "step")
MAX_IMPORT_OPSET = 18  # the newest opset tf2onnx 1.16/1.17 emits
# The choices of kiln.passes.quantize and kiln.calibration.stats, here so that `kiln --help` need not
# import them (tests check they agree).
FORMATS = ("int8", "fp8")
BACKENDS = ("kiln", "ort", "modelopt")
BACKEND_FORMATS = {"kiln": ("int8", "fp8"), "ort": ("int8",), "modelopt": ("int8", "fp8")}
CALIB_METHODS = ("max", "percentile", "entropy")

# Tolerances for comparing an engine with the fp32 original: |got - want| <= atol + rtol * |want|.
# fp16 keeps 11 significant bits (about 3 decimal digits), bf16 8 (about 2), and errors grow through a
# network's depth.
TOLERANCES = {
    "fp32": {"atol": 1e-4, "rtol": 1e-3},
    "fp16": {"atol": 2e-2, "rtol": 2e-2},
    "bf16": {"atol": 6e-2, "rtol": 6e-2},
}
# Quantized engines are checked by the relative L2 error of each output against the fp32 original
# (||got - want|| / ||want||): 8-bit values differ from float everywhere by up to half a step, so an
# elementwise bound says little. The bound catches a broken engine (whose error is near 1); how good a
# working one is, is for the report's quality section and --quality to say. Measured: one DiT forward
# 0.005-0.01 INT8 and 0.01-0.04 FP8; the small FILM 0.08 INT8 on random data outside its [0, 1] images.
QUANT_TOLERANCES = {"int8": {"rel_l2": 0.15}, "fp8": {"rel_l2": 0.15}}
DEFAULT_CALIB_SAMPLES = 16
MAX_PROFILES = 8  # each is a session of its own (and its weights) where it is static


@dataclasses.dataclass
class Options:
    target: str = "cpu"
    precision: str = "fp32"
    precision_chosen: bool = False  # set by --precision or a recipe: no per-model default replaces it
    force_precision: bool = False  # build the precision even where kiln refuses it for the model (precision_policy)
    io_dtype: str = "float32"  # float16: the engine takes and returns fp16 (no boundary casts)
    shapes: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (source, spec)
    profile_from: str | None = None  # request shapes (a JSON file) or a preset the profile is made from
    profiles: int | str = "auto"  # how many profiles --profile-from makes: a number, or "auto" (profile_synthesis.AUTO_RULE)
    # Value ranges of integer inputs for test data, as (source, 'NAME=LO..HI'); default [1, 8).
    int_ranges: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # .npz files of sample inputs the engine is also verified on.
    verify_inputs: list[str] = dataclasses.field(default_factory=list)
    disable_passes: list[str] = dataclasses.field(default_factory=list)
    verify: bool = True
    verify_each: bool = False
    seed: int = 0
    atol: float | None = None
    rtol: float | None = None
    bench_runs: int = 10
    bench_warmup: int = 2
    # Importers (TensorFlow SavedModel).
    signature: str = "serving_default"
    outputs: list[str] | None = None  # None: 'image' if the model has it, else all
    opset: int = 17
    layout: str = "nhwc"
    align: int | None = None  # None: 64 for FILM signatures, else no padding
    import_timeout: float = 1800.0
    trust_pickle: bool = False  # diffusers: load pickle checkpoints (they can run code)
    video_decoder: str = "clip"  # diffusers video VAEs: the whole clip in one graph, or a step function (step_decoders)
    # Quantization (None: none).
    quantize: str | None = None  # int8 | fp8
    quant_backend: str | None = None  # None: kiln's own Q/DQ, ONNX Runtime's for INT8 on the CPU
    calib: str | None = None  # a folder of .npz samples or one .npz; None: samples kiln makes
    calib_samples: int | None = None  # None: all of --calib, or DEFAULT_CALIB_SAMPLES made
    calib_method: str | None = None  # None: entropy for INT8, max for FP8
    calib_percentile: float = 99.99
    smoothquant: float | None = None  # alpha
    keep: list[str] = dataclasses.field(default_factory=list)  # regexes of layers to keep in float
    rel_l2: float | None = None  # a quantized engine's verification bound (default QUANT_TOLERANCES)
    quality: str | None = None  # a budget ("psnr>=35") the fallback keeps layers in float to meet
    # TensorRT targets (None: TensorRT's defaults, level 3 and no limit).
    trt_opt_level: int | None = None  # the builder optimization level, 0..5
    trt_time_limit: float | None = None  # seconds a native TensorRT build may take
    cache: bool = True  # look the engine up in the engine cache, and store it there (engine_cache.py)

    def tolerance(self) -> dict[str, float]:
        if self.quantize:
            return {"rel_l2": QUANT_TOLERANCES[self.quantize]["rel_l2"] if self.rel_l2 is None else self.rel_l2}
        default = TOLERANCES[self.precision]
        return {
            "atol": default["atol"] if self.atol is None else self.atol,
            "rtol": default["rtol"] if self.rtol is None else self.rtol,
        }

    def backend(self, target_family: str) -> str:
        """The Q/DQ backend: the one asked for, else ONNX Runtime's quantizer for INT8 on the CPU, else kiln's."""
        if self.quant_backend:
            return self.quant_backend
        return "ort" if self.quantize == "int8" and target_family == "cpu" else "kiln"


# Recipe layout: section -> key -> (Options field, accepted types). "" is the top level.
_RECIPE = {
    "": {"target": ("target", str), "precision": ("precision", str), "io_dtype": ("io_dtype", str), "profile_from": ("profile_from", str),
         "profiles": ("profiles", (int, str))},
    "passes": {"disable": ("disable_passes", list)},
    "verify": {
        "enabled": ("verify", bool),
        "each": ("verify_each", bool),
        "seed": ("seed", int),
        "atol": ("atol", (int, float)),
        "rtol": ("rtol", (int, float)),
        "rel_l2": ("rel_l2", (int, float)),
        "inputs": ("verify_inputs", list),
    },
    "quantize": {
        "format": ("quantize", str),
        "backend": ("quant_backend", str),
        "calib": ("calib", str),
        "samples": ("calib_samples", int),
        "method": ("calib_method", str),
        "percentile": ("calib_percentile", (int, float)),
        "smoothquant": ("smoothquant", (int, float)),
        "keep": ("keep", list),
        "quality": ("quality", str),
    },
    "bench": {"runs": ("bench_runs", int), "warmup": ("bench_warmup", int)},
    "tensorrt": {"opt_level": ("trt_opt_level", int), "time_limit": ("trt_time_limit", (int, float))},
    "import": {
        "signature": ("signature", str),
        "outputs": ("outputs", list),
        "opset": ("opset", int),
        "layout": ("layout", str),
        "align": ("align", int),
        "timeout": ("import_timeout", (int, float)),
        "trust_pickle": ("trust_pickle", bool),
        "video_decoder": ("video_decoder", str),
    },
}


def read_recipe(path: Path) -> dict:
    """A recipe file's TOML, or an InputError saying why it cannot be read."""
    if not path.is_file():
        raise InputError(f"recipe {path}: no such file", hint="check the --config path")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"recipe {path} is not valid TOML: {exc}") from None


def load_recipe(path: Path, options: Options) -> None:
    """Apply a recipe file to options; unknown keys and wrong types are errors naming the key."""
    data = read_recipe(path)
    known = sorted(k for k in (*_RECIPE[""], *[s for s in _RECIPE if s], "shapes", "int_ranges", "compare"))
    for key, value in data.items():
        if key == "shapes":
            if not isinstance(value, dict):
                raise InputError(f"recipe {path}: [shapes] must be a table of NAME = \"MIN..MAX\"")
            for name, spec in value.items():
                if not isinstance(spec, (str, int)) or isinstance(spec, bool):
                    raise InputError(f"recipe {path}: shapes.{name} must be a string like \"1..8\" or a size")
                options.shapes.append((f"recipe {path.name}", f"{name}={spec}"))
        elif key == "int_ranges":
            if not isinstance(value, dict):
                raise InputError(f"recipe {path}: [int_ranges] must be a table of NAME = \"LO..HI\"")
            for name, spec in value.items():
                if not isinstance(spec, str):
                    raise InputError(f"recipe {path}: int_ranges.{name} must be a string like \"0..999\"")
                options.int_ranges.append((f"recipe {path.name}", f"{name}={spec}"))
        elif key in _RECIPE and key:
            if not isinstance(value, dict):
                raise InputError(f"recipe {path}: {key} must be a table ([{key}])")
            for sub, sub_value in value.items():
                _set(options, path, f"{key}.{sub}", _RECIPE[key].get(sub), sub_value, sorted(_RECIPE[key]))
        elif key in _RECIPE[""]:
            _set(options, path, key, _RECIPE[""][key], value, known)
        elif key == "compare":
            continue  # the grid of `kiln compare`, which reads it itself
        else:
            raise InputError(f"recipe {path}: unknown key {key!r}", hint=f"known keys: {', '.join(known)}")
    # A recipe's sample files are named relative to the recipe.
    options.verify_inputs = [str(path.parent / p) for p in options.verify_inputs]
    if "calib" in data.get("quantize", {}):
        options.calib = str(path.parent / options.calib)
    if "profile_from" in data and (path.parent / options.profile_from).is_file():  # a file, not a preset
        options.profile_from = str(path.parent / options.profile_from)
    options.precision_chosen |= "precision" in data
    validate(options)


def _set(options: Options, path: Path, key: str, entry, value, known: list[str]) -> None:
    if entry is None:
        raise InputError(f"recipe {path}: unknown key {key!r}", hint=f"known keys here: {', '.join(known)}")
    field, types = entry
    if isinstance(value, bool) and types is not bool or not isinstance(value, types):
        raise InputError(f"recipe {path}: {key} has the wrong type ({type(value).__name__})")
    if types is list and not all(isinstance(v, str) for v in value):
        raise InputError(f"recipe {path}: {key} must be a list of names")
    setattr(options, field, value)


def check_seed(seed: int, name: str) -> None:
    """numpy's generators take seeds of 32 bits."""
    if not 0 <= seed < 2**32:
        raise InputError(f"{name} {seed} is out of range", hint="give a seed from 0 to 2**32 - 1")


def validate(options: Options) -> None:
    if options.precision not in PRECISIONS:
        raise InputError(f"unknown precision {options.precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")
    if options.io_dtype not in IO_DTYPES:
        raise InputError(f"unknown io_dtype {options.io_dtype!r}", hint=f"choose one of {', '.join(IO_DTYPES)}")
    if options.io_dtype == "float16" and options.precision != "fp16":
        raise InputError(f"io_dtype float16 needs precision fp16, not {options.precision}", hint="add --precision fp16")
    if options.bench_runs < 0 or options.bench_warmup < 0:
        raise InputError(f"--bench-runs ({options.bench_runs}) and a recipe's [bench] warmup ({options.bench_warmup}) must be 0 or more")
    check_seed(options.seed, "seed")
    if options.layout not in LAYOUTS:
        raise InputError(f"unknown layout {options.layout!r}", hint=f"choose one of {', '.join(LAYOUTS)}")
    if options.video_decoder not in VIDEO_DECODERS:
        raise InputError(f"unknown video decoder form {options.video_decoder!r}", hint=f"choose one of {', '.join(VIDEO_DECODERS)}")
    if not 16 <= options.opset <= MAX_IMPORT_OPSET:
        raise InputError(f"--opset {options.opset} (the opset of imported models) is unsupported", hint=f"choose 16..{MAX_IMPORT_OPSET} (GridSample needs 16)")
    if options.align is not None and options.align < 1:
        raise InputError(f"--align {options.align}: must be 1 (no padding) or more")
    if options.import_timeout <= 0:
        raise InputError("the import timeout must be positive")
    if options.trt_opt_level is not None and not 0 <= options.trt_opt_level <= 5:
        raise InputError(f"--trt-opt-level {options.trt_opt_level}: TensorRT's builder optimization levels are 0 to 5", hint="3 is TensorRT's default; 5 searches longest")
    if options.trt_time_limit is not None and options.trt_time_limit <= 0:
        raise InputError(f"--trt-time-limit {options.trt_time_limit:g}: must be a positive number of seconds")
    if options.profiles != "auto" and (type(options.profiles) is not int or not 1 <= options.profiles <= MAX_PROFILES):
        raise InputError(f"--profiles {options.profiles}: give a number of profiles from 1 to {MAX_PROFILES}, or auto",
                         hint=f"auto: {AUTO_RULE}")  # fmt: skip
    if options.profiles not in ("auto", 1) and not options.profile_from:
        raise InputError(f"--profiles {options.profiles} needs --profile-from: the profiles are made from request shapes",
                         hint="add --profile-from FILE or a preset (phone, video-720p, video-1080p)")  # fmt: skip
    _validate_quantization(options)


def _validate_quantization(options: Options) -> None:
    quant_only = [name for name, value in (("--quant-backend", options.quant_backend), ("--calib", options.calib),
                  ("--calib-samples", options.calib_samples), ("--calib-method", options.calib_method),
                  ("--smoothquant", options.smoothquant), ("--keep", options.keep or None), ("--quality", options.quality))
                  if value is not None]  # fmt: skip
    if not options.quantize:
        if quant_only:
            raise InputError(f"{', '.join(quant_only)}: only with --quantize", hint="add --quantize int8 or --quantize fp8")
        return
    if options.quantize not in FORMATS:
        raise InputError(f"unknown quantization format {options.quantize!r}", hint=f"choose one of {', '.join(FORMATS)}")
    backend = options.quant_backend
    if backend is not None and backend not in BACKENDS:
        raise InputError(f"unknown quantization backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    if backend is not None and options.quantize not in BACKEND_FORMATS[backend]:
        others = [b for b in BACKENDS if options.quantize in BACKEND_FORMATS[b]]
        raise InputError(f"the {backend} backend does not quantize to {options.quantize}", hint=f"use --quant-backend {' or '.join(others)}")
    if options.calib_method is not None and options.calib_method not in CALIB_METHODS:
        raise InputError(f"unknown calibration method {options.calib_method!r}", hint=f"choose one of {', '.join(CALIB_METHODS)}")
    if not 0 < options.calib_percentile <= 100:
        raise InputError(f"the calibration percentile {options.calib_percentile} must be in (0, 100]", hint="99.99 clips the top 0.01%")
    if options.calib_samples is not None and options.calib_samples < 1:
        raise InputError(f"--calib-samples {options.calib_samples}: must be 1 or more")
    if options.smoothquant is not None:
        if options.quantize != "int8":
            raise InputError("--smoothquant applies to INT8 only", hint="FP8's exponent already spans activation outliers")
        if not 0 <= options.smoothquant <= 1:
            raise InputError(f"--smoothquant {options.smoothquant}: alpha must be in [0, 1]", hint="0.5 is the paper's default")
    if options.rel_l2 is not None and not options.rel_l2 > 0:
        raise InputError(f"the verification bound rel_l2 {options.rel_l2} must be positive")
    if options.quality is not None:
        from kiln.passes.fallback import parse_budget  # here: importing kiln.passes is slow for `kiln --help`

        try:
            parse_budget(options.quality)
        except ValueError as exc:
            raise InputError(f"--quality: {exc}", hint="e.g. --quality 'psnr>=35' (decibels) or --quality 'rel_l2<=0.02'") from None
    for pattern in options.keep:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InputError(f"--keep {pattern!r} is not a regular expression: {exc}", hint="e.g. --keep 'attn1\\.to_out'") from None
