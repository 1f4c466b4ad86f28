"""`kiln run` and `kiln bench`: load an engine from an OUTDIR and use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import targets
from calibration import DataError, read_npz
from optimizer.align import AlignedEngine, Alignment
from optimizer.errors import InputError
from optimizer.outdir import atomic_file
from optimizer.pipeline import ENGINE_DIR


def engine_manifest(path: Path) -> tuple[Path, dict]:
    """The engine directory of a kiln OUTDIR (or the engine directory itself) and its manifest."""
    if not path.exists():
        raise InputError(f"{path}: no such directory", hint="pass the OUTDIR that `kiln optimize -o` wrote")
    engine_dir = path / ENGINE_DIR if (path / ENGINE_DIR).is_dir() else path
    try:
        return engine_dir, targets.read_manifest(engine_dir)
    except targets.EngineError as exc:
        raise InputError(str(exc.args[0]), hint="pass the OUTDIR that `kiln optimize -o` wrote") from None


def load_engine(path: Path, cuda_stream: int | None = None) -> targets.Engine:
    """The engine in a kiln OUTDIR (or in its engine/ directory), on cuda_stream if it runs on a GPU."""
    engine_dir, manifest = engine_manifest(path)
    try:
        target = targets.get_target(manifest.get("target", ""))
    except KeyError as exc:
        raise InputError(str(exc.args[0]), hint="pass the OUTDIR that `kiln optimize -o` wrote") from None
    reason = target.available()
    if reason:
        raise InputError(f"the engine in {path} is for target {target.name!r}, not available here: {reason}")
    try:
        engine = target.load(engine_dir, cuda_stream)
    except targets.EngineError as exc:
        raise InputError(str(exc)) from None
    if manifest.get("alignment"):
        engine = AlignedEngine(engine, Alignment.from_json(manifest["alignment"]))
    return engine


def check_feeds(engine: targets.Engine, feeds: dict[str, np.ndarray], source: str) -> list[str]:
    """Raise InputError for inputs the engine cannot take; return warnings for shapes it was not verified at."""
    names = {spec.name for spec in engine.inputs}
    missing, extra = sorted(names - set(feeds)), sorted(set(feeds) - names)
    expected = ", ".join(f"{s.name} {s.dtype} {list(s.shape)}" for s in engine.inputs)
    if missing or extra:
        what = "; ".join(filter(None, [missing and f"missing {missing}", extra and f"unexpected {extra}"]))
        raise InputError(f"{source}: {what}", hint=f"the engine takes {expected}")
    shapes = {k: v.shape for k, v in feeds.items()}
    if isinstance(engine, AlignedEngine):  # the engine runs at the padded size: that is what was verified
        shapes = engine.alignment.padded_shapes(shapes)
    for spec in engine.inputs:
        array, shape = feeds[spec.name], shapes[spec.name]
        if array.dtype.name != spec.dtype:
            raise InputError(f"{source}: input {spec.name!r} is {array.dtype.name}, the engine takes {spec.dtype}")
        if len(shape) != len(spec.shape) or any(isinstance(want, int) and want != got for want, got in zip(spec.shape, shape)):
            padded = f" (padded to {list(shape)})" if shape != array.shape else ""
            raise InputError(f"{source}: input {spec.name!r} has shape {list(array.shape)}{padded}, the engine takes {list(spec.shape)}")
    problem = engine.profile.contains(shapes)
    return [f"{problem}; the engine was not verified at this shape"] if problem else []


def run_engine(outdir: Path, inputs: Path, output: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    engine = load_engine(outdir)
    try:
        feeds = read_npz(inputs)
    except DataError as exc:
        raise InputError(str(exc)) from None
    warnings = check_feeds(engine, feeds, str(inputs))
    results = engine.run(feeds)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as tmp, open(tmp, "wb") as f:
        np.savez(f, **results)
    return results, warnings
