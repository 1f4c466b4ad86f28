"""`kiln build MATRIX.toml -o OUTDIR`: a CI pipeline's engines, one `kiln optimize` per cell of models x
targets x precisions x quantization settings, each through the engine cache, with one summary for all.

    models = ["film", {path = "dit", name = "dit-xl", shapes = {batch = "1..8"}}]   # relative to the file
    targets = ["cpu", "h100"]
    precisions = ["fp32", "fp16"]
    quantize = ["none", "int8"]        # optional; "none" is no quantization
    profile_from = "phone"             # optional; a preset or a request file (--profile-from); per model too
    profiles = 2                       # optional; how many profiles profile_from makes (--profiles; default auto)
    [shapes]                           # optional; every model's dims (a model's own shapes win)
    height = "64..256"

Each cell goes to OUTDIR/<model>-<target>-<precision>[-<quantize>]/, and OUTDIR/build.json holds every
cell's status, engine, verification, latency and cost. A GPU cell on a machine without that GPU is
built and "not-verified" (`kiln verify` finishes it on the GPU). A cell that cannot be built here
(a TensorRT plan without TensorRT), or which the target refuses (bf16 on a T4), is "skipped" with the
reason, not failed, unless --strict.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
import tomllib
from pathlib import Path

from kiln.optimizer.bench import opt_row
from kiln.optimizer.config import FORMATS, MAX_PROFILES, PRECISIONS, Options, validate
from kiln.optimizer.errors import EXIT_INTERNAL, EXIT_VERIFY_FAILED, InputError, KilnError, VerificationFailed, first_line
from kiln.optimizer.outdir import atomic_file, check_not_link
from kiln.optimizer.progress import Progress
from kiln.targets import Profile

SUMMARY = "build.json"
SUMMARY_SCHEMA = "kiln-build/1"
KEYS = ("models", "targets", "precisions", "quantize", "shapes", "profile_from", "profiles")
MODEL_KEYS = ("path", "name", "shapes", "profile_from")


@dataclasses.dataclass(frozen=True)
class Cell:
    model: Path
    model_name: str
    target: str
    precision: str
    quantize: str | None
    shapes: tuple[str, ...]  # NAME=RANGE
    profile_from: str | None = None  # request shapes (a file, relative to the matrix) or a preset
    profiles: int | str = "auto"

    @property
    def name(self) -> str:
        return "-".join([self.model_name, self.target, self.precision, *([self.quantize] if self.quantize else [])])

    def options(self) -> Options:
        options = Options(target=self.target, precision=self.precision, precision_chosen=True, quantize=self.quantize,
                          shapes=[("matrix", s) for s in self.shapes], profile_from=self.profile_from, profiles=self.profiles)  # fmt: skip
        validate(options)
        return options


def read_matrix(path: Path) -> list[Cell]:
    """The cells of a matrix file, or an InputError (exit 2) naming what is wrong in it."""
    where = f"matrix {path}"
    if not path.is_file():
        raise InputError(f"{where}: no such file", hint="give the path of a matrix TOML file (`kiln build --help`)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{where} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}", hint=f"known keys: {', '.join(KEYS)} (README, `kiln build`)")
    lists = {}
    for key, required, allowed in (("models", True, None), ("targets", True, None), ("precisions", True, PRECISIONS),
                                   ("quantize", False, ("none", *FORMATS))):  # fmt: skip
        value = data.get(key, ["none"] if key == "quantize" else None)
        if value is None and required:
            raise InputError(f"{where}: {key} is missing", hint=f"add {key} = [...]; see `kiln build --help`")
        if not isinstance(value, list) or not value:
            raise InputError(f"{where}: {key} must be a non-empty list")
        if key != "models" and not all(isinstance(v, str) for v in value):
            raise InputError(f"{where}: {key} must be a list of names")
        bad = [v for v in value if allowed is not None and v not in allowed]
        if bad:
            raise InputError(f"{where}: {key} has {bad[0]!r}", hint=f"choose from {', '.join(allowed)}")
        lists[key] = value
    from kiln.targets import TARGETS

    unknown_target = [t for t in lists["targets"] if t not in TARGETS and t != "auto"]
    if unknown_target:
        raise InputError(f"{where}: targets has {unknown_target[0]!r}, which is no target", hint="`kiln targets` lists them")
    profiles = data.get("profiles", "auto")
    if profiles != "auto" and (type(profiles) is not int or not 1 <= profiles <= MAX_PROFILES):
        raise InputError(f"{where}: profiles is {profiles!r}", hint=f"give a number of profiles from 1 to {MAX_PROFILES}, or \"auto\"")
    shared = _shapes(data.get("shapes", {}), f"{where}: shapes")
    requests = _requests(data.get("profile_from"), path.parent, f"{where}: profile_from")
    models = [_model(entry, path.parent, shared, requests, where) for entry in lists["models"]]
    alone = [name for _, name, _, requests in models if requests is None]
    if profiles not in ("auto", 1) and alone:
        raise InputError(f"{where}: profiles = {profiles} needs profile_from, which model {alone[0]!r} has none of",
                         hint="add profile_from (for every model, or that one's own), or leave profiles out")  # fmt: skip
    names = [m[1] for m in models]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"{where}: two models are named {repeated[0]!r}", hint="give one a name: {path = \"...\", name = \"...\"}")
    cells = []
    for (model, name, shapes, profile_from), target, precision, quantize in itertools.product(models, lists["targets"], lists["precisions"], lists["quantize"]):
        cells.append(Cell(model, name, target, precision, None if quantize == "none" else quantize, shapes, profile_from, profiles))
    return cells


def _model(entry, root: Path, shared: dict[str, str], requests: str | None, where: str) -> tuple[Path, str, tuple[str, ...], str | None]:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise InputError(f"{where}: a model is a path, or a table with a path (path = \"...\")")
    unknown = sorted(set(entry) - set(MODEL_KEYS))
    if unknown:
        raise InputError(f"{where}: model {entry['path']!r} has unknown key {unknown[0]!r}", hint=f"known keys: {', '.join(MODEL_KEYS)}")
    path = root / entry["path"]
    if not path.exists():
        raise InputError(f"{where}: model {entry['path']!r} does not exist ({path})", hint="model paths are relative to the matrix file")
    name = entry.get("name") or (path.stem if path.is_file() else path.name)
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise InputError(f"{where}: model name {name!r} cannot name a folder")
    shapes = {**shared, **_shapes(entry.get("shapes", {}), f"{where}: model {entry['path']!r} shapes")}
    own = _requests(entry.get("profile_from"), root, f"{where}: model {entry['path']!r} profile_from")
    return path, name, tuple(f"{dim}={spec}" for dim, spec in shapes.items()), own or requests


def _requests(value, root: Path, where: str) -> str | None:
    """profile_from: a preset's name, or a request file relative to the matrix."""
    from kiln.optimizer.profile_synthesis import PRESETS

    if value is None or value in PRESETS:
        return value
    if not isinstance(value, str) or not (root / value).is_file():
        raise InputError(f"{where}: {value!r} is no file (relative to the matrix) and no preset", hint=f"presets: {', '.join(PRESETS)}")
    return str(root / value)


