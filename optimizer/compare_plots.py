"""pareto.png (quality against latency, one labelled dot per row) and samples.png (the same inputs through
the reference and each row, with the difference from the reference), with matplotlib (kiln-ml[report])."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from kiln.optimizer.outdir import atomic_file

_METRIC_AXIS = {"psnr": "PSNR against fp32 (dB), higher is better", "rel_l2": "relative L2 error against fp32, lower is better"}


def draw(outdir: Path, result: dict, reference_key: str) -> dict[str, str]:
    """Both plots; what each shows, or why it was not drawn, by file name."""
    if importlib.util.find_spec("matplotlib") is None:
        reason = "not drawn: matplotlib is not installed (pip install 'kiln-ml[report]')"
        return {"pareto.png": reason, "samples.png": reason}
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    return {"pareto.png": _pareto(outdir / "pareto.png", result), "samples.png": _samples(outdir, result, reference_key)}


def _save(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def _pareto(path: Path, result: dict) -> str:
    import matplotlib.pyplot as plt

    metric = result["quality_metric"]
    rows = [r for r in result["points"] if r["status"] == "ok" and r["latency"] and (r.get("quality") or {}).get(metric) is not None]
    figure, axes = plt.subplots(figsize=(8, 5.5))
    if not rows:
        axes.text(0.5, 0.5, "no point was measured", ha="center", va="center", transform=axes.transAxes)
        _save(figure, path)
        return "empty: no point was measured"
    for row in rows:
        x, y = row["latency"]["median_ms"], _y(row, metric)
        baseline = row["kind"] == "baseline"
        axes.scatter([x], [y], s=70, marker="s" if baseline else "o", zorder=3,
                     color="tab:gray" if baseline else ("tab:red" if row["pareto"] else "tab:blue"))  # fmt: skip
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["latency"]["median_ms"])
    if len(front) > 1:
        axes.step([r["latency"]["median_ms"] for r in front], [_y(r, metric) for r in front], where="post",
                  color="tab:red", alpha=0.5, zorder=2, label="Pareto front")  # fmt: skip
    latencies = [r["latency"]["median_ms"] for r in rows]
    if max(latencies) / max(min(latencies), 1e-9) > 20:
        axes.set_xscale("log")
    if metric == "rel_l2":
        values = [_y(r, metric) for r in rows]
        axes.set_yscale("log")
        axes.set_ylim(max(values) * 3, min(values) / 3)  # inverted: better is up, as with PSNR
    _label_points(figure, axes, rows, metric)
    io = "on the device" if any(r["latency"]["io"] == "device" for r in rows) else "host to host"
    axes.set_xlabel(f"median latency (ms, {io}), lower is better")
    axes.set_ylabel(_METRIC_AXIS[metric])
    axes.set_title(f"{Path(result['model']).name} on {result['target']} ({result['device']})\nquality on {result['quality_on']}", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.scatter([], [], marker="o", color="tab:red", label="Pareto-optimal engine")
    axes.scatter([], [], marker="o", color="tab:blue", label="other engine")
    if any(r["kind"] == "baseline" for r in rows):
        axes.scatter([], [], marker="s", color="tab:gray", label="framework baseline")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside: no dot or label under it
    _save(figure, path)
    return f"{metric} against median latency, {len(rows)} rows, {len(front)} Pareto-optimal"


# Where a dot's label may go, in points from the dot: tried in order until one overlaps no other label.
_OFFSETS = [(6, 5), (6, -13), (-6, 5), (-6, -13), (6, 16), (6, -24), (-6, 16), (-6, -24), (6, 28), (6, -36)]


def _y(row: dict, metric: str) -> float:
    """The row's quality on the plot's axis (a relative error of 0 drawn at 1e-9, on a log axis)."""
    value = row["quality"][metric]
    return max(value, 1e-9) if metric == "rel_l2" else value


def _label_points(figure, axes, rows: list[dict], metric: str) -> None:
    """One label per dot, moved around it until it overlaps no label placed before (dots close in
    latency and quality would otherwise print over each other)."""
    placed = []
    renderer = figure.canvas.get_renderer()
    for row in sorted(rows, key=lambda r: (r["latency"]["median_ms"], -_y(r, metric))):
        text = row.get("short_label", row["label"]) + (" (baseline)" if row["kind"] == "baseline" else "")
        point = (row["latency"]["median_ms"], _y(row, metric))
        for dx, dy in _OFFSETS:
            label = axes.annotate(text, point, textcoords="offset points", xytext=(dx, dy), fontsize=8,
                                  ha="left" if dx > 0 else "right")  # fmt: skip
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            label.remove()
        else:
            label = axes.annotate(text, point, textcoords="offset points", xytext=(6, 5), fontsize=8)
            box = label.get_window_extent(renderer)
        placed.append(box)


def _rgb(picture: np.ndarray, low: float, high: float) -> np.ndarray:
    """[H, W, 3] in [0, 1] of a [C, H, W], [H, W, C] or [C, F, H, W] (first frame) array, channels 0-2
    (or the one channel in grey), mapped through the reference's [low, high]."""
    x = np.asarray(picture, np.float64)
    if x.ndim == 4:
        x = x[:, 0]
    if x.ndim == 2:
        x = x[None]
    if x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3, 4):
        x = x.transpose(2, 0, 1)
    x = x[:3] if x.shape[0] >= 3 else np.repeat(x[:1], 3, axis=0)
    return np.clip((x.transpose(1, 2, 0) - low) / max(high - low, 1e-12), 0, 1)


