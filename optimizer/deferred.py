"""`kiln verify OUTDIR`: finish, on the GPU, an engine `kiln optimize` built on a machine without it.

A deferred build (Target.defer) ran every pass and wrote the model, a manifest marked not yet verified
and the verification cases with the original's outputs (kiln-verify.npz). Here the target's build runs for
real on this machine (the ONNX Runtime session's offline optimization, the GPU fingerprint), the engine
is verified on those cases to the tolerance the build chose, benchmarked, and the manifest and reports
say so. The new OUTDIR replaces the old one whole, or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from kiln import targets
from kiln.optimizer.bench import bench_or_note, compute_format, cost_section
from kiln.optimizer.errors import InputError, VerificationFailed
from kiln.optimizer.outdir import ENGINE_DIR, KILN_ENTRIES, REPORT_FILE, staged_dir
from kiln.optimizer.progress import Progress
from kiln.optimizer.report import write_reports
from kiln.optimizer.verify import DEFERRED_NOTE, EXPECTED_FILE, load_expected, verify_engine
from kiln.targets.gpu import fingerprint


def verify_deferred(outdir: Path, bench_runs: int, progress: Progress) -> dict:
    """Build, verify and benchmark OUTDIR's deferred engine here; returns the new report. Raises
    VerificationFailed (after writing OUTDIR) when it does not match the original's outputs."""
    report = _read_report(outdir)
    config = targets.read_manifest(outdir / ENGINE_DIR)
    try:
        target = targets.get_target(config.target)
    except KeyError as exc:
        raise InputError(f"{outdir}'s engine is for {exc.args[0]}", hint="verify it with the kiln that built it") from None
    level = config.provider_options.get("trt_builder_optimization_level")
    if level is not None and hasattr(target, "optimization_level"):  # as the deferred build was asked for
        target = dataclasses.replace(target, optimization_level=int(level))
    reason = target.available()
    if reason:
        raise InputError(f"target {target.name!r} does not run here, so {outdir} cannot be verified here: {reason}",
                         hint=f"run `kiln verify` on a machine where {target.name} runs (`kiln targets`)")  # fmt: skip
    verifying = report["verification"]["enabled"]  # a deferred --no-verify build has no cases
    expected = load_expected(outdir / EXPECTED_FILE) if verifying else []
    foreign = sorted(p.name for p in outdir.iterdir() if p.name not in KILN_ENTRIES)
    if foreign:
        raise InputError(f"{outdir} also holds {', '.join(foreign[:5])}, which kiln did not write; verifying replaces the folder",
                         hint="move them out of it first")  # fmt: skip
    with staged_dir(outdir) as stage:
        for path in outdir.iterdir():
            if path.is_file():
                shutil.copy2(path, stage / path.name)
        (stage / ENGINE_DIR).mkdir()
        with progress.stage(f"build the {target.name} engine"):
            built = target.build_for(stage / "model.onnx", stage / ENGINE_DIR, config.profile, config.precision, config.alignment, config.profiles)
            engine = targets.load_engine(stage / ENGINE_DIR)
        with progress.stage(f"verify at {len(expected)} shape(s)"):
            checks = verify_engine(engine, expected, report["verification"]["tolerance"])
        passed = all(c.passed for c in checks)
        latency = []
        # Not the deferral's note any more; the benchmark's own notes (an engine that fails on random inputs).
        report["notes"] = [n for n in report["notes"] if not n.startswith(DEFERRED_NOTE)]
        if passed and bench_runs:
            with progress.stage(f"benchmark ({bench_runs} runs per shape)"):
                latency = bench_or_note(engine, bench_runs, 2, report["verification"]["seed"], report["notes"])
        machine = fingerprint()
        report["status"] = ("ok" if passed else "verification-failed") if verifying else "unverified"
        report["verification"].update(passed=passed if verifying else None, shapes=[c.to_json() for c in checks])
        report["target"].update(build_config=built.to_json(), files=[f"{ENGINE_DIR}/{p.name}" for p in sorted((stage / ENGINE_DIR).iterdir())])
        report["latency"] = latency
        report["cost"] = cost_section(report.get("work"), latency, engine, compute_format(report))
        report["verified_on"] = machine
        report["notes"].append(f"built by `kiln verify` on {machine.get('gpu', 'this machine')}: the build deferred to its GPU is complete")
        write_reports(stage, report)
    if not passed:
        failed = [c for c in checks if not c.passed]
        raise VerificationFailed(f"verification failed at {len(failed)} of {len(checks)} shape(s); first at the {failed[0].corner} shape",
                                 hint=f"see {outdir / 'report.md'}")  # fmt: skip
    return report


def _read_report(outdir: Path) -> dict:
    path = outdir / REPORT_FILE
    if not path.is_file():
        raise InputError(f"{outdir} is not a kiln optimize output: {REPORT_FILE} is missing", hint="pass the OUTDIR `kiln optimize -o` wrote")
    try:
        report = json.loads(path.read_text())
        report["verification"]["tolerance"], report["notes"]  # noqa: B018 - what verifying needs
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is damaged ({type(exc).__name__})", hint="rebuild with `kiln optimize`") from None
    return report
