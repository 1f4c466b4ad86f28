"""An ONNX model to a loaded engine: the passes for the target and precision, then the target's build.

`kiln optimize` builds through `build_engine`, and so do the benchmarks, so an engine a benchmark
measures is the engine `kiln optimize` would write.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import onnx_ir as ir

from kiln import passes, targets
from kiln.calibration import CalibrationSet
from kiln.calibration.cache import StatsCache
from kiln.passes.fallback import Fallback
from kiln.targets.work import count_flops
from kiln.optimizer.calibrate import quality_fallback, quant_config
from kiln.optimizer.config import TOLERANCES, Options
from kiln.optimizer.errors import InputError, KilnError
from kiln.optimizer.onnx_files import MODEL_FILE, save_model, weights_bytes
from kiln.optimizer.outdir import ENGINE_DIR
from kiln.optimizer.progress import Progress
from kiln.optimizer.quality import QUALITY_SEED_OFFSET
from kiln.optimizer.verify import StepVerifier


def select_passes(
    options: Options, target: targets.Target | None = None, static_sizes: dict[str, int] | None = None,
    calibration: CalibrationSet | None = None,
) -> list[passes.KilnPass]:
    """The passes for these options and target, in order, minus the disabled ones. static_sizes (the
    profile's dims when each has one size) freezes the input shapes first. With --quantize, calibration
    is the set the quantize pass calibrates on."""
    # Fusions match the graph as the exporter wrote it; cleanup then tidies what they leave.
    chosen = [passes.WarpToGridSample(), *passes.cleanup_passes()]
    if static_sizes is not None:
        chosen.insert(0, passes.FreezeShapes(static_sizes))
    if target is not None and "ort-fusions" in target.capabilities:
        chosen.append(passes.FuseForOnnxRuntime(pack_qkv=not options.quantize))
    else:
        chosen.append(passes.FuseStandardOnnx())
    lower = False
    if options.quantize and calibration is not None:
        config = quant_config(options, target or targets.CPU)
        chosen.append(passes.Quantize(config, calibration, StatsCache()))
        lower = config.format == "fp8" and config.backend == "kiln" and target is not None and "fp8-gemm" in target.capabilities
    if options.precision != "fp32":
        chosen.append(passes.ConvertPrecision(options.precision, io_float32=options.io_dtype == "float32"))
    if lower:
        chosen.append(passes.LowerFp8Gemm())
    # Any pass kiln has may be disabled, so one recipe serves every target and precision.
    known = {p.name for p in (*passes.cleanup_passes(), passes.WarpToGridSample(), passes.FuseStandardOnnx(), passes.FuseForOnnxRuntime())}
    known |= {passes.FreezeShapes.name, "fp16", "bf16", passes.Quantize.name, passes.LowerFp8Gemm.name}
    unknown = sorted(set(options.disable_passes) - known)
    if unknown:
        raise InputError(f"cannot disable unknown pass(es) {', '.join(map(repr, unknown))}", hint=f"passes: {', '.join(sorted(known))}")
    return [p for p in chosen if p.name not in options.disable_passes]


@dataclasses.dataclass
class Built:
    engine: targets.Engine | None  # None for a deferred build
    config: targets.BuildConfig
    model: ir.Model  # the optimized model, as saved to model.onnx
    model_files: list[str]
    records: list[passes.PassRecord]
    passes_s: float
    build_s: float
    fallback: Fallback | None = None
    work: dict = dataclasses.field(default_factory=dict)  # corner -> tensor-core FLOPs and weight bytes of one run


def build_engine(
    model: ir.Model,
    directory: Path,
    target: targets.Target,
    options: Options,
    profile: targets.Profile,
    alignment: targets.Alignment | None = None,
    verifier: StepVerifier | None = None,
    progress: Progress | None = None,
    calibration: CalibrationSet | None = None,
    source: dict | None = None,
    deferred: bool = False,
    profiles: tuple[targets.Profile, ...] = (),
) -> Built:
    """Run the passes on model (in place), save it as directory/model.onnx, build the target's engine
    into directory/engine/ and load it. A static profile (one size per dim) freezes the shapes first,
    and a GPU engine then runs as one CUDA graph. verifier checks the model after every pass. With
    --quality, the quality fallback chooses what the quantize pass leaves in float (source: the import
    record, which says whether the model is a diffusers model). deferred: the target does not run here,
    so its build is deferred (Target.defer) and nothing is loaded (Built.engine is None). profiles:
    several profiles that profile spans, each run by a session of its own (an EngineSet)."""
    progress = progress or Progress(enabled=False)
    static_sizes = profile.sizes("opt") if profile.is_static() and profile.dims else None
    with progress.stage("count FLOPs"):
        try:
            work = {corner: count_flops(model, shapes).to_json() for corner, shapes in profile.corners()}
        except Exception as exc:  # onnxscript's folding or ONNX shape inference on an op it cannot take
            work = {}  # the report then says it has no cost figures; the build goes on
            progress.line(f"note: FLOPs not counted ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    start = time.perf_counter()
    chosen = select_passes(options, target, static_sizes, calibration)
    fallback = None
    quantize = next((p for p in chosen if isinstance(p, passes.Quantize)), None)
    if quantize is not None and options.quality:
        # The passes before quantization once, then the search on that model, then the rest.
        split = chosen.index(quantize)
        model, records = run_passes(model, chosen[:split], options, verifier, progress)
        with progress.stage(f"quality fallback for {options.quality}"):
            fallback = quality_fallback(model, quantize, options, profile, source or {}, options.seed + QUALITY_SEED_OFFSET, progress)
        quantize.only = set(fallback.quantized)
        model, more = run_passes(model, chosen[split:], options, verifier, progress)
        records += more
    else:
        model, records = run_passes(model, chosen, options, verifier, progress)
    passes_s = time.perf_counter() - start
    start = time.perf_counter()
    with progress.stage(f"{'write the deferred' if deferred else 'build'} {target.name} engine"):
        model_files = save_model(model, directory / MODEL_FILE)
        engine_dir = directory / ENGINE_DIR
        engine_dir.mkdir()
        config = target.build_for(directory / MODEL_FILE, engine_dir, profile, options.precision, alignment, profiles, deferred)
        engine = None if deferred else targets.load_engine(engine_dir)
    stored = weights_bytes(model)  # as stored: after the precision pass
    for counted in work.values():
        counted["weight_bytes"] = stored
    return Built(engine, config, model, model_files, records, passes_s, time.perf_counter() - start, fallback, work)


def run_passes(model: ir.Model, chosen, options: Options, verifier: StepVerifier | None, progress: Progress):
    low_precision_started = False

    def before(pass_: passes.KilnPass) -> None:
        progress.started(f"pass {pass_.name}")

    def after(record: passes.PassRecord, current: ir.Model) -> None:
        nonlocal low_precision_started
        progress.finished(f"pass {record.name}", record.seconds, f", {record.nodes_before} -> {record.nodes_after} nodes")
        low_precision_started |= record.name in (options.precision, passes.Quantize.name)
        if verifier is None:
            return
        tolerance = options.tolerance() if low_precision_started else TOLERANCES["fp32"]
        problem = verifier.check(current, tolerance)
        if problem:
            raise KilnError(f"--verify-each: after pass {record.name!r}, {problem}")

    manager = passes.PassManager(chosen, before_each=before, after_each=after)
    try:
        return manager.run(model)
    except passes.PassFailed as exc:
        raise KilnError(str(exc), hint="rerun with --debug for the traceback, or disable the pass") from exc