def _difference(picture: np.ndarray, reference: np.ndarray, span: float) -> np.ndarray:
    """|picture - reference| averaged over channels (and frames), in units of the reference's range."""
    diff = np.abs(np.asarray(picture, np.float64) - reference) / max(span, 1e-12)
    while diff.ndim > 2:
        axis = 0 if diff.shape[0] < diff.shape[-1] or diff.shape[-1] not in (1, 3, 4) else -1
        diff = diff.mean(axis=axis)
    return diff


def _samples(outdir: Path, result: dict, reference_key: str) -> str:
    import matplotlib.pyplot as plt

    from kiln.optimizer.compare import PICTURES_FILE, REFERENCE_FILE, load_pictures

    reference = load_pictures(outdir / REFERENCE_FILE, reference_key) or []
    rows = sorted((r for r in result["points"] if r["status"] in ("ok", "verification-failed", "budget-not-met") and r.get("dir")),
                  key=lambda r: r["latency"]["median_ms"] if r["latency"] else float("inf"))  # fmt: skip
    shown = [(r, p) for r in rows if (p := load_pictures(outdir / r["dir"] / PICTURES_FILE, r["key"]))
             and len(p) == len(reference) and all(np.shape(a) == np.shape(b) for a, b in zip(p, reference))]  # fmt: skip
    path = outdir / "samples.png"
    if not reference or not shown:
        figure, axes = plt.subplots(figsize=(4, 1))
        axes.axis("off")
        axes.text(0.5, 0.5, "no outputs to show", ha="center", va="center")
        _save(figure, path)
        return "empty: no outputs to show"
    count = len(reference)
    lows = [float(np.min(p)) for p in reference]
    highs = [float(np.max(p)) for p in reference]
    # One colour scale for every difference map, so that a darker map is a closer engine.
    diffs = [[_difference(p, ref, hi - lo) for p, ref, lo, hi in zip(pictures, reference, lows, highs)] for _, pictures in shown]
    vmax = max(float(np.percentile(d, 99.5)) for row in diffs for d in row) or 1e-6
    figure, grid = plt.subplots(1 + len(shown), 2 * count, figsize=(1.6 * 2 * count + 2.5, 1.6 * (1 + len(shown)) + 0.6), squeeze=False,
                                layout="constrained")  # fmt: skip
    for j in range(count):
        grid[0, j].imshow(_rgb(reference[j], lows[j], highs[j]), interpolation="nearest")
        grid[0, count + j].axis("off")
    grid[0, 0].set_ylabel("fp32 reference", fontsize=8, rotation=0, ha="right", va="center")
    image = None
    for i, ((row, pictures), row_diffs) in enumerate(zip(shown, diffs), start=1):
        for j in range(count):
            grid[i, j].imshow(_rgb(pictures[j], lows[j], highs[j]), interpolation="nearest")
            image = grid[i, count + j].imshow(row_diffs[j], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        q = row.get("quality") or {}
        psnr = f"\nPSNR {q['psnr']:.1f} dB" if q.get("psnr") is not None else (f"\nrel L2 {q['rel_l2']:.2g}" if q.get("rel_l2") is not None else "")
        grid[i, 0].set_ylabel(row.get("short_label", row["label"]) + (" (baseline)" if row["kind"] == "baseline" else "") + psnr,
                              fontsize=8, rotation=0, ha="right", va="center")  # fmt: skip
    for axes in grid.flat:
        axes.set_xticks([])
        axes.set_yticks([])
    grid[0, count].set_title("|difference| from the reference →", fontsize=8, loc="left")
    figure.colorbar(image, ax=grid[:, count:].ravel().tolist(), shrink=0.6, label="|difference| / reference range")
    figure.suptitle(f"{Path(result['model']).name}: the same inputs through each row ({result['quality_on']}); "
                    "channels 0-2 as RGB, scaled as the reference", fontsize=9)  # fmt: skip
    _save(figure, path)
    return f"{count} samples through the reference and {len(shown)} rows, with |difference| maps on one scale (0 to {vmax:.3g} of the reference's range)"
