"""The `kiln optimize` driver: import -> load -> passes and target build -> verification -> reports,
staged in a temporary directory and renamed into OUTDIR."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from kiln import passes, targets
from kiln.optimizer import __version__
from kiln.optimizer.bench import bench_or_note, compute_format, cost_section
from kiln.optimizer.build import build_engine, select_passes
from kiln.optimizer.calibrate import calibration_providers, calibration_set, check_format
from kiln.optimizer.config import Options
from kiln.optimizer.engine_cache import EngineCache, Lookup, file_digest, key_of, key_versions, kiln_source_hash, model_hash
from kiln.optimizer.errors import InputError, VerificationFailed, first_line
from kiln.optimizer.importers import import_model
from kiln.optimizer.onnx_files import content_hash, find_model, hash_directory, load_model
from kiln.optimizer.outdir import ENGINE_DIR, REPORT_FILE, check_outdir, staged_dir
from kiln.optimizer.precision_policy import CLASS_METADATA_KEY, apply_precision_policy, declared_class
from kiln.optimizer.profile_lint import check as lint_check
from kiln.optimizer.profile_lint import lint_memory, lint_profiles
from kiln.optimizer.profile_synthesis import synthesize
from kiln.optimizer.progress import Progress
from kiln.optimizer.quality import QUALITY_SEED_OFFSET, Outputs, QualityReference, engine_runner
from kiln.optimizer.report import new_report, write_reports
from kiln.optimizer.shapes import SHAPES_METADATA_KEY, build_profile, check_io, input_specs, int_ranges
from kiln.optimizer.verify import (
    DEFERRED_NOTE, EXPECTED_FILE, REFERENCE, Expected, StepVerifier, expected_outputs, reference_session, sample_inputs, save_expected, verify_engine,
)  # fmt: skip
from kiln.targets import Alignment, DimRange, Profile
from kiln.targets.align import METADATA_KEY as ALIGN_KEY
from kiln.targets.engine import preload_cuda
from kiln.targets.gpu import fingerprint
from kiln.targets.ort import uncapturable_ops


def choose_target(options: Options, deferring: bool = False) -> targets.Target:
    """The target options name (`auto`: the one for this machine's GPU, or cpu), checked to run here;
    deferring: a GPU target that does not run here may still be built, to be verified later (Target.defer)."""
    try:
        target = targets.get_target(options.target)
    except KeyError as exc:
        raise InputError(str(exc.args[0]), hint="`kiln targets` lists them") from None
    reason = target.available()
    if reason and not (deferring and target.deferrable()):
        plan = deferring and target.family == "tensorrt"
        raise InputError(f"target {target.name!r} is not available here: {reason}",
                         hint="a TensorRT plan is compiled on its GPU: run this on a machine with it, or build NAME-ort-trt or NAME here" if plan
                         else "`kiln targets` shows what is; GPU targets need an NVIDIA GPU and pip install 'kiln-ml[gpu]'")  # fmt: skip
    if options.precision not in target.precisions:
        raise InputError(
            f"target {target.name!r} does not support {options.precision}",
            hint=f"it supports {', '.join(target.precisions)}",
        )
    check_format(options, target)
    return tensorrt_settings(options, target)


def check_profiles(target: targets.Target, count: int) -> None:
    """Refuse several profiles for a target whose engines take one."""
    if target.one_profile and count > 1:
        raise InputError(f"target {target.name!r} builds one profile per engine: {target.one_profile}",
                         hint=f"give --profiles 1, or build {target.name.removesuffix('-trt')}-ort-trt, which takes several")  # fmt: skip


def tensorrt_settings(options: Options, target: targets.Target) -> targets.Target:
    """target with the TensorRT builder settings options ask for, which only TensorRT targets take."""
    asked = {name: value for name, value in (("--trt-opt-level", options.trt_opt_level), ("--trt-time-limit", options.trt_time_limit)) if value is not None}
    if not asked:
        return target
    if target.family != "tensorrt":
        raise InputError(f"{', '.join(asked)}: only for TensorRT targets, and {target.name!r} is not one",
                         hint=f"build for a NAME-trt or NAME-ort-trt target, or leave {' and '.join(asked)} out")  # fmt: skip
    if options.trt_time_limit is not None and not hasattr(target, "time_limit_s"):
        raise InputError(f"--trt-time-limit: ONNX Runtime's TensorRT provider ({target.name!r}) has no build-time limit",
                         hint="use the native target, NAME-trt, or leave the limit out")  # fmt: skip
    changes = {"optimization_level": options.trt_opt_level} if options.trt_opt_level is not None else {}
    if options.trt_time_limit is not None:
        changes["time_limit_s"] = options.trt_time_limit
    return dataclasses.replace(target, **changes)


def optimize(model_arg: Path, outdir: Path, options: Options, force: bool, progress: Progress) -> dict:
    """Run the whole job; returns the report. Raises VerificationFailed after writing OUTDIR if parity fails."""
    target = choose_target(options, deferring=True)
    select_passes(options, target)  # refuses unknown --disable-pass names before any work
    if options.profile_from and isinstance(options.profiles, int):
        check_profiles(target, options.profiles)  # before any work
    if not model_arg.exists():
        find_model(model_arg)  # raises the missing-path error
    check_outdir(outdir, model_arg, force)
    # Before the import: a refusal costs no export and no reference run.
    notes = [targets.detect_target()[1]] if options.target == "auto" else []
    if target.one_profile and options.profile_from and options.profiles == "auto":
        options = dataclasses.replace(options, profiles=1)
        notes.append(f"one profile (--profiles auto) for {target.name}: {target.one_profile}")
    notes += filter(None, [apply_precision_policy(options, target.precisions, declared_class(model_arg))])
    deferred = target.available()
    if deferred:
        notes.append(f"{DEFERRED_NOTE} ({deferred}): run `kiln verify` on this OUTDIR where {target.name} runs")
    if not options.cache:
        return _build(model_arg, outdir, target, options, notes, progress, deferred=deferred)
    cache = EngineCache()
    if hasattr(target, "timing_cache_dir"):  # TensorRT builds of one target share their timing cache
        target = dataclasses.replace(target, timing_cache_dir=cache.timing)
    with progress.stage(f"hash {model_arg} for the engine cache ({cache.root})"):
        parts = cache_parts(model_arg, options, target, deferred)
    key = key_of(parts)
    with cache.building(key, waiting=lambda: progress.line(f"waiting for another kiln that is building this engine (cache key {key})")):
        found = cache.lookup(key, parts)
        progress.line(found.line)
        if found.hit:
            return _from_cache(found, outdir, model_arg)
        report = _build(model_arg, outdir, target, options, notes, progress, found, deferred)  # one that fails verification raises: not kept
        try:
            with progress.stage(f"store the engine in the cache ({key})"):
                cache.store(key, parts, outdir, str(model_arg))
        except OSError as exc:  # OUTDIR is whole and verified: a cache that cannot take it costs only the next build
            progress.line(f"warning: the engine was not stored in the cache {cache.root}: {exc.strerror or exc}")
    return report


def _build(model_arg: Path, outdir: Path, target: targets.Target, options: Options, notes: list[str], progress: Progress,
           cached: Lookup | None = None, deferred: str | None = None) -> dict:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kiln-work-") as work:
        prepared = prepare(model_arg, Path(work), options, progress)
        for note in notes:
            prepared.notes.append(note)
            progress.line(f"note: {note}")
        with staged_dir(outdir) as stage:
            point = build_point(prepared, stage, outdir, target, options, progress, cache=cached, deferred=deferred)
    if point.failure:
        raise point.failure
    return point.report


def _from_cache(found: Lookup, outdir: Path, model_arg: Path) -> dict:
    """OUTDIR as the cache entry holds it, its report saying it came from the cache (its latency and
    timings are the build's) and naming the model as given now."""
    report = json.loads((found.hit / REPORT_FILE).read_text())
    report["cache"] = found.to_json()
    report["source"]["path"] = str(model_arg)
    with staged_dir(outdir) as stage:
        for path in sorted(found.hit.iterdir()):
            if path.is_dir():
                shutil.copytree(path, stage / path.name)
            else:
                shutil.copy2(path, stage / path.name)
        write_reports(stage, report)
    return report


def cache_parts(model_arg: Path, options: Options, target: targets.Target, deferred: str | None = None) -> dict:
    """Everything that makes the engine what it is (see engine_cache.py): the model's and the sample
    files' bytes, the options (the files they name by their bytes, not their paths), the target, kiln's
    code, the libraries, for a GPU target the machine, and why a build waits for its GPU (once the
    target runs here, that is a new key)."""
    settings = dataclasses.asdict(options)
    settings.update(target=target.name, cache=None, shapes=[spec for _, spec in options.shapes], int_ranges=[spec for _, spec in options.int_ranges],
                    verify_inputs=[file_digest(Path(p)) if Path(p).is_file() else p for p in options.verify_inputs])  # fmt: skip
    if options.profile_from and Path(options.profile_from).is_file():
        settings["profile_from"] = file_digest(Path(options.profile_from))
    if options.calib:
        calib = Path(options.calib)
        settings["calib"] = hash_directory(calib) if calib.is_dir() else file_digest(calib) if calib.is_file() else options.calib
    machine = {}
    if target.name != "cpu":
        preload_cuda()  # the CUDA and cuDNN versions are part of the machine
        machine = fingerprint()
    parts = {"model": model_hash(model_arg), "options": settings, "target": target.name, "machine": machine,
             "libraries": key_versions(), "kiln": kiln_source_hash(), "deferred": deferred}  # fmt: skip
    return json.loads(json.dumps(parts, default=str))  # as stored: paths as text


@dataclasses.dataclass
class Prepared:
    """What every engine of one model shares: the imported model, its profile, the reference's outputs
    on the verification inputs, and the calibration sets and quality reference made so far."""

    model_path: Path
    source: dict
    notes: list[str]
    profile: Profile
    alignment: Alignment | None
    expected: list[Expected]
    verifier: StepVerifier | None
    timings: dict[str, float]
    model: ir.Model | None = None  # loaded already; taken by the first build
    calibrations: dict = dataclasses.field(default_factory=dict)
    quality: QualityReference | None = None
    from_requests: dict | None = None  # --profile-from: the requests, the profiles made of them and their waste
    profiles: tuple[Profile, ...] = ()  # several profiles, which profile spans
    lint: list = dataclasses.field(default_factory=list)  # the profile lint's findings (profile_lint.Finding)

    def take_model(self) -> ir.Model:
        """The model to run the passes on (in place): the one loaded already, then a fresh load each time."""
        model, self.model = self.model, None
        return model if model is not None else load_model(self.model_path)

    def calibration(self, options: Options, target: targets.Target, progress: Progress, split_for: int | None = None):
        """(calibration set, notes) for options' --calib and --calib-samples, made once per pair."""
        key = (options.calib, options.calib_samples, options.seed, split_for)
        if key not in self.calibrations:
            with progress.stage("calibration set"):
                self.calibrations[key] = calibration_set(options, self.profile, self.model_path, self.source, self.alignment,
                                                         calibration_providers(target), split_for)  # fmt: skip
        return self.calibrations[key]

    def quality_reference(self, options: Options, progress: Progress, held_out=()) -> QualityReference:
        if self.quality is None:
            with progress.stage("run the original model on the quality inputs"):
                self.quality = QualityReference.compute(self.model_path, self.expected, self.profile, self.source,
                                                        options.seed + QUALITY_SEED_OFFSET, held_out)  # fmt: skip
        return self.quality


def prepare(model_arg: Path, work: Path, options: Options, progress: Progress) -> Prepared:
    """Import and load the model, make its profile, and run the original on the verification inputs.
    work must outlive the result (an imported model is written there)."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    with progress.stage(f"import {model_arg}"):
        model_path, imported_from, notes = import_model(model_arg, work, options)
    timings["import_s"] = time.perf_counter() - t

    t = time.perf_counter()
    with progress.stage(f"load {model_path.name}"):
        model = load_model(model_path, notes)
        check_io(model)
        source = imported_from or {"path": str(model_path), "format": "onnx", "hash": content_hash(model)}
        if CLASS_METADATA_KEY in model.metadata_props:  # exported by kiln's diffusers importer
            source.setdefault("class", model.metadata_props[CLASS_METADATA_KEY])
        source.update(nodes=passes.count_nodes(model), onnx_opset=model.opset_imports.get("", None))
        inputs = input_specs(model)
        synthesis, shape_specs, multiples = None, list(options.shapes), _aligned_dims(model, inputs)
        if options.profile_from:  # its ranges first: --shapes and the recipe win
            dims = list(dict.fromkeys(d for spec in inputs for d in spec.dynamic_dims))
            synthesis = synthesize(options.profile_from, dims, multiples, options.profiles)
            shape_specs = synthesis.specs + shape_specs
        profile, shape_notes = build_profile(
            inputs, shape_specs, model.metadata_props.get(SHAPES_METADATA_KEY), int_ranges(model), options.int_ranges
        )
        profiles = ()
        if synthesis:  # the dims whose range --shapes or the recipe gave instead, in every profile
            made = dict(spec.split("=", 1) for _, spec in synthesis.specs)
            synthesis.section["replaced"] = replaced = [d for d, text in made.items() if str(profile.dims[d]) != text]
            profiles = _bucket_profiles(profile, synthesis.buckets, replaced)
        findings = lint_profiles(model, profiles or (profile,), multiples, synthesis.shapes if synthesis else [])
        notes += lint_check(findings)
        alignment, profile = _aligned(model, profile)
        profiles = tuple(_aligned(model, p)[1] for p in profiles)
        samples = sample_inputs(options.verify_inputs, profile, alignment) if options.verify else []
        notes += shape_notes
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    expected, verifier = [], None
    if options.verify or options.verify_each:
        with progress.stage("run the original model for reference"):
            reference = _reference(model_path)
            if options.verify:
                expected = expected_outputs(reference, profile, options.seed, alignment, samples, profiles)
                expected = _without_unrunnable(expected, notes)
            if options.verify_each:
                verifier = StepVerifier(reference, profile, options.seed)
            del reference  # its outputs are all that is needed: hold the weights once
    timings["reference_s"] = time.perf_counter() - t
    for note in notes:
        progress.line(f"note: {note}")
    return Prepared(model_path, source, notes, profile, alignment, expected, verifier, timings, model,
                    from_requests=synthesis.section if synthesis else None, profiles=profiles, lint=findings)  # fmt: skip


def _bucket_profiles(profile: Profile, buckets: list[dict], replaced: list[str]) -> tuple[Profile, ...]:
    """A profile per bucket: profile with the bucket's ranges, except for the dims --shapes replaced
    (whose range then holds in every profile); none if that leaves them all one."""
    made = {}
    for bucket in buckets:
        dims = {**profile.dims, **{d: DimRange(*r) for d, r in bucket.items() if d not in replaced}}
        made.setdefault(json.dumps({d: str(r) for d, r in sorted(dims.items())}), dataclasses.replace(profile, dims=dims))
    return tuple(made.values()) if len(made) > 1 else ()


def _aligned_dims(model: ir.Model, inputs) -> dict[str, int]:
    """dim name -> the multiple the model's alignment rule pads it to (FILM's height and width: 64)."""
    text = model.metadata_props.get(ALIGN_KEY)
    if not text:
        return {}
    alignment = Alignment.from_json(json.loads(text))
    return {spec.shape[axis]: alignment.multiple for spec in inputs for axis in alignment.inputs.get(spec.name, ())
            if isinstance(spec.shape[axis], str)}  # fmt: skip


@dataclasses.dataclass
class Point:
    """One engine built, verified and measured."""

    report: dict
    status: str  # "ok", "verification-failed" or "budget-not-met"
    failure: VerificationFailed | None  # to raise once the OUTDIR is in place
    engine: targets.Engine
    outputs: Outputs | None  # the engine's outputs on the quality inputs, when quality was measured


def build_point(prepared: Prepared, stage: Path, outdir: Path, target: targets.Target, options: Options, progress: Progress,
                measure_quality: bool = False, split_for: int | None = None, cache: Lookup | None = None,
                deferred: str | None = None) -> Point:  # fmt: skip
    """Build, verify, benchmark and report one engine of the prepared model into stage, which the caller
    renames to outdir. measure_quality: a quality section for an unquantized engine too. split_for: see
    calibration_set. cache: the engine cache's miss that led to this build. deferred: why the target
    does not run here; its build is deferred, and the verification cases are saved for `kiln verify`."""
    started = time.perf_counter()
    timings = dict(prepared.timings)
    report = new_report("optimize")
    profile, alignment, expected, source = prepared.profile, prepared.alignment, prepared.expected, prepared.source
    notes = list(prepared.notes)
    calibration = None
    if options.quantize:
        calibration, calib_notes = prepared.calibration(options, target, progress, split_for)
        notes += calib_notes
        for note in calib_notes:
            progress.line(f"note: {note}")

    check_profiles(target, len(prepared.profiles))
    model = prepared.take_model()
    with progress.stage("estimate the memory at the profiles' max"):
        memory = lint_memory(model, prepared.profiles or (profile,), target, options.precision, options.quantize)
    notes += lint_check(memory)
    built = build_engine(model, stage, target, options, profile, alignment, prepared.verifier, progress, calibration, source, bool(deferred),
                         prepared.profiles)  # fmt: skip
    model, engine, records = built.model, built.engine, built.records
    engine_dir = stage / ENGINE_DIR
    timings["passes_s"], timings["build_s"] = built.passes_s, built.build_s
    if getattr(target, "cuda_graphs", False) and any(p.is_static() for p in prepared.profiles or (profile,)) and not built.config.cuda_graph:
        for op, why in uncapturable_ops(stage / "model.onnx").items():
            notes.append(f"no CUDA graph for this static engine: {op}: {why}")

    t = time.perf_counter()
    checks = []
    if options.verify and deferred:
        save_expected(stage / EXPECTED_FILE, expected)
    elif options.verify:
        with progress.stage(f"verify at {len(expected)} shape(s)"):
            checks = verify_engine(engine, expected, options.tolerance())
    timings["verify_s"] = time.perf_counter() - t

    t = time.perf_counter()
    latency = []
    passed = all(c.passed for c in checks)
    if options.bench_runs and not passed:
        notes.append("the benchmark was not run: verification failed")
    elif options.bench_runs and not deferred:
        with progress.stage(f"benchmark ({options.bench_runs} runs per shape)"):
            latency = bench_or_note(engine, options.bench_runs, options.bench_warmup, options.seed, notes)
    timings["bench_s"] = time.perf_counter() - t
    quality, outputs = None, None
    if (options.quantize or measure_quality) and options.verify and not deferred:
        t = time.perf_counter()
        held_out = calibration.held_out if calibration is not None else ()
        reference = prepared.quality_reference(options, progress, held_out)
        with progress.stage("quality against the fp32 model"):
            outputs = reference.outputs(engine_runner(engine))
            quality = reference.metrics(outputs)
        timings["quality_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started + sum(prepared.timings.values())

    report.update(
        kiln_version=__version__,
        status="not-verified" if deferred else "ok" if passed and options.verify else ("unverified" if not options.verify else "verification-failed"),
        source=source,
        model={"file": "model.onnx", "files": built.model_files, "hash": content_hash(model),
               "nodes": passes.count_nodes(model), "op_counts": passes.op_counts(model)},  # fmt: skip
        target={"name": target.name, "family": target.family, "files": [f"{ENGINE_DIR}/{p.name}" for p in sorted(engine_dir.iterdir())],
                "build_config": built.config.to_json()},  # fmt: skip
        precision=options.precision,
        quantization={"format": options.quantize, "backend": options.backend(target.family), "quality": quality,
                      "fallback": built.fallback.to_json() if built.fallback else None} if options.quantize else None,
        # The engine's own inputs and outputs, with the types it takes (float16 with --io-dtype float16).
        inputs=[s.to_json() for s in built.config.inputs],
        outputs=[s.to_json() for s in built.config.outputs],
        profile=profile.to_json(),
        profiles=[p.to_json() for p in prepared.profiles],
        lint=[f.to_json() for f in prepared.lint + memory],
        alignment={**alignment.to_json(), "rule": alignment.rule()} if alignment else None,
        notes=notes,
        passes=[r.to_json() for r in records],
        verification={"enabled": options.verify, "reference": REFERENCE, "tolerance": options.tolerance(),
                      "seed": options.seed, "passed": passed if options.verify and not deferred else None,
                      "shapes": [c.to_json() for c in checks]},  # fmt: skip
        latency=latency,
        work=built.work,
        timings=timings,
    )
    report["cost"] = cost_section(built.work, latency, engine, compute_format(report))
    report["cache"] = cache.to_json() if cache else None
    report["profile_from"] = prepared.from_requests
    if quality is not None and not options.quantize:
        report["quality"] = quality
    write_reports(stage, report)
    return Point(report, *_failure(built, checks, options, outdir), engine, outputs)


def _failure(built, checks, options: Options, outdir: Path) -> tuple[str, VerificationFailed | None]:
    """The point's status, and the error to raise for it."""
    if built.fallback is not None and not built.fallback.met:
        best = max(built.fallback.curve, key=lambda e: e.quality if built.fallback.budget.higher_is_better else -e.quality)
        return "budget-not-met", VerificationFailed(
            f"the quality budget {built.fallback.budget} is not met even with every quantized layer in float "
            f"(best: {built.fallback.budget.metric} {best.quality:.4g})",
            hint=f"see {outdir / 'report.md'}; loosen --quality, or quantize fewer layers with --keep",
        )
    if options.verify and not all(c.passed for c in checks):
        failed = [c for c in checks if not c.passed]
        worst = failed[0]
        ranked = sorted(worst.outputs.items(), key=lambda item: -item[1]["max_rel"])  # relative: caches can be large
        detail = worst.error or _first_few([f"{k}: max abs {v['max_abs']:.3g}" for k, v in ranked], "outputs")
        return "verification-failed", VerificationFailed(
            f"verification failed at {len(failed)} of {len(checks)} shape(s); first at the {worst.corner} shape "
            f"({_fmt_shapes(worst.shapes)}): {detail}",
            hint=f"see {outdir / 'report.md'}; " + (
                "give the model inputs it takes with --verify-inputs SAMPLE.npz, or integer ranges with --int-range"
                if (worst.error or "").startswith("the original model")
                else "rerun with --verify-each to find the pass that breaks parity"
            ),
        )
    return "ok", None


def _reference(model_path: Path) -> ort.InferenceSession:
    """The reference session; a model ONNX Runtime cannot load on its CPU (an op or type it has no
    kernel for, a training or preview domain) is one kiln cannot build or verify an engine of."""
    try:
        return reference_session(model_path)
    except Exception as exc:  # onnxruntime's Fail, NotImplemented, InvalidGraph, ...
        raise InputError(
            f"{model_path}: ONNX Runtime {ort.__version__} cannot load it on its CPU provider: {first_line(exc)}",
            hint="kiln builds ONNX Runtime engines; replace the op or type it names, or convert the model to ops it runs",
        ) from None


def _without_unrunnable(expected: list[Expected], notes: list[str]) -> list[Expected]:
    """With --verify-inputs, a random-data check the original model itself cannot run (indices out of
    range, a zero scale) says nothing about the engine: it is dropped, with a note, and the samples
    verify instead. Without samples it stays a failed check."""
    if not any(e.sample for e in expected):
        return expected
    for e in expected:
        if e.want is None and not e.sample:
            notes.append(f"the original model cannot run on random inputs at the {e.corner} shape, so the engine was "
                         f"verified on the --verify-inputs samples only there: {e.error.splitlines()[0]}")  # fmt: skip
    return [e for e in expected if e.sample or e.want is not None]


def _aligned(model: ir.Model, profile: Profile) -> tuple[Alignment | None, Profile]:
    """The model's alignment rule, and the profile with an opt between aligned sizes rounded down to one
    (the profile lint has checked min and max)."""
    text = model.metadata_props.get(ALIGN_KEY)
    if not text:
        return None, profile
    alignment = Alignment.from_json(json.loads(text))
    multiple = alignment.multiple
    dims = dict(profile.dims)
    for spec in profile.inputs:
        for axis in alignment.inputs.get(spec.name, ()):
            name = spec.shape[axis]
            r = dims.get(name) if isinstance(name, str) else None
            if r is None:
                continue
            dims[name] = DimRange(r.min, max(r.min, r.opt - r.opt % multiple), r.max)
    return alignment, dataclasses.replace(profile, dims=dims)


def _first_few(items: list[str], what: str, few: int = 4) -> str:
    """The first few items, and how many more (a step decoder has dozens of cache inputs and outputs)."""
    more = f", and {len(items) - few} more {what}" if len(items) > few else ""
    return ", ".join(items[:few]) + more


def _fmt_shapes(shapes: dict) -> str:
    return _first_few([f"{k} {list(v)}" for k, v in shapes.items()], "inputs")
