"""What `kiln compare` writes: compare.json (schema-versioned, for CI), compare.md (the table, fastest
first, Pareto-optimal points marked), and through compare_plots pareto.png and samples.png."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

from kiln.optimizer.outdir import atomic_file
from kiln.targets.versions import library_versions

SCHEMA, SCHEMA_VERSION = "kiln-compare", 1
STATUSES = ("ok", "verification-failed", "budget-not-met", "error", "skipped")


def summary(model_arg: Path, sweep, target, rows: list[dict]) -> dict:
    """compare.json: every row with its Pareto mark and its speed against the baseline."""
    rows = [_finite(r) for r in rows]  # copies, with NaN metrics (a model whose outputs are NaN) as None
    baseline = _ratio_baseline(rows)
    for row in rows:
        row["pareto"] = False
        row["speedup"] = (baseline["latency"]["median_ms"] / row["latency"]["median_ms"]
                          if baseline and row["status"] == "ok" and row["latency"] else None)  # fmt: skip
    metric = quality_metric(rows)
    for row in pareto(rows, metric):
        row["pareto"] = True
    engines = [r for r in rows if r["kind"] == "engine"]
    counts = {"points": len(engines), **{s: sum(r["status"] == s for r in engines) for s in STATUSES},
              "cached": sum(bool(r.get("cached")) for r in engines),
              "built": sum(r["status"] != "skipped" and not r.get("cached") for r in engines)}  # fmt: skip
    counts["failed"] = counts["error"] + counts["verification-failed"] + counts["budget-not-met"]
    quality_on = next((r["quality"]["on"] for r in rows if r.get("quality")), None)
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "command": "compare", "model": str(model_arg),
            "target": target.name, "device": device_description(target), "baseline": baseline["label"] if baseline else None,
            "quality_metric": metric, "quality_on": quality_on,
            "reference": "the fp32 model on ONNX Runtime's CPU, graph optimizations off",
            "shared_flags": sweep.base_flags, "counts": counts, "points": rows, "versions": library_versions()}  # fmt: skip


def device_description(target) -> str:
    if getattr(target, "device", "cpu") == "cuda":
        from kiln.targets.gpu import device_name

        return device_name() or "an NVIDIA GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _ratio_baseline(rows: list[dict]) -> dict | None:
    """What ratios are against: the fastest baseline row that ran (torch.compile where it did)."""
    ran = [r for r in rows if r["kind"] == "baseline" and r["status"] == "ok" and r["latency"]]
    return min(ran, key=lambda r: r["latency"]["median_ms"]) if ran else None


def quality_metric(rows: list[dict]) -> str:
    """PSNR where every measured row has it (image outputs), else relative L2."""
    measured = [r["quality"] for r in rows if r.get("quality")]
    return "psnr" if measured and all("psnr" in q for q in measured) else "rel_l2"


def pareto(rows: list[dict], metric: str) -> list[dict]:
    """The rows no other row beats on both latency and quality (and ties on neither)."""
    higher = metric in ("psnr", "ssim")
    ok = [r for r in rows if r["status"] == "ok" and r["latency"] and r.get("quality") and r["quality"].get(metric) is not None]

    def value(r) -> tuple[float, float]:
        q = r["quality"][metric]
        return r["latency"]["median_ms"], (-q if higher else q)

    return [r for r in ok if not any(value(o)[0] <= value(r)[0] and value(o)[1] <= value(r)[1] and value(o) != value(r) for o in ok)]


def write_outputs(outdir: Path, result: dict, reference_key: str, plots: bool) -> None:
    _write_text(outdir / "compare.json", to_json(result))
    if plots:
        from kiln.optimizer.compare_plots import draw

        result["plots"] = draw(outdir, result, reference_key)
        _write_text(outdir / "compare.json", to_json(result))
    _write_text(outdir / "compare.md", markdown(result))


def to_json(data) -> str:
    """Strict JSON: a metric that is NaN or infinite (a model whose outputs are) becomes null."""
    return json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(result: dict) -> str:
    counts, baseline = result["counts"], result["baseline"]
    rows = result["points"]
    measured = sorted((r for r in rows if r["status"] == "ok" and r["latency"]), key=lambda r: r["latency"]["median_ms"])
    rest = [r for r in rows if r not in measured]
    out = [f"# kiln compare: {Path(result['model']).name} on {result['target']} ({result['device']})", "",
           f"{counts['points']} points: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped; "
           f"{counts['built']} built in this run, {counts['cached']} from earlier runs (same model, options, target and versions)"
           + (f"; importing the model and running the fp32 reference took {result['prepare_s']:.0f} s" if result.get("prepare_s") else "")
           + ".", ""]  # fmt: skip
    if result["quality_on"]:
        out += [f"Quality against {result['reference']}, on {result['quality_on']}. "
                "★: Pareto-optimal (no other row is both at least as fast and at least as good)." + (
                f" Speed-up against **{baseline}**, the fastest baseline." if baseline else ""), ""]  # fmt: skip
    headers = ["", "point", "median ms", "p90 ms", f"× {baseline}" if baseline else "×", "engine MB", "device MB",
               "PSNR dB", "SSIM", "rel L2", "build s"]  # fmt: skip
    table = []
    for r in measured:
        q = r.get("quality") or {}
        lat = r["latency"]
        table.append(["★" if r["pareto"] else "", _label(r), _f(lat["median_ms"], ".3f"), _f(lat["p90_ms"], ".3f"), _f(r["speedup"], ".2f"),
                      _f(r["engine_mb"], ".1f"), _f(r["device_memory_mb"], ".0f"), _f(q.get("psnr"), ".2f"), _f(q.get("ssim"), ".4f"),
                      _f(q.get("rel_l2"), ".3g"), _f(r.get("seconds"), ".0f")])  # fmt: skip
    out += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(map(str, row)) + " |" for row in table] + [""]
    io = {r["latency"]["io"] for r in measured}
    out += [f"Latency: median and p90 of {', '.join(sorted({str(r['latency']['runs']) for r in measured}))} runs at the opt shape, "
            f"inputs and outputs on the {' and '.join(sorted('device' if i == 'device' else 'host' for i in io))}. "
            "Build s: the point's build and measurement (a baseline's: loading, compiling, measuring). Engine MB: the engine's files. Device MB: device memory held by an engine after its runs (its arena's "
            "high-water mark, from cudaMemGetInfo), or the peak torch allocated for a PyTorch baseline.", ""] if measured else []  # fmt: skip
    if rest:
        out += ["## Not measured", ""]
        out += [f"- {_label(r)}: **{r['status']}**: {r['error'] or 'verification failed'}" for r in rest] + [""]
    commands = [r for r in measured if r["pareto"] and r.get("command")]
    if commands:
        out += ["## To build a Pareto-optimal point", ""] + [f"- {_label(r)}: `{r['command']}` (or copy `{r['dir']}/`)" for r in commands] + [""]
    plots = result.get("plots") or {}
    if plots:
        out += ["## Plots", ""] + [f"- `{name}`: {note}" for name, note in plots.items()]
    return "\n".join(out) + "\n"


def _label(row: dict) -> str:
    return f"{row['label']} (baseline)" if row["kind"] == "baseline" else f"`{row['label']}`"