def _shapes(table, where: str) -> dict[str, str]:
    if not isinstance(table, dict) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in table.values()):
        raise InputError(f"{where} must be a table of NAME = \"MIN..MAX\" (or a size)")
    return {str(k): str(v) for k, v in table.items()}


def build(matrix: Path, outdir: Path, keep_going: bool, strict: bool, progress: Progress) -> dict:
    """Build every cell; returns the summary (also written to OUTDIR/build.json) with its exit code."""
    from kiln.optimizer.optimize import optimize

    cells = read_matrix(matrix)
    check_not_link(outdir, "output directory")
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"output path {outdir} exists and is a file", hint="choose a directory path for -o")
    rows, stop = [], False
    for i, cell in enumerate(cells, 1):
        row = {"cell": cell.name, "model": str(cell.model), "target": cell.target, "precision": cell.precision,
               "quantize": cell.quantize, "shapes": list(cell.shapes), "engine": None, "status": "not run", "reason": None,
               "verified": None, "latency_ms": None, "usd_per_1000_results": None, "cache": None, "seconds": 0.0}  # fmt: skip
        rows.append(row)
        if stop:
            continue
        progress.line(f"cell {i}/{len(cells)}: {cell.name}")
        started = time.perf_counter()
        try:
            report = optimize(cell.model, outdir / cell.name, _chosen(cell), False, progress)
        except _Skipped as exc:
            row.update(status="failed" if strict else "skipped", reason=exc.reason)
        except VerificationFailed as exc:
            row.update(status="verification-failed", reason=exc.message, engine=str(outdir / cell.name))
        except KilnError as exc:
            row.update(status="failed", reason=exc.message)
        except Exception as exc:  # an import or build that broke: the cell fails, the matrix goes on with --keep-going
            row.update(status="failed", reason=f"{type(exc).__name__}: {first_line(exc)}")
        else:
            row.update(status=report["status"], engine=str(outdir / cell.name), **_figures(report))
        row["seconds"] = round(time.perf_counter() - started, 3)
        if row["status"] not in ("ok", "not-verified", "skipped"):
            progress.line(f"cell {cell.name}: {row['status']}: {row['reason']}")
            stop = not keep_going
    counts = {status: sum(r["status"] == status for r in rows) for status in ("ok", "not-verified", "skipped", "verification-failed", "failed", "not run")}
    # Cells are "not run" only after a failure, which sets the code.
    code = EXIT_INTERNAL if counts["failed"] else EXIT_VERIFY_FAILED if counts["verification-failed"] else 0
    summary = {"schema": SUMMARY_SCHEMA, "matrix": str(matrix), "outdir": str(outdir), "cells": rows, "counts": counts, "exit_code": code}
    outdir.mkdir(parents=True, exist_ok=True)
    with atomic_file(outdir / SUMMARY) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


