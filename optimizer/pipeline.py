"""`kiln optimize`: load -> passes -> target build -> verification -> reports, staged and renamed into OUTDIR."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import onnx_ir as ir

import passes
import targets
from targets import DimRange, Profile
from optimizer import __version__
from optimizer.align import METADATA_KEY as ALIGN_KEY
from optimizer.align import AlignedEngine, Alignment
from optimizer.bench import bench_profile
from optimizer.config import TOLERANCES, Options
from optimizer.errors import InputError, KilnError, VerificationFailed
from optimizer.importers import import_model
from optimizer.models import content_hash, find_model, load_model, save_model
from optimizer.outdir import check_outdir, staged_dir
from optimizer.progress import Progress
from optimizer.report import new_report, write_reports
from optimizer.shapes import SHAPES_METADATA_KEY, build_profile, input_specs, int_ranges, output_specs
from optimizer.verify import REFERENCE, StepVerifier, expected_outputs, reference_session, verify_engine

ENGINE_DIR = "engine"


def pass_pipeline(
    options: Options, target: targets.Target | None = None, static_sizes: dict[str, int] | None = None
) -> list[passes.KilnPass]:
    """The passes for these options and target, in order, minus the disabled ones. static_sizes (the
    profile's dims when each has one size) freezes the input shapes first."""
    # Fusions match the graph as the exporter wrote it; cleanup then tidies what they leave.
    chosen = [passes.WarpToGridSample(), *passes.cleanup_passes()]
    if static_sizes is not None:
        chosen.insert(0, passes.FreezeShapes(static_sizes))
    if target is not None and "ort-fusions" in target.capabilities:
        chosen.append(passes.FuseForOnnxRuntime())
    else:
        chosen.append(passes.FuseStandardOnnx())
    if options.precision != "fp32":
        chosen.append(passes.ConvertPrecision(options.precision, io_float32=options.io_dtype == "float32"))
    known = {p.name for p in chosen} | {passes.FreezeShapes.name}
    unknown = sorted(set(options.disable_passes) - known)
    if unknown:
        raise InputError(f"cannot disable unknown pass(es) {', '.join(unknown)}", hint=f"passes: {', '.join(sorted(known))}")
    return [p for p in chosen if p.name not in options.disable_passes]


def choose_target(options: Options) -> targets.Target:
    try:
        target = targets.get_target(options.target)
    except KeyError as exc:
        raise InputError(str(exc.args[0]), hint="`kiln targets` lists them") from None
    reason = target.available()
    if reason:
        raise InputError(
            f"target {target.name!r} is not available here: {reason}",
            hint="`kiln targets` shows what is; GPU targets need an NVIDIA GPU and pip install 'kiln-ml[gpu]'",
        )
    if options.precision not in target.precisions:
        raise InputError(
            f"target {target.name!r} does not support {options.precision}",
            hint=f"it supports {', '.join(target.precisions)}",
        )
    return target


def optimize(model_arg: Path, outdir: Path, options: Options, force: bool, progress: Progress) -> dict:
    """Run the whole job; returns the report. Raises VerificationFailed after writing OUTDIR if parity fails."""
    target = choose_target(options)
    chosen_passes = pass_pipeline(options, target)
    if not model_arg.exists():
        find_model(model_arg)  # raises the missing-path error
    check_outdir(outdir, model_arg, force)
    with tempfile.TemporaryDirectory(prefix="kiln-work-") as work:
        return _optimize(model_arg, outdir, Path(work), target, chosen_passes, options, progress)


def _optimize(model_arg, outdir, work, target, chosen_passes, options: Options, progress: Progress) -> dict:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    report = new_report("optimize")

    t = time.perf_counter()
    with progress.stage(f"import {model_arg}"):
        model_path, imported_from, notes = import_model(model_arg, work, options)
    timings["import_s"] = time.perf_counter() - t

    t = time.perf_counter()
    with progress.stage(f"load {model_path.name}"):
        model = load_model(model_path)
        source = imported_from or {"path": str(model_path), "format": "onnx", "hash": content_hash(model)}
        source.update(nodes=passes.count_nodes(model), onnx_opset=model.opset_imports.get("", None))
        inputs = input_specs(model)
        profile, shape_notes = build_profile(
            inputs, options.shapes, model.metadata_props.get(SHAPES_METADATA_KEY), int_ranges(model)
        )
        alignment, profile = _aligned(model, profile)
        notes += shape_notes
        for note in notes:
            progress.line(f"kiln: note: {note}")
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    expected, verifier = [], None
    if options.verify or options.verify_each:
        with progress.stage("run the original model for reference"):
            reference = reference_session(model_path)
            if options.verify:
                expected = expected_outputs(reference, profile, options.seed, alignment)
            if options.verify_each:
                verifier = StepVerifier(reference, profile, options.seed)
            del reference  # its outputs are all that is needed: hold the weights once
    timings["reference_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if profile.is_static() and profile.dims:  # freeze the shapes first (pass_pipeline drops it if disabled)
        chosen_passes = pass_pipeline(options, target, profile.sizes("opt"))
    model, records = _run_passes(model, chosen_passes, options, verifier, progress)
    timings["passes_s"] = time.perf_counter() - t

    with staged_dir(outdir) as stage:
        t = time.perf_counter()
        with progress.stage(f"build {target.name} engine"):
            model_files = save_model(model, stage / "model.onnx")
            engine_dir = stage / ENGINE_DIR
            engine_dir.mkdir()
            extras = {"precision": options.precision, **({"alignment": alignment.to_json()} if alignment else {})}
            target.build(stage / "model.onnx", engine_dir, profile, extras)
            engine = target.load(engine_dir)
            if alignment:
                engine = AlignedEngine(engine, alignment)
        timings["build_s"] = time.perf_counter() - t

        t = time.perf_counter()
        checks = []
        if options.verify:
            with progress.stage(f"verify at {len(expected)} shape(s)"):
                checks = verify_engine(engine, expected, options.tolerance())
        timings["verify_s"] = time.perf_counter() - t

        t = time.perf_counter()
        latency = []
        if options.bench_runs:
            with progress.stage(f"benchmark ({options.bench_runs} runs per shape)"):
                latency = bench_profile(engine, profile, options.bench_runs, options.bench_warmup, options.seed)
        timings["bench_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - started

        passed = all(c.passed for c in checks)
        report.update(
            kiln_version=__version__,
            status="ok" if passed and options.verify else ("unverified" if not options.verify else "verification-failed"),
            source=source,
            model={"file": "model.onnx", "files": model_files, "hash": content_hash(model),
                   "nodes": passes.count_nodes(model), "op_counts": passes.op_counts(model)},  # fmt: skip
            target={"name": target.name, "family": target.family, "files": [f"{ENGINE_DIR}/{p.name}" for p in sorted(engine_dir.iterdir())]},
            precision=options.precision,
            inputs=[s.to_json() for s in inputs],
            outputs=[s.to_json() for s in output_specs(model)],
            profile=profile.to_json(),
            alignment={**alignment.to_json(), "rule": alignment.rule()} if alignment else None,
            notes=notes,
            passes=[r.to_json() for r in records],
            verification={"enabled": options.verify, "reference": REFERENCE, "tolerance": options.tolerance(),
                          "seed": options.seed, "passed": passed if options.verify else None,
                          "shapes": [c.to_json() for c in checks]},  # fmt: skip
            latency=latency,
            timings=timings,
        )
        write_reports(stage, report)
    if options.verify and not passed:
        failed = [c for c in checks if not c.passed]
        worst = failed[0]
        detail = worst.error or ", ".join(f"{k}: max abs {v['max_abs']:.3g}" for k, v in worst.outputs.items())
        raise VerificationFailed(
            f"verification failed at {len(failed)} of {len(checks)} shape(s); first at the {worst.corner} shape "
            f"({_fmt_shapes(worst.shapes)}): {detail}",
            hint=f"see {outdir / 'report.md'}; rerun with --verify-each to find the pass that breaks parity",
        )
    return report


def _aligned(model: ir.Model, profile: Profile) -> tuple[Alignment | None, Profile]:
    """The model's alignment rule, and the profile with its spatial ranges checked against it (an opt
    between aligned sizes is rounded down to one)."""
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
            if r.min % multiple or r.max % multiple:
                raise InputError(
                    f"the range {r.min}..{r.max} of dim {name!r} must be in multiples of {multiple}: {alignment.rule()}",
                    hint=f"give the padded range, e.g. --shapes {name}={alignment.padded_size(r.min)}..{alignment.padded_size(r.max)}",
                )
            dims[name] = DimRange(r.min, max(r.min, r.opt - r.opt % multiple), r.max)
    return alignment, dataclasses.replace(profile, dims=dims)


def _fmt_shapes(shapes: dict) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in shapes.items())


def _run_passes(model: ir.Model, chosen, options: Options, verifier: StepVerifier | None, progress: Progress):
    low_precision_started = False

    def before(pass_: passes.KilnPass) -> None:
        progress.line(f"kiln: pass {pass_.name}")

    def after(record: passes.PassRecord, current: ir.Model) -> None:
        nonlocal low_precision_started
        low_precision_started |= record.name == options.precision
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
