"""`kiln optimize`: load -> passes -> target build -> verification -> reports, staged and renamed into OUTDIR."""

from __future__ import annotations

import time
from pathlib import Path

import onnx_ir as ir

import passes
import targets
from optimizer import __version__
from optimizer.bench import bench_profile
from optimizer.config import TOLERANCES, Options
from optimizer.errors import InputError, KilnError, VerificationFailed
from optimizer.models import content_hash, find_model, load_model, save_model
from optimizer.outdir import check_outdir, staged_dir
from optimizer.progress import Progress
from optimizer.report import new_report, write_reports
from optimizer.shapes import SHAPES_METADATA_KEY, build_profile, input_specs, output_specs
from optimizer.verify import REFERENCE, StepVerifier, reference_session, verify_engine

ENGINE_DIR = "engine"


def pass_pipeline(options: Options) -> list[passes.KilnPass]:
    """The passes for these options, in order, minus the disabled ones."""
    chosen = passes.cleanup_passes()
    if options.precision == "fp16":
        chosen.append(passes.ConvertToFloat16())
    known = {p.name for p in chosen}
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
        raise InputError(f"target {target.name!r} is not available here: {reason}", hint="`kiln targets` shows what is")
    if options.precision not in target.precisions:
        raise InputError(
            f"target {target.name!r} does not support {options.precision}",
            hint=f"it supports {', '.join(target.precisions)}",
        )
    return target


def optimize(model_arg: Path, outdir: Path, options: Options, force: bool, progress: Progress) -> dict:
    """Run the whole job; returns the report. Raises VerificationFailed after writing OUTDIR if parity fails."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    report = new_report("optimize")
    target = choose_target(options)
    chosen_passes = pass_pipeline(options)
    model_path = find_model(model_arg)
    check_outdir(outdir, model_path, force)

    t = time.perf_counter()
    with progress.stage(f"load {model_path}"):
        model = load_model(model_path)
        source = {"path": str(model_path), "format": "onnx", "hash": content_hash(model),
                  "nodes": passes.count_nodes(model), "opset": model.opset_imports.get("", None)}  # fmt: skip
        inputs = input_specs(model)
        profile, notes = build_profile(inputs, options.shapes, model.metadata_props.get(SHAPES_METADATA_KEY))
        for note in notes:
            progress.line(f"kiln: note: {note}")
        reference = reference_session(model_path) if options.verify or options.verify_each else None
    timings["load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model, records = _run_passes(model, chosen_passes, options, profile, reference, progress)
    timings["passes_s"] = time.perf_counter() - t

    with staged_dir(outdir) as stage:
        t = time.perf_counter()
        with progress.stage(f"build {target.name} engine"):
            model_files = save_model(model, stage / "model.onnx")
            engine_dir = stage / ENGINE_DIR
            engine_dir.mkdir()
            target.build(stage / "model.onnx", engine_dir, profile)
            engine = target.load(engine_dir)
        timings["build_s"] = time.perf_counter() - t

        t = time.perf_counter()
        checks = []
        if options.verify:
            with progress.stage(f"verify at {len(profile.corners())} shape(s)"):
                checks = verify_engine(engine, reference, profile, options.tolerance(), options.seed)
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


def _fmt_shapes(shapes: dict) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in shapes.items())


def _run_passes(model: ir.Model, chosen, options: Options, profile, reference, progress: Progress):
    verifier = StepVerifier(reference, profile, options.seed) if options.verify_each else None
    fp16_started = False

    def before(pass_: passes.KilnPass) -> None:
        progress.line(f"kiln: pass {pass_.name}")

    def after(record: passes.PassRecord, current: ir.Model) -> None:
        nonlocal fp16_started
        fp16_started |= record.name == "fp16"
        if verifier is None:
            return
        tolerance = options.tolerance() if fp16_started else TOLERANCES["fp32"]
        problem = verifier.check(current, tolerance)
        if problem:
            raise KilnError(f"--verify-each: after pass {record.name!r}, {problem}")

    manager = passes.PassManager(chosen, before_each=before, after_each=after)
    try:
        return manager.run(model)
    except passes.PassFailed as exc:
        raise KilnError(str(exc), hint="rerun with --debug for the traceback, or disable the pass") from exc