class _Skipped(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _chosen(cell: Cell) -> Options:
    """The cell's options, or _Skipped when its target cannot build it here (a matrix product, not an error)."""
    from kiln.optimizer.optimize import choose_target

    options = cell.options()
    try:
        choose_target(options, deferring=True)
    except InputError as exc:
        raise _Skipped(exc.message) from None
    return options


def _figures(report: dict) -> dict:
    """What build.json says of a built cell: verification, latency at opt, cost where measured, cache."""
    checks = report["verification"]["shapes"]
    latency = opt_row(report.get("latency") or [], Profile.from_json(report["profile"]))
    measured = next((r for r in (report.get("cost") or {}).get("rows", []) if r.get("basis") == "measured"), None)
    return {
        "verified": f"{sum(c['passed'] for c in checks)}/{len(checks)}" if checks else None,
        "latency_ms": latency["median_ms"] if latency else None,
        "usd_per_1000_results": measured["usd_per_1000_results"] if measured else None,
        "cache": (report.get("cache") or {}).get("status"),
    }


def summary_text(summary: dict) -> str:
    lines = [f"{'cell':<40} {'status':<20} {'verified':>8} {'ms':>9} {'cache':>5}  reason"]
    for r in summary["cells"]:
        ms = f"{r['latency_ms']:.3f}" if r["latency_ms"] is not None else "-"
        lines.append(f"{r['cell']:<40} {r['status']:<20} {r['verified'] or '-':>8} {ms:>9} {r['cache'] or '-':>5}  {r['reason'] or ''}")
    counts = ", ".join(f"{n} {status}" for status, n in summary["counts"].items() if n)
    return "\n".join([*lines, "", f"{counts}; summary: {Path(summary['outdir']) / SUMMARY}"])

