"""What `kiln optimize --quantize` needs around the passes: the format checked against the target, the
quantization settings, the calibration set, and the quality fallback's evaluation.

The calibration set is, in order of preference:
- --calib: recorded inputs (.npz files), or for FILM a folder of frames or a video, read as pairs;
- for diffusers models, the inputs of a real sampling loop: the fp32 model run through a diffusers
  scheduler from seeded noise, every step recorded (activation ranges change with the timestep);
- random inputs at the profile's opt shape, with a note that real ones would be better.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kiln import passes, targets
from kiln.calibration import CalibrationSet, DataError, Sample, check_calibration, quality, read_calibration
from kiln.optimizer.config import DEFAULT_CALIB_SAMPLES, Options
from kiln.optimizer.errors import InputError
from kiln.optimizer.lazy import require
from kiln.optimizer.sampling import (
    STEPS,
    is_diffusion,
    quality_loops,
    sample_loop,
    scheduler_name,
    starting_inputs,
    timestep_dtype,
    timestep_max,
)
from kiln.passes.fallback import METRICS, Fallback, parse_budget, search
from kiln.targets.engine import session_options
from kiln.targets.gpu import compute_capability
from kiln.targets.hardware import FAST_FROM

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
        # A per-GPU target's own GPU (a build deferred on another machine too), else the one here.
        capability = target.gpu.compute_capability if target.gpu is not None else compute_capability()
        if capability is not None and capability < FAST_FROM["fp8"]:
            raise InputError(
                f"this GPU has compute capability {capability[0]}.{capability[1]}, and FP8 needs "
                f"{FAST_FROM['fp8'][0]}.{FAST_FROM['fp8'][1]} or newer (Ada, Hopper, Blackwell)",
                hint="use --quantize int8 on this GPU",
            )


def calibration_providers(target: targets.Target) -> tuple[str, ...]:
    """The ONNX Runtime providers calibration runs on: the target's GPU if it has one, and it is here."""
    import onnxruntime as ort

    here = ort.get_available_providers()  # a deferred build (no GPU here) calibrates on the CPU
    providers = tuple(p for p in getattr(target, "providers", ()) if p in ("CUDAExecutionProvider", "CPUExecutionProvider") and p in here)
    if "CUDAExecutionProvider" in providers:
        from kiln.targets.engine import preload_cuda

        preload_cuda()
    return providers or ("CPUExecutionProvider",)


def quant_config(options: Options, target: targets.Target) -> passes.QuantConfig:
    providers = calibration_providers(target)
    return passes.QuantConfig(
        format=options.quantize, backend=options.backend(target.family), method=options.calib_method,
        percentile=options.calib_percentile, smoothquant=options.smoothquant, keep=tuple(options.keep),
        providers=providers,
    )  # fmt: skip


