"""report.json and report.md: the report's header from the imported libraries, the files written, and
what report.md renders from a real report of `kiln optimize` and from pass details edited into it."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import platform
from pathlib import Path

import onnx
import onnxruntime
import pytest

from kiln.optimizer.cli import main
from kiln.optimizer.report import markdown, new_report, write_reports
from kiln.targets.versions import library_versions, providing_distribution


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The report of one real `kiln optimize` run on the seeded block example (one bench run: fast)."""
    directory = tmp_path_factory.mktemp("report")
    assert main(["example", "block", str(directory / "example")]) == 0
    out = directory / "out"
    assert main(["optimize", str(directory / "example" / "model.onnx"), "-o", str(out), "--bench-runs", "1"]) == 0
    return json.loads((out / "report.json").read_text())


def _lines(report: dict) -> list[str]:
    return markdown(report).splitlines()


def _distribution_holding(module) -> str:
    """The installed distribution listing the module's __init__.py among its files, found independently of
    providing_distribution (which compares package directories)."""
    here = Path(module.__file__).resolve()
    for dist in importlib.metadata.distributions():
        for file in dist.files or ():
            if file.name == "__init__.py" and Path(dist.locate_file(file)).resolve() == here:
                return dist.metadata["Name"]
    raise AssertionError(f"no distribution holds {here}")


# --- new_report and the versions it records --------------------------------------------------------


def test_new_report_header():
    report = new_report("optimize")
    assert report["schema"] == "kiln-report" and report["schema_version"] == 2 and report["command"] == "optimize"
    assert report["versions"] == library_versions()
    assert report["versions"]["python"] == platform.python_version()
    # Versions come from the imported modules, not package metadata (which can name another copy).
    assert report["versions"]["onnx"] == onnx.__version__
    assert report["versions"]["onnxruntime"] == onnxruntime.__version__


def test_runtime_is_the_imported_onnxruntime():
    runtime = new_report("optimize")["runtime"]
    assert runtime["onnxruntime"] == onnxruntime.__version__
    assert runtime["providers"] == ",".join(onnxruntime.get_available_providers())
    assert runtime["path"] == str(Path(onnxruntime.__file__).parent)
    assert runtime["distribution"] == _distribution_holding(onnxruntime)


def test_providing_distribution_of_onnx():
    assert providing_distribution(onnx) == "onnx"


# --- write_reports -----------------------------------------------------------------------------------


def test_write_reports_writes_both_files_and_replaces_old_ones(report, tmp_path):
    (tmp_path / "report.json").write_text("stale")
    (tmp_path / "report.md").write_text("stale")
    write_reports(tmp_path, report)
    text = (tmp_path / "report.json").read_text()
    assert json.loads(text) == report
    assert text == json.dumps(report, indent=2, sort_keys=True) + "\n"  # stable: diffs between runs stay small
    assert (tmp_path / "report.md").read_text() == markdown(report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]  # no temporaries left


# --- markdown from a real report ---------------------------------------------------------------------


def test_markdown_header_and_io(report):
    lines = _lines(report)
    assert lines[0] == "# kiln report: model.onnx"
    assert lines[2] == (
        f"**Status: ok** · target `cpu` · precision fp32 · 35 → 30 nodes · {report['timings']['total_s']:.2f} s"
    )
    assert "- engine: `engine/engine.json`, `engine/model.ort.onnx`" in lines
    assert "| input | x | float32 | batch×seq×64 |" in lines
    assert "| output | y | float32 | batch×seq×64 |" in lines
    # The block example carries its ranges in metadata: batch=1..2..4, seq=1..16..64.
    assert lines[lines.index("## Dynamic dims") + 2 : lines.index("## Dynamic dims") + 6] == [
        "| dim | min | opt | max |", "|---|---|---|---|", "| batch | 1 | 2 | 4 |", "| seq | 1 | 16 | 64 |",
    ]  # fmt: skip


