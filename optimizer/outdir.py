"""Atomic writes: build next to the destination, rename into place at the end, never half-write."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kiln.optimizer.errors import InputError

# What `kiln optimize` writes into OUTDIR: model.onnx, ENGINE_DIR/ (the target's engine and its
# manifest), report.json and report.md.
ENGINE_DIR = "engine"
REPORT_FILE = "report.json"
REPORT_SCHEMA = "kiln-report"


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside path; it replaces path only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_kiln_output(directory: Path) -> bool:
    try:
        report = json.loads((directory / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("schema") == REPORT_SCHEMA


def check_outdir(outdir: Path, model_path: Path, force: bool) -> None:
    """Refuse an OUTDIR whose replacement would lose something the user had."""
    if model_path.resolve().is_relative_to(outdir.resolve()):
        raise InputError(
            f"output directory {outdir} holds the input model {model_path}; replacing it would delete the model",
            hint="choose an output directory outside the model's",
        )
    if not outdir.exists():
        return
    if not outdir.is_dir():
        raise InputError(f"output path {outdir} exists and is a file", hint="choose a directory path for -o")
    if any(outdir.iterdir()) and not is_kiln_output(outdir) and not force:
        raise InputError(
            f"output directory {outdir} exists and is not a kiln output; kiln will not replace it",
            hint="choose a new directory, or pass --force to replace it",
        )


@contextlib.contextmanager
def staged_dir(outdir: Path) -> Iterator[Path]:
    """Yield an empty directory beside outdir; it becomes outdir only if the block succeeds."""
    outdir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=outdir.parent, prefix=f".{outdir.name}.kiln-"))
    try:
        yield stage
        backup = None
        if outdir.exists():
            backup = Path(tempfile.mkdtemp(dir=outdir.parent, prefix=f".{outdir.name}.old-"))
            os.replace(outdir, backup / "old")
        os.replace(stage, outdir)
        if backup:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
