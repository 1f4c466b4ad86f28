"""`kiln run`: open the engine of a kiln OUTDIR and run it on named arrays."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from kiln import targets
from kiln.calibration import DataError, check_finite, read_npz
from kiln.optimizer.errors import InputError, first_line
from kiln.optimizer.outdir import ENGINE_DIR, REPORT_FILE, atomic_file


@contextlib.contextmanager
def engine_errors():
    """An engine that cannot load or cannot take its inputs is the user's input problem (exit 2)."""
    try:
        yield
    except targets.EngineError as exc:
        raise InputError(exc.message, hint=exc.hint) from None


def engine_dir(path: Path) -> Path:
    """The engine directory of a kiln OUTDIR, or path itself when it is one."""
    if not path.exists():
        raise InputError(f"{path}: no such directory", hint="pass the OUTDIR that `kiln optimize -o` wrote")
    return path / ENGINE_DIR if (path / ENGINE_DIR).is_dir() else path


def open_engine(path: Path, cuda_stream: int | None = None) -> targets.Engine:
    """The engine in a kiln OUTDIR (or in its engine/ directory), on cuda_stream if it runs on a GPU."""
    with engine_errors():
        return targets.load_engine(engine_dir(path), cuda_stream)


def run_engine(outdir: Path, inputs: Path, output: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    if output.is_dir():
        raise InputError(f"--output {output} is a directory", hint="give a file name, e.g. out.npz")
    engine = open_engine(outdir)
    try:
        feeds = read_npz(inputs)
    except DataError as exc:
        raise InputError(str(exc)) from None
    try:
        check_finite(feeds, str(inputs))
    except DataError as exc:
        raise InputError(str(exc), hint="check what wrote the inputs; an engine computes nothing useful from NaN or infinity") from None
    with engine_errors():
        warnings = engine.check_feeds(feeds, str(inputs))
    try:
        results = engine.run(feeds)
    except Exception as exc:
        if not warnings:
            raise  # at a shape the engine was verified at, a failure is kiln's
        raise InputError(f"the engine failed on {inputs}, at a shape it was not built for: {first_line(exc)}",
                         hint=f"{warnings[0]}; rebuild with --shapes covering it")  # fmt: skip
    with atomic_file(output) as tmp, open(tmp, "wb") as f:
        np.savez(f, **results)
    return results, build_warnings(outdir) + warnings


def build_report(path: Path) -> dict:
    """The report.json of the OUTDIR holding this engine (path: the OUTDIR or its engine directory), or {}."""
    root = path if (path / ENGINE_DIR).is_dir() else path.parent
    try:
        report = json.loads((root / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def build_warnings(path: Path) -> list[str]:
    """What the OUTDIR's report says against trusting its engine (path: the OUTDIR or its engine
    directory): a failed or skipped verification."""
    root = path if (path / ENGINE_DIR).is_dir() else path.parent
    status = build_report(path).get("status")
    if status == "verification-failed":
        return [f"this engine failed verification when it was built, so its outputs may be wrong; see {root / 'report.md'}"]
    if status == "unverified":
        return ["this engine was built with --no-verify: nothing has checked its outputs against the model's"]
    if status == "not-verified":
        return [f"this engine was built without its GPU and is not yet verified: run `kiln verify {root}` on a machine where its target runs"]
    return []