def test_markdown_lists_each_pass(report):
    lines = _lines(report)
    start = lines.index("| pass | ms | nodes before | nodes after | details |") + 2
    rows = lines[start : lines.index("", start)]
    expected = []
    for p in report["passes"]:
        details = ", ".join(f"{k} {v}" for k, v in p["stats"].items())
        expected.append(f"| {p['name']} | {p['seconds'] * 1e3:.1f} | {p['nodes_before']} | {p['nodes_after']} | {details} |")
    assert rows == expected  # one row per pass, in the order they ran
    assert "| remove-dead-nodes | " in rows[7] and rows[7].endswith(" | 31 | 30 | nodes_removed 1 |")


def test_markdown_verification_and_latency_rows(report):
    lines = _lines(report)
    assert "Against ONNX Runtime CPU, fp32, the original model with graph optimizations off; pass when |got − want| ≤ 0.0001 + 0.001·|want|." in lines  # fmt: skip
    for check in report["verification"]["shapes"]:
        err = check["outputs"]["y"]
        shape = "×".join(map(str, check["shapes"]["x"]))
        assert f"| {check['corner']} | x {shape} | y | {err['max_abs']:.3g} | {err['max_rel']:.3g} | pass |" in lines
    assert len(report["latency"]) == 3
    for b in report["latency"]:
        shape = "×".join(map(str, b["shapes"]["x"]))
        assert f"| {b['corner']} | x {shape} | {b['median_ms']:.3f} | {b['p90_ms']:.3f} | 1 |" in lines


def test_markdown_versions_name_the_runtime_that_ran(report):
    lines = _lines(report)
    assert f"| onnxruntime | {onnxruntime.__version__} |" in lines
    providers = ", ".join(onnxruntime.get_available_providers())
    dist = providing_distribution(onnxruntime)
    path = Path(onnxruntime.__file__).parent
    assert f"| ONNX Runtime that ran | {onnxruntime.__version__} ({dist}, {path}); providers: {providers} |" in lines


def test_markdown_unverified_and_without_latency(report):
    edited = copy.deepcopy(report)
    edited["verification"]["enabled"] = False
    edited["latency"] = []
    edited["notes"] = ["shapes came from the model's metadata"]
    lines = _lines(edited)
    assert "Not run (`--no-verify`)." in lines and "## Latency" not in lines
    assert "> shapes came from the model's metadata" in lines


# --- pass details only some passes fill ------------------------------------------------------------


def test_markdown_renders_pass_details(report):
    """The fp16 pass's kept_fp32, fp32_inside and out_of_range, a fusion pass's refused, and any warnings."""
    edited = copy.deepcopy(report)
    reason = "max |value| 100000 is beyond float16's ±65504; kept in float32"
    fp16 = dict(edited["passes"][-1], name="fp16", stats={"values_converted": 12}, warnings=["an fp16 warning"],
                details={"kept_fp32": {"pos_sin": "phases reach ~1000 rad"}, "out_of_range": {"w": reason},
                         "fp32_inside": {"LayerNormalization": "statistics in float32"}})  # fmt: skip
    edited["passes"][-1]["details"] = {"refused": {"skip-layer-norm": {"bias is not a vector": 2}}}
    edited["passes"].append(fp16)
    lines = _lines(edited)
    assert "- out of range (fp16): `w`: max |value| 100000 is beyond float16's ±65504; kept in float32" in lines
    assert "- kept in fp32 (fp16): `pos_sin`: phases reach ~1000 rad" in lines
    assert "- LayerNormalization (fp16): statistics in float32" in lines
    assert "- not fused (fusions, skip-layer-norm), 2×: bias is not a vector" in lines
    assert "- warning (fp16): an fp16 warning" in lines
    assert any(line.startswith("| fp16 | ") and line.endswith(" | values_converted 12 |") for line in lines)
    assert "- out of range" not in markdown(report)  # the real fp32 run has none of these