def calibration_set(options: Options, profile: targets.Profile, model_path: Path, source: dict,
                    alignment: targets.Alignment | None = None, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                    split_for: int | None = None) -> tuple[CalibrationSet, list[str]]:  # fmt: skip
    """The calibration samples, checked against the model's inputs, and notes for the report. A recorded
    set is split as for split_for samples (default: this run's count; `kiln compare` gives its largest,
    so that every point holds out the same samples). providers run a diffusers model's sampling loops."""
    count = options.calib_samples or DEFAULT_CALIB_SAMPLES
    names = {spec.name for spec in profile.inputs}
    if options.calib:
        path = Path(options.calib)
        split = split_for or options.calib_samples
        wanted = (split or count) + max(1, (split or count) // 4)  # the samples to calibrate on, and a fifth of that many to hold out
        try:
            if FILM_INPUTS <= names and _holds_frames(path):
                data = film_pairs(path, profile, alignment, wanted)
            else:
                data = read_calibration(path, profile.inputs, wanted if split else None)
            check_calibration(data, profile.inputs, profile.dims)
            data = hold_out(data, options.calib_samples)
            check_calibration(data, profile.inputs, profile.dims)  # an input constant across what is left has no range
        except DataError as exc:
            raise InputError(f"--calib {exc}", hint="a calibration sample is an .npz file with one array per model input, by name "
                             "(numpy.savez(path, NAME=array, ...)); a folder holds one sample per file; FILM also takes a "
                             "folder of frames or a video") from None  # fmt: skip
        if not data.held_out and not is_diffusion(profile, source):
            return data, [f"quality is measured on random inputs: --calib holds fewer than {HOLD_OUT_FROM} samples, none to hold out"]
        return data, []
    if is_diffusion(profile, source):
        data = diffusion_trajectory(model_path, profile, options.seed + CALIB_SEED_OFFSET, count, providers,
                                    timestep_max(source))
        return data, [f"calibrated along a sampling loop ({data.source}); give recorded inputs with --calib"]
    sizes = profile.sizes("opt") if profile.dims else {}
    shapes = profile.shapes(sizes)
    samples = [Sample(f"random {i}", profile.random_inputs(shapes, options.seed + CALIB_SEED_OFFSET + i)) for i in range(count)]
    notes = [f"calibrated on {count} random samples (uniform in [-1, 1)) at the opt shape: activation ranges of "
             "real inputs differ; give recorded inputs with --calib"]  # fmt: skip
    return CalibrationSet(samples, f"{count} random samples at the opt shape, seed {options.seed + CALIB_SEED_OFFSET}"), notes


# Of a recorded set of this many samples or more, the last fifth (at least one) is held out of
# calibration: the quality check and the --quality search measure on real inputs the ranges were not
# taken from, rather than on random ones alone.
HOLD_OUT_FROM = 4


def hold_out(data: CalibrationSet, count: int | None) -> CalibrationSet:
    """data with its last fifth held out (sets of HOLD_OUT_FROM or more), calibrating on at most count."""
    n = len(data.samples)
    held = max(1, n // 5) if n >= HOLD_OUT_FROM else 0
    return CalibrationSet(data.samples[: n - held][:count], data.source, held_out=data.samples[n - held :])


# FILM: frame pairs.
FILM_INPUTS = {"x0", "x1", "time"}


def _holds_frames(path: Path) -> bool:
    from kiln.optimizer.serve.frames import IMAGE_SUFFIXES
    from kiln.optimizer.serve.video import is_video

    if path.is_dir():
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
    return is_video(path)


def film_pairs(path: Path, profile: targets.Profile, alignment: targets.Alignment | None, count: int) -> CalibrationSet:
    """Pairs of consecutive frames (up to count) of a folder or a video, as FILM's x0 and x1 in [0, 1],
    padded to the model's alignment as its engine pads them, and a time."""
    from kiln.optimizer.serve.jobs import source_frames

    frames, _, _ = source_frames(path)
    samples, previous = [], None
    for k, frame in frames:
        if previous is not None:
            if frame.shape != previous.shape:
                raise DataError(f"{path}: frame {k} is {frame.shape[1]}x{frame.shape[0]}, frame {k - 1} "
                                f"{previous.shape[1]}x{previous.shape[0]}; a clip's frames share one size")  # fmt: skip
            # Times of 1/4, 1/2 and 3/4 in turn: FILM takes any time in (0, 1), and a time constant
            # across the set would have no range to calibrate.
            time = (1 + len(samples) % 3) / 4
            feeds = {"x0": (previous[None] / 255.0).astype(np.float32), "x1": (frame[None] / 255.0).astype(np.float32),
                     "time": np.full((1, 1), time, np.float32)}  # fmt: skip
            if alignment is not None:
                feeds, _ = alignment.pad(feeds)
            samples.append(Sample(f"frames {k - 1} and {k} at time {time:g}", feeds))
            if len(samples) == count:
                break
        previous = frame
    if not samples:
        raise DataError(f"{path} holds fewer than two frames: FILM calibrates on pairs")
    return CalibrationSet(samples, f"{len(samples)} frame pairs of {path}")


def diffusion_trajectory(model_path: Path, profile: targets.Profile, seed: int, count: int,
                         providers: tuple[str, ...] = ("CPUExecutionProvider",),
                         top: float = 1000.0) -> CalibrationSet:  # fmt: skip
    """count samples: the inputs of STEPS-step loops of the fp32 model on ONNX Runtime (the calibration
    providers: a GPU target's loops run on its GPU), one loop per seed, conditioning (class labels, text
    embeddings) drawn once per loop."""
    from kiln.optimizer.verify import reference_session, run_session

    if providers == ("CPUExecutionProvider",):
        session = reference_session(model_path)
    else:
        import onnxruntime as ort

        options = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        session = ort.InferenceSession(str(model_path), options, providers=list(providers))
    output = session.get_outputs()[0].name
    dtype = timestep_dtype(profile)
    samples: list[Sample] = []
    loops = starting_inputs(profile, seed, math.ceil(count / STEPS))
    for i, feeds in enumerate(loops):
        sample_loop(lambda f: run_session(session, f)[output], feeds, dtype, STEPS, samples, f"seed {seed + i}, ", top)
    return CalibrationSet(samples[:count], f"{len(loops)} loop(s) of {STEPS} {scheduler_name(dtype)} steps "
                                           f"from seed {seed}, {min(count, len(samples))} samples")  # fmt: skip


# The quality fallback (--quality).
def _metric(rows: list[dict[str, dict]], metric: str) -> float:
    """One figure over cases (rows of compare_outputs): per output the mean over the cases that have it
    (PSNR and SSIM need two spatial dims of 2 or more), then the worst output."""
    names = rows[0].keys()
    means = [float(np.mean(values)) for name in names if (values := [row[name][metric] for row in rows if metric in row[name]])]
    if not means:
        raise InputError(f"--quality {metric}: the model's outputs are not images", hint="use rel_l2<=E or max_abs<=E")
    return min(means) if METRICS[metric] else max(means)


def quality_fallback(model, quantize: passes.Quantize, options: Options, profile: targets.Profile, source: dict,
                     seed: int, progress) -> Fallback:  # fmt: skip
    """Find the layers to keep in float for the --quality budget, evaluating each candidate Q/DQ model
    (in fp32, on the calibration providers) against the float model on inputs held out from calibration:
    the final latents of sampling loops for diffusers models, else the samples held out of --calib, else
    the outputs at the profile's corners."""
    import tempfile

    import onnx_ir as ir

    from kiln.optimizer.bench import median_ms
    import onnxruntime as ort

    from kiln.optimizer.verify import corner_inputs, run_session

    budget = parse_budget(options.quality)
    providers = list(quantize.config.providers)
    diffusion = is_diffusion(profile, source)

    with tempfile.TemporaryDirectory(prefix="kiln-fallback-") as tmp:
        def session_of(m) -> object:
            path = Path(tmp) / "candidate.onnx"
            ir.save(m, path, external_data="candidate.onnx.data", size_threshold_bytes=1024)
            options = session_options(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
            return ort.InferenceSession(str(path), options, providers=providers)

        def outputs_of(session) -> list[dict[str, np.ndarray]]:
            if diffusion:
                output = session.get_outputs()[0].name
                dtype = timestep_dtype(profile)
                top = timestep_max(source)
                return [{"latents": sample_loop(lambda f: run_session(session, f)[output], feeds, dtype, timestep_max=top)}
                        for feeds in held_out]  # fmt: skip
            return [run_session(session, feeds) for feeds in held_out]

        # The inputs the final quality check uses: its sampling loops, the held-out samples, or the corners.
        if diffusion:
            held_out = quality_loops(profile, seed)
        elif quantize.data.held_out:
            held_out = [sample.feeds for sample in quantize.data.held_out]
        else:
            held_out = [feeds for _, _, feeds in corner_inputs(profile, options.seed)]
        want = outputs_of(session_of(model))

        probe = passes.Quantize(quantize.config, quantize.data, quantize.cache)
        probe(model.clone())
        candidates = [row["node"] for row in probe.details["layers"] if not row["kept"]]

        def evaluate(only: set[str]) -> tuple[float, float]:
            candidate = model.clone()
            passes.Quantize(quantize.config, quantize.data, quantize.cache, only=only)(candidate)
            session = session_of(candidate)
            got = outputs_of(session)
            value = _metric([quality.compare_outputs(g, w) for g, w in zip(got, want)], budget.metric)
            latency = median_ms(lambda: run_session(session, held_out[0]), 5, 1)
            progress.line(f"fallback: {len(candidates) - len(only)} of {len(candidates)} layers kept in float: {budget.metric} {value:.4g}")
            return value, latency

        result = search(candidates, evaluate, budget)
        result.evaluated_on = ("final latents of sampling loops" if diffusion else
                               f"{len(held_out)} calibration samples held out" if quantize.data.held_out else "the profile's corners (random inputs)")  # fmt: skip
        return result
