"""report.json (the contract for CI, schema-versioned) and report.md (for people)."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.optimizer.outdir import REPORT_FILE, REPORT_SCHEMA, atomic_file
from kiln.targets.versions import library_versions, runtime_versions

SCHEMA_VERSION = 2  # 2: versions from the imported modules, the runtime's distribution and providers, build_config


def new_report(command: str) -> dict:
    return {"schema": REPORT_SCHEMA, "schema_version": SCHEMA_VERSION, "command": command,
            "versions": library_versions(), "runtime": runtime_versions()}  # fmt: skip


def write_reports(directory: Path, report: dict) -> None:
    """report.json and report.md, each whole or not at all."""
    for name, text in ((REPORT_FILE, json.dumps(report, indent=2, sort_keys=True) + "\n"), ("report.md", markdown(report))):
        with atomic_file(directory / name) as tmp:
            tmp.write_text(text)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _dims(shape: list) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _shapes(shapes: dict) -> str:
    return ", ".join(f"{k} {_dims(v)}" for k, v in shapes.items())


def _from_requests(section: dict | None) -> list[str]:
    """--profile-from: the requests, the profiles made of them with their padding waste, and the waste
    with 1 to 4 profiles."""
    if not section:
        return []
    aligned = f" (sizes rounded up to {', '.join(f'{d} {m}' for d, m in section['aligned_to'].items())})" if section["aligned_to"] else ""
    chosen = len(section["profiles"])
    why = f" ({section['rule']})" if section.get("rule") else f" (--profiles {section['asked']})"
    out = ["## Profiles from requests", "",
           f"{section['requests']} requests of {section['shapes']} shapes from {section['source']}{aligned}, in {chosen} "
           f"profile{'s' if chosen > 1 else ''}{why}. Padding waste is the share of the work spent on padding if every request "
           "ran at its profile's max, as a static engine runs it. A request runs on the smallest profile that holds it.", ""]  # fmt: skip
    if section.get("replaced"):
        out += [f"The range of {', '.join(section['replaced'])} came from --shapes or the recipe instead (see Dynamic dims).", ""]
    rows = [[str(i + 1), ", ".join(f"{d} {r['min']}..{r['opt']}..{r['max']}" if r["min"] != r["max"] else f"{d} {r['min']}" for d, r in b["dims"].items()),
             b["requests"], b["shapes"], f"{b['waste']:.1%}"] for i, b in enumerate(section["profiles"])]  # fmt: skip
    out += _table(["profile", "dims (min..opt..max)", "requests", "shapes", "padding waste"], rows)
    out += ["Padding waste by the number of profiles: " + ", ".join(f"{s['profiles']}: {s['waste']:.1%}" for s in section["split"]) + ".", ""]
    return out


def markdown(report: dict) -> str:
    src, model, target = report["source"], report["model"], report["target"]
    verification = report["verification"]
    out = [
        f"# kiln report: {Path(src['path']).name}",
        "",
        f"**Status: {report['status']}** · target `{target['name']}` · precision {report['precision']} · "
        f"{src['nodes']} → {model['nodes']} nodes · {report['timings']['total_s']:.2f} s",
        "",
        f"- source: `{src['path']}` (sha256 `{src['hash'][:16]}…`)",
        f"- optimized model: `{model['file']}` (sha256 `{model['hash'][:16]}…`)",
        f"- engine: {', '.join(f'`{f}`' for f in target['files'])}",
        *([f"- engine cache: {report['cache']['status']}, {report['cache']['reason']}"] if report.get("cache") else []),
        "",
    ]
    for note in report["notes"]:
        out.append(f"> {note}")
    out += ["", "## Inputs and outputs", ""]
    io_rows = [["input", s["name"], s["dtype"], _dims(s["shape"])] for s in report["inputs"]]
    io_rows += [["output", s["name"], s["dtype"], _dims(s["shape"])] for s in report["outputs"]]
    out += _table(["", "name", "dtype", "shape"], io_rows)
    dims = report["profile"]["dims"]
    if dims:
        out += ["## Dynamic dims", ""]
        out += _table(["dim", "min", "opt", "max"], [[d, r["min"], r["opt"], r["max"]] for d, r in dims.items()])
    out += _from_requests(report.get("profile_from"))
    out += ["## Passes", ""]
    rows = []
    for p in report["passes"]:
        extra = ", ".join(f"{k} {v}" for k, v in p["stats"].items())
        rows.append([p["name"], f"{p['seconds'] * 1e3:.1f}", p["nodes_before"], p["nodes_after"], extra])
    out += _table(["pass", "ms", "nodes before", "nodes after", "details"], rows)
    for p in report["passes"]:
        out += [f"- warning ({p['name']}): {w}" for w in p["warnings"]]
        for node, reason in p["details"].get("kept_fp32", {}).items():
            out.append(f"- kept in fp32 ({p['name']}): `{node}`: {reason}")
        for tensor, reason in p["details"].get("out_of_range", {}).items():
            out.append(f"- out of range ({p['name']}): `{tensor}`: {reason}")
        for op, note in p["details"].get("fp32_inside", {}).items():
            out.append(f"- {op} ({p['name']}): {note}")
        for rule, reasons in p["details"].get("refused", {}).items():
            out += [f"- not fused ({p['name']}, {rule}), {n}×: {reason}" for reason, n in reasons.items()]
    out += _quantization(report)
    if report.get("quality"):  # an unquantized engine measured by kiln compare
        out += _quality({"quality": report["quality"]}, {})
    out += ["## Verification", ""]
    if not verification["enabled"]:
        out += ["Not run (`--no-verify`).", ""]
    else:
        tol = verification["tolerance"]
        quantized = "rel_l2" in tol
        rule = (f"‖got − want‖ / ‖want‖ ≤ {tol['rel_l2']:g} per output (quantized engine)" if quantized
                else f"|got − want| ≤ {tol['atol']:g} + {tol['rtol']:g}·|want|")  # fmt: skip
        out += [f"Against {verification['reference']}; pass when {rule}.", ""]
        rows = []
        nan = float("nan")
        for check in verification["shapes"]:
            for name, err in (check["outputs"] or {"-": {"max_abs": nan, "max_rel": nan, "rel_l2": nan}}).items():
                rows.append([check["corner"], _shapes(check["shapes"]), name, f"{err['max_abs']:.3g}", f"{err['max_rel']:.3g}",
                             *([f"{err.get('rel_l2', nan):.3g}"] if quantized else []),
                             "pass" if check["passed"] else f"**FAIL** {check['error'] or ''}"])  # fmt: skip
        out += _table(["corner", "shapes", "output", "max abs", "max rel", *(["rel L2"] if quantized else []), "result"], rows)
    if report["latency"]:
        out += ["## Latency", ""]
        rows = [[b["corner"], _shapes(b["shapes"]), f"{b['median_ms']:.3f}", f"{b['p90_ms']:.3f}", b["runs"]] for b in report["latency"]]
        out += _table(["corner", "shapes", "median ms", "p90 ms", "runs"], rows)
    out += cost_lines(report.get("cost"))
    runtime = report["runtime"]
    rows = [[k, v] for k, v in report["versions"].items()]
    rows.append(["ONNX Runtime that ran", f"{runtime['onnxruntime']} ({runtime['distribution']}, {runtime['path']}); "
                 f"providers: {', '.join(runtime['providers'].split(','))}"])  # fmt: skip
    out += ["## Versions", ""] + _table(["library", "version"], rows)
    return "\n".join(out)


def cost_lines(cost: dict | None) -> list[str]:
    """Cost per 1,000 results, measured on this GPU and estimated for the others (targets/cost.py)."""
    if not cost:
        return []
    out = ["## Cost per 1,000 results", ""]
    if not cost["rows"]:
        return out + [cost["reason"] + ".", ""]
    out += [f"One run at the {cost['shape']} shape gives {cost['results_per_run']} result(s), does "
            f"{cost['flops_per_run'] / 1e12:.3g} TFLOP in matrix products ({cost['compute_format']}) and moves at least "
            f"{cost['bytes_per_run'] / 1e9:.3g} GB. Measured on {cost['gpu']}; the other rows scale that time by a "
            "roofline model (FLOPs over the datasheet peak, or bytes over the bandwidth, whichever is slower), "
            "at on-demand prices (see `kiln targets`).", ""]  # fmt: skip
    rows = []
    for r in cost["rows"]:
        if r["basis"] == "none":
            rows.append([r["target"], r["gpu"], "-", "-", "-", "-", "-", f"not estimated: {r['reason']}"])
            continue
        rows.append([r["target"], r["gpu"], f"{r['ms_per_run']:.3f}", r["bound"], f"{r['roofline_fraction']:.0%}" if r["roofline_fraction"] is not None else "-",
                     f"${r['usd_per_hour']:.2f}", f"${r['usd_per_1000_results']:.4g}", r["basis"]])  # fmt: skip
    return out + _table(["target", "GPU", "ms per run", "bound", "of peak", "per hour", "per 1,000 results", "basis"], rows)


def _quantization(report: dict) -> list[str]:
    """The calibration summary and the per-layer table of the quantize pass, if it ran."""
    record = next((p for p in report["passes"] if p["name"] == "quantize"), None)
    if record is None:
        return []
    details = record["details"]
    calib = details.get("calibration", {})
    method = calib.get("method", "?") + (f" {calib['percentile']:g}%" if calib.get("percentile") else "")
    out = ["## Quantization", "",
           f"{report['quantization']['format'].upper()} through the {report['quantization']['backend']} backend; "
           f"{record['stats'].get('quantized', 0)} of {record['stats'].get('layers', 0)} layers quantized, "
           f"{record['stats'].get('kept', 0)} kept in float. Calibration: {calib.get('samples', 0)} samples from "
           f"{calib.get('source', '?')}, method {method}; statistics cache: {', '.join(details.get('cache', [])) or 'off'}.", ""]  # fmt: skip
    rows = []
    for layer in details.get("layers", []):
        weight = layer.get("weight_scale") or {}
        wscale = f"{weight['min']:.3g}..{weight['max']:.3g}" if weight else "-"
        sq = layer.get("smoothquant")
        rows.append([f"`{layer['module']}`", layer["op"], layer["format"],
                     f"{layer['activation_scale']:.3g}" if layer.get("activation_scale") else "-", wscale,
                     f"{sq['factor_min']:.2g}..{sq['factor_max']:.2g}" if sq else "-", layer["kept"] or ""])  # fmt: skip
    out += _table(["layer", "op", "format", "activation scale", "weight scales", "SmoothQuant factors", "kept because"], rows)
    return out + _quality(report["quantization"], {layer["node"]: layer["module"] for layer in details.get("layers", [])})


def _quality(quantization: dict, modules: dict[str, str]) -> list[str]:
    """The quantized engine's quality against fp32, and the fallback's search."""
    out = []
    measured = quantization.get("quality")
    if measured:
        out += ["### Quality against the fp32 model", ""]
        rows = [[f"`{name}` (verification inputs)", *_metrics(m)] for name, m in measured["held_out"].items()]
        calibration = measured.get("calibration_held_out")
        if calibration:
            rows += [[f"`{name}` ({calibration['samples']} calibration samples held out)", *_metrics(m)]
                     for name, m in calibration["outputs"].items()]  # fmt: skip
        sampling = measured.get("sampling")
        if sampling:
            rows.append([f"final latents of {sampling['samples']} samples ({sampling['loops']} loops of {sampling['steps']} steps, "
                         f"seed {sampling['seed']})", *_metrics(sampling)])  # fmt: skip
        out += _table(["on", "rel L2", "max abs", "PSNR dB", "SSIM"], rows)
        out += [f"LPIPS: {measured['lpips']}.", ""]
    fallback = quantization.get("fallback")
    if fallback:
        verdict = "met" if fallback["met"] else "**not met** even with every layer in float"
        out += ["### Quality fallback", "",
                f"Budget {fallback['budget']}: {verdict}, keeping {len(fallback['kept'])} of {fallback['candidates']} "
                f"quantized layers in float: {', '.join(f'`{modules.get(k, k)}`' for k in fallback['kept']) or 'none'}"
                f"{f' (measured on {on})' if (on := fallback.get('evaluated_on')) else ''}.", ""]  # fmt: skip
        rows = [[c["kept"], f"{c['quality']:.4g}", f"{c['latency_ms']:.3f}" if c["latency_ms"] is not None else "-"] for c in fallback["curve"]]
        out += ["Each evaluation on the way (layers kept in float, most sensitive first):", ""]
        metric = fallback["budget"].split(">")[0].split("<")[0]
        out += _table(["layers kept", metric, "latency ms (one run of the Q/DQ graph on ONNX Runtime)"], rows)
    return out


def _metrics(m: dict) -> list[str]:
    return [f"{m['rel_l2']:.3g}", f"{m['max_abs']:.3g}", f"{m['psnr']:.2f}" if "psnr" in m else "-", f"{m['ssim']:.4f}" if "ssim" in m else "-"]
