"""`kiln compare`: one engine per point of a grid of `kiln optimize` settings, each built by kiln
optimize's own stages (prepare once, then build_point per point) and measured the same way, beside
baseline rows of the framework the model came from.

Each point is stored in OUTDIR/points/KEY, KEY a hash of the model's bytes, the point's options, the
target, and the versions of kiln's code and of the libraries; its point.json is written last, so a
point is either whole or absent. An interrupted sweep resumes where it stopped, and a rerun builds
nothing it has.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from kiln import targets
from kiln.optimizer.bench import opt_row, samples_ms
from kiln.optimizer.compare_grid import GridPoint, Sweep
from kiln.optimizer.compare_report import SCHEMA, to_json
from kiln.optimizer.engine_cache import key_versions, kiln_source_hash, model_hash
from kiln.optimizer.errors import InputError, KilnError, first_line
from kiln.optimizer.onnx_files import find_model
from kiln.optimizer.outdir import ENGINE_DIR, atomic_file, check_not_link, staged_dir
from kiln.optimizer.progress import Progress
from kiln.optimizer.quality import Outputs

POINTS, POINT_FILE, PICTURES_FILE, REFERENCE_FILE = "points", "point.json", "pictures.npz", "reference.npz"
OUTPUTS = ("compare.json", "compare.md", "pareto.png", "samples.png")
ENTRIES = frozenset({*OUTPUTS, POINTS, REFERENCE_FILE})  # everything kiln compare writes into OUTDIR
PICTURES = 4  # samples per row of samples.png
SPLIT_ALL = 2**40  # calibration_set's split_for when a point calibrates on all of --calib


def compare(model_arg: Path, outdir: Path, sweep: Sweep, retry_failed: bool, progress: Progress) -> dict:
    from kiln.optimizer.baselines import baseline_names
    from kiln.optimizer.optimize import choose_target

    target = choose_target(sweep.base)
    if not model_arg.exists():
        find_model(model_arg)  # raises the missing-path error
    _check_outdir(outdir, model_arg)
    with progress.stage(f"hash {model_arg}"):
        environment = {"model": model_hash(model_arg), "target": target.name, "kiln": kiln_source_hash(), "libraries": key_versions()}
    shared = {k: v for k, v in dataclasses.asdict(sweep.base).items() if k in _SHARED_FIELDS}
    entries = [_Entry("engine", p.label, p, _key(environment, dataclasses.asdict(p.options)) if p.options else None) for p in sweep.points]
    entries += [_Entry("baseline", name, None, _key(environment, {"baseline": name, **shared})) for name in baseline_names(model_arg, target)]
    sweep_state = _State(model_arg, outdir, sweep, target, progress, _key(environment, {"reference": True, **shared}))

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kiln-compare-") as work:
        sweep_state.work = Path(work)
        for i, entry in enumerate(entries):
            progress.prefix = f"[{i + 1}/{len(entries)} {entry.label}] "
            row = _cached(outdir, entry, retry_failed)
            if row is not None:
                progress.line(f"{row['status']} (stored in {row['dir']})")
            elif entry.point is not None and entry.point.skipped:
                row = _row(entry, "skipped", error=entry.point.skipped)
                progress.line(f"skipped: {entry.point.skipped}")
            else:
                row = sweep_state.build(entry)
                row["cached"] = False
            rows.append(row)
            _write_tables(outdir, sweep_state, rows, final=False)
        progress.prefix = ""
        result = _write_tables(outdir, sweep_state, rows, final=True)
    return result


# Options every point shares; a baseline's and the reference's keys hold them (they set the inputs).
_SHARED_FIELDS = ("shapes", "profile_from", "profiles", "int_ranges", "verify_inputs", "seed", "calib", "signature", "outputs", "opset", "layout",
                  "align", "trust_pickle", "video_decoder", "bench_runs", "bench_warmup")  # fmt: skip


@dataclasses.dataclass
class _Entry:
    kind: str  # "engine" or "baseline"
    label: str
    point: GridPoint | None
    key: str | None


class _State:
    """The sweep's shared work, done when the first point needs it: the import, the reference's outputs."""

    def __init__(self, model_arg: Path, outdir: Path, sweep: Sweep, target, progress: Progress, reference_key: str):
        self.model_arg, self.outdir, self.sweep, self.target, self.progress = model_arg, outdir, sweep, target, progress
        self.reference_key = reference_key
        self.work: Path | None = None
        self.prepared = None
        self.prepare_s = 0.0  # importing the model and running the reference, when a point needed them

    def _prepare(self):
        from kiln.optimizer.optimize import prepare

        if self.prepared is None:
            prefix, self.progress.prefix = self.progress.prefix, ""
            started = time.perf_counter()
            prepared = prepare(self.model_arg, self.work, self.sweep.base, self.progress)
            held_out = ()
            if self.sweep.base.calib:  # every point measures on the samples held out of the largest split
                held_out = prepared.calibration(self.sweep.base, self.target, self.progress, self.split_for)[0].held_out
            quality = prepared.quality_reference(self.sweep.base, self.progress, held_out)
            _save_pictures(self.outdir / REFERENCE_FILE, _pictures(quality.want), self.reference_key)
            self.prepared, self.progress.prefix = prepared, prefix
            self.prepare_s = time.perf_counter() - started
        return self.prepared

    @property
    def split_for(self) -> int:
        counts = [p.options.calib_samples for p in self.sweep.points if p.options is not None and p.options.quantize]
        return max(counts) if counts and None not in counts else SPLIT_ALL

    def build(self, entry: _Entry) -> dict:
        point_dir = self.outdir / POINTS / entry.key
        self._prepare()  # a model that does not import fails the sweep, not a point
        started = time.perf_counter()
        try:
            with staged_dir(point_dir) as stage:
                row = self._engine(entry, stage, point_dir) if entry.kind == "engine" else self._baseline(entry, stage)
                row.update(key=entry.key, dir=f"{POINTS}/{entry.key}", seconds=time.perf_counter() - started)
                _write_json(stage / POINT_FILE, row)
        except KeyboardInterrupt:
            raise
        except KilnError as exc:
            row = self._failed(entry, point_dir, "error", f"{exc.message}" + (f" ({exc.hint})" if exc.hint else ""), started)
        except Exception as exc:  # a point's failure is its row's; the sweep goes on
            row = self._failed(entry, point_dir, "error", f"internal error: {type(exc).__name__}: {first_line(exc)}", started)
        finally:
            gc.collect()  # the point's engine and sessions hold device memory
        return row

    def _failed(self, entry: _Entry, point_dir: Path, status: str, error: str, started: float) -> dict:
        self.progress.line(f"failed: {error}")
        row = _row(entry, status, error=error)
        row.update(key=entry.key, dir=f"{POINTS}/{entry.key}", seconds=time.perf_counter() - started)
        with staged_dir(point_dir) as stage:
            _write_json(stage / POINT_FILE, row)
        return row

    def _engine(self, entry: _Entry, stage: Path, point_dir: Path) -> dict:
        from kiln.optimizer.optimize import build_point

        options = entry.point.options
        before = _device_memory_mb(self.target)
        built = build_point(self.prepared, stage, point_dir, self.target, options, self.progress, measure_quality=True,
                            split_for=self.split_for if options.calib else None)  # fmt: skip
        after = _device_memory_mb(self.target)
        report = built.report
        quality = report.get("quality") or (report.get("quantization") or {}).get("quality")
        latency = opt_row(report["latency"], self.prepared.profile) or (report["latency"][0] if report["latency"] else None)
        row = _row(entry, built.status, error=built.failure.message if built.failure else None)
        row.update(
            command=_command(self.model_arg, self.sweep, entry.point),
            latency=latency, quality=_headline(quality), quality_detail=quality,
            engine_mb=sum(p.stat().st_size for p in (stage / ENGINE_DIR).rglob("*") if p.is_file()) / 2**20,
            device_memory_mb=None if before is None or after is None else max(0.0, after - before),
            fallback=(report.get("quantization") or {}).get("fallback"),
        )  # fmt: skip
        if built.outputs is not None:
            _save_pictures(stage / PICTURES_FILE, _pictures(built.outputs), entry.key)
        return row

    def _baseline(self, entry: _Entry, stage: Path) -> dict:
        from kiln.optimizer.baselines import open_baseline

        profile, base = self.prepared.profile, self.sweep.base
        feeds = profile.random_inputs(profile.shapes(profile.sizes("opt") if profile.dims else {}), base.seed)
        with self.progress.stage(f"baseline {entry.label}"), open_baseline(entry.label, self.model_arg, self.prepared.model_path,
                                                                         self.target, base) as baseline:  # fmt: skip
            outputs = self.prepared.quality.outputs(baseline.run)
            times = samples_ms(baseline.timer(feeds), base.bench_runs, base.bench_warmup)
            quality = self.prepared.quality.metrics(outputs)
            memory = baseline.peak_memory_mb()
        row = _row(entry, "ok")
        row.update(
            latency={"io": baseline.io, "runs": len(times), "median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
                     "min_ms": float(np.min(times)), "corner": "opt", "shapes": {k: list(v.shape) for k, v in feeds.items()}},
            quality=_headline(quality), quality_detail=quality, engine_mb=None, device_memory_mb=memory,
        )  # fmt: skip
        _save_pictures(stage / PICTURES_FILE, _pictures(outputs), entry.key)
        return row


def _row(entry: _Entry, status: str, error: str | None = None) -> dict:
    return {"schema": SCHEMA, "kind": entry.kind, "label": entry.label, "key": entry.key,
            "short_label": entry.point.short_label if entry.point else entry.label,
            "settings": entry.point.settings if entry.point else {}, "status": status, "error": error, "dir": None,
            "command": None, "latency": None, "quality": None, "quality_detail": None, "engine_mb": None,
            "device_memory_mb": None, "fallback": None, "seconds": 0.0}  # fmt: skip


def _cached(outdir: Path, entry: _Entry, retry_failed: bool) -> dict | None:
    """The stored row of entry, if whole and for this key (and not a failure to retry)."""
    if entry.key is None:
        return None
    try:
        row = json.loads((outdir / POINTS / entry.key / POINT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(row, dict) or row.get("schema") != SCHEMA or row.get("key") != entry.key:
        return None
    if retry_failed and row.get("status") == "error":
        return None
    row["cached"] = True
    return row


def _headline(quality: dict | None) -> dict | None:
    """The figures the table and the plot show: on the sampling loops' final latents for a diffusers
    model, else the worst output on the held-out calibration samples, else on the verification inputs."""
    if not quality:
        return None
    if "sampling" in quality:
        s = quality["sampling"]
        return {"on": f"final latents of {s['samples']} samples ({s['loops']} loops of {s['steps']} steps)",
                **{k: s[k] for k in ("rel_l2", "max_abs", "psnr", "ssim") if k in s}}  # fmt: skip
    held = quality.get("calibration_held_out")
    outputs, on = (held["outputs"], f"{held['samples']} calibration samples held out") if held else (quality["held_out"], "the verification inputs")
    if not outputs:
        return None
    worst = {"on": f"{on}, worst output"}
    for metric, pick in (("rel_l2", max), ("max_abs", max), ("psnr", min), ("ssim", min)):
        values = [m[metric] for m in outputs.values() if metric in m]
        if values:
            worst[metric] = pick(values)
    return worst


def _pictures(outputs: Outputs) -> list[np.ndarray]:
    """Up to PICTURES single images (or videos) of the outputs, for samples.png: the sampling loops'
    final latents, else the first image-like output on the held-out samples, else on the verification inputs."""
    if outputs.latents:
        return [x for batch in outputs.latents for x in batch][:PICTURES]
    for cases in (outputs.held_out, outputs.cases):
        pictures = []
        for case in cases:
            name = next((n for n in sorted(case) if np.ndim(case[n]) >= 4 and min(np.shape(case[n])[-2:]) >= 2), None)
            if name is not None:
                pictures += list(np.asarray(case[name], np.float32))
        if pictures:
            return pictures[:PICTURES]
    return []


def _save_pictures(path: Path, pictures: list[np.ndarray], key: str) -> None:
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), **{f"picture_{i}": np.asarray(p, np.float32) for i, p in enumerate(pictures)})


def load_pictures(path: Path, key: str) -> list[np.ndarray] | None:
    try:
        with np.load(path) as data:
            if str(data["key"]) != key:
                return None
            return [data[f"picture_{i}"] for i in range(len(data.files) - 1)]
    except (OSError, ValueError, KeyError):
        return None


def _command(model_arg: Path, sweep: Sweep, point: GridPoint) -> str:
    import shlex

    return shlex.join(["kiln", "optimize", str(model_arg), "-o", "OUTDIR", *point.command_flags(sweep.base_flags)])


def _write_tables(outdir: Path, state: _State, rows: list[dict], final: bool) -> dict:
    from kiln.optimizer.compare_report import summary, write_outputs

    result = summary(state.model_arg, state.sweep, state.target, rows)
    result["prepare_s"] = state.prepare_s
    write_outputs(outdir, result, state.reference_key, plots=final)
    return result


def _write_json(path: Path, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(to_json(data))


def _check_outdir(outdir: Path, model_arg: Path) -> None:
    """OUTDIR may be new, empty, or an earlier compare's (which this run resumes); nothing else."""
    check_not_link(outdir, "output directory")
    if model_arg.resolve().is_relative_to(outdir.resolve()):
        raise InputError(f"output directory {outdir} holds the input model {model_arg}",
                         hint="choose an output directory outside the model's")  # fmt: skip
    if not outdir.exists():
        return
    if not outdir.is_dir():
        raise InputError(f"output path {outdir} exists and is a file", hint="choose a directory path for -o")
    ours = {p.name for p in outdir.iterdir() if p.name in ENTRIES or any(p.name.startswith(f".{e}.") for e in ENTRIES)}
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in outdir.iterdir() if p.name not in ours)
    if others:
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise InputError(f"output directory {outdir} holds {listed}, which kiln compare did not write",
                         hint="choose a new or empty directory, or an earlier kiln compare's OUTDIR to resume it")  # fmt: skip


def _key(environment: dict, what: dict) -> str:
    text = json.dumps({"environment": environment, "what": what}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _device_memory_mb(target) -> float | None:
    """Device memory in use on the GPU (cudaMemGetInfo, through torch), or None on the CPU or without torch."""
    if getattr(target, "device", "cpu") != "cuda":
        return None
    try:
        import torch

        free, total = torch.cuda.mem_get_info()
    except Exception:  # no torch, or no CUDA for it
        return None
    return (total - free) / 2**20

