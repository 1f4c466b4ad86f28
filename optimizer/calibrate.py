"""What `kiln optimize --quantize` needs before the passes: the format checked against the target, the
quantization settings, and the calibration set (read from --calib, or made)."""

from __future__ import annotations

from pathlib import Path

from kiln import passes, targets
from kiln.calibration import CalibrationSet, DataError, Sample, check_calibration, read_calibration
from kiln.optimizer.config import DEFAULT_CALIB_SAMPLES, Options
from kiln.optimizer.errors import InputError
from kiln.optimizer.lazy import require
from kiln.targets.gpu import FP8_CAPABILITY, compute_capability

# Seeds of made calibration samples start here, away from verification's (options.seed + check index).
CALIB_SEED_OFFSET = 10_000


def check_format(options: Options, target: targets.Target) -> None:
    """Refuse, before any work, a format the target cannot run, or a backend that is not installed."""
    fmt = options.quantize
    if not fmt:
        return
    if options.backend(target.family) == "modelopt":
        # Imported here, under kiln's signal guard: ModelOpt pulls in torch.
        require("modelopt.onnx.quantization", "quant", "--quant-backend modelopt")
    if fmt not in target.quantize:
        runs = f"it runs {', '.join(target.quantize)}" if target.quantize else "it runs no quantized engines"
        raise InputError(
            f"target {target.name!r} cannot run {fmt.upper()} engines: {runs}",
            hint="FP8 needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell): --target cuda or h100",
        )
    if fmt == "fp8" and getattr(target, "device", "cpu") == "cuda":
        capability = compute_capability()
        if capability is not None and capability < FP8_CAPABILITY:
            raise InputError(
                f"this GPU has compute capability {capability[0]}.{capability[1]}, and FP8 needs "
                f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell)",
                hint="use --quantize int8 on this GPU",
            )


def quant_config(options: Options, target: targets.Target) -> passes.QuantConfig:
    providers = tuple(p for p in getattr(target, "providers", ("CPUExecutionProvider",)) if p in ("CUDAExecutionProvider", "CPUExecutionProvider"))
    return passes.QuantConfig(
        format=options.quantize, backend=options.backend(target.family), method=options.calib_method,
        percentile=options.calib_percentile, smoothquant=options.smoothquant, keep=tuple(options.keep),
        providers=providers or ("CPUExecutionProvider",),
    )  # fmt: skip


def calibration_set(options: Options, profile: targets.Profile) -> tuple[CalibrationSet, list[str]]:
    """The calibration samples, checked against the model's inputs, and notes for the report."""
    notes = []
    if options.calib:
        try:
            data = read_calibration(Path(options.calib), profile.inputs, options.calib_samples)
            check_calibration(data, profile.inputs, profile.dims)
        except DataError as exc:
            raise InputError(f"--calib {exc}", hint="a calibration sample is an .npz file with one array per model input, by name "
                             "(numpy.savez(path, NAME=array, ...)); a folder holds one sample per file") from None  # fmt: skip
        return data, notes
    count = options.calib_samples or DEFAULT_CALIB_SAMPLES
    sizes = profile.sizes("opt") if profile.dims else {}
    shapes = profile.shapes(sizes)
    samples = [Sample(f"random {i}", profile.random_inputs(shapes, options.seed + CALIB_SEED_OFFSET + i)) for i in range(count)]
    notes.append(f"calibrated on {count} random samples (uniform in [-1, 1)) at the opt shape: activation ranges of "
                 "real inputs differ; give recorded inputs with --calib")  # fmt: skip
    return CalibrationSet(samples, f"{count} random samples at the opt shape, seed {options.seed + CALIB_SEED_OFFSET}"), notes
