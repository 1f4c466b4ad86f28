"""The engine cache: hits that copy the stored engine, misses that name what changed, damaged entries
rebuilt, concurrent builders of one key building once, and `kiln cache`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kiln import targets
from kiln.optimizer import optimize as optimize_module
from kiln.optimizer.cli import build_parser, main, options_from_args
from kiln.optimizer.engine_cache import EngineCache, differences, key_of
from kiln.optimizer.optimize import cache_parts, choose_target

KILN = [sys.executable, "-c", "import sys; from kiln.optimizer.cli import main; sys.exit(main(sys.argv[1:]))"]


@pytest.fixture(scope="module")
def block(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("block")
    assert main(["example", "block", str(root), "-q"]) == 0
    return root / "model.onnx"


def optimize(model: Path, out: Path, capsys, *flags: str) -> tuple[int, str, dict | None]:
    """kiln optimize's exit code, its progress lines about the cache, and its report."""
    code = main(["optimize", str(model), "-o", str(out), "--bench-runs", "0", *flags])
    lines = "\n".join(line for line in capsys.readouterr().err.splitlines() if "cache" in line)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return code, lines, report


def files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.startswith("report")}


def test_the_same_optimize_again_is_a_hit_that_gives_the_same_engine(block, tmp_path, capsys):
    code, lines, first = optimize(block, tmp_path / "a", capsys)
    assert code == 0 and "cache miss: the cache is empty" in lines
    assert first["cache"]["status"] == "miss"
    code, lines, second = optimize(block, tmp_path / "b", capsys)
    key = first["cache"]["key"]
    assert code == 0 and "cache hit: the engine built " in lines and f"(entry {key})" in lines
    assert second["cache"] == {"status": "hit", "key": key, "reason": second["cache"]["reason"]}
    assert files(tmp_path / "b") == files(tmp_path / "a")  # model.onnx and the engine, byte for byte
    assert "- engine cache: hit, the engine built" in (tmp_path / "b" / "report.md").read_text()
    # Where the model lives does not matter, its bytes do.
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "model.onnx").write_bytes(block.read_bytes())
    assert "cache hit" in optimize(moved / "model.onnx", tmp_path / "c", capsys)[1]
    # --no-cache builds and stores nothing.
    code, lines, report = optimize(block, tmp_path / "d", capsys, "--no-cache")
    assert code == 0 and lines == "" and report["cache"] is None
    assert len(EngineCache().list()) == 1


def test_a_miss_names_the_parts_of_the_key_that_changed(block, tmp_path, capsys, monkeypatch):
    optimize(block, tmp_path / "a", capsys)
    code, lines, _ = optimize(block, tmp_path / "b", capsys, "--precision", "fp16")
    assert code == 0 and "differs in options.precision: fp32 -> fp16; options.precision_chosen: false -> true" in lines
    # Only the runtime's version changes (as after an upgrade): a miss that says so.
    versions = optimize_module.key_versions()
    monkeypatch.setattr(optimize_module, "key_versions", lambda: {**versions, "onnxruntime": "9.9.9"})
    code, lines, _ = optimize(block, tmp_path / "c", capsys)
    assert code == 0 and f"differs in libraries.onnxruntime: {versions['onnxruntime']} -> 9.9.9" in lines
    # Another model: no entry for it.
    other = tmp_path / "other.onnx"
    other.write_bytes(block.read_bytes() + b"\0")  # a trailing byte protobuf ignores
    assert "cache miss: no entry for this model" in optimize(other, tmp_path / "d", capsys)[1]


def test_a_gpu_engine_s_key_holds_the_machine_and_another_gpu_misses(block, tmp_path, monkeypatch):
    options = options_from_args(build_parser().parse_args(["optimize", str(block), "-o", "x"]))
    h100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": "580.159.04", "cuda_runtime": "13.0"}
    monkeypatch.setattr(optimize_module, "preload_cuda", lambda: None)
    monkeypatch.setattr(optimize_module, "fingerprint", lambda: h100)
    built = cache_parts(block, options, targets.TARGETS["h100"])
    assert built["machine"] == h100 and built["target"] == "h100"
    assert cache_parts(block, options, targets.CPU)["machine"] == {}  # a CPU engine runs anywhere
    cache = EngineCache()
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(block.read_bytes())
    cache.store(key_of(built), built, out, str(block))
    monkeypatch.setattr(optimize_module, "fingerprint", lambda: {**h100, "gpu": "NVIDIA H200", "driver": "590.1"})
    now = cache_parts(block, options, targets.TARGETS["h100"])
    assert key_of(now) != key_of(built)
    assert cache.lookup(key_of(now), now).reason == (
        f"the nearest entry ({key_of(built)}) differs in machine.driver: 580.159.04 -> 590.1; machine.gpu: NVIDIA H100 80GB HBM3 -> NVIDIA H200"
    )
    assert differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c: added (2)"]


def test_a_damaged_entry_is_removed_and_rebuilt_never_used(block, tmp_path, capsys):
    _, _, report = optimize(block, tmp_path / "a", capsys)
    entry = EngineCache().entries / report["cache"]["key"]
    engine = entry / "out" / "engine" / "model.ort.onnx"
    engine.write_bytes(engine.read_bytes()[:-10])  # truncated
    code, lines, _ = optimize(block, tmp_path / "b", capsys)
    assert code == 0 and f"cache miss: entry {report['cache']['key']} was damaged (engine/model.ort.onnx does not match its sha256)" in lines
    assert files(tmp_path / "b") == files(tmp_path / "a")
    assert "cache hit" in optimize(block, tmp_path / "c", capsys)[1]  # stored again, whole
    (entry / "entry.json").write_text("{")
    assert "was damaged (entry.json cannot be read (JSONDecodeError))" in optimize(block, tmp_path / "d", capsys)[1]


def test_an_engine_that_fails_verification_is_not_stored(block, tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("precision = 'fp16'\n[verify]\natol = 0\nrtol = 0\n")
    code, _, report = optimize(block, tmp_path / "a", capsys, "--config", str(recipe))
    assert code == 3 and report["status"] == "verification-failed"
    assert EngineCache().list() == []


def test_two_builders_of_one_engine_at_once_build_it_once(block, tmp_path):
    """Two `kiln optimize` processes of the same key wait on the lock this test holds; released, one
    builds and the other finds its entry."""
    options = options_from_args(build_parser().parse_args(["optimize", str(block), "-o", "x", "--bench-runs", "0"]))
    key = key_of(cache_parts(block, options, choose_target(options)))
    waiting = [threading.Event(), threading.Event()]
    logs: list[list[str]] = [[], []]

    def follow(process, log, event):
        for line in process.stderr:
            log.append(line)
            if "waiting for another kiln that is building this engine" in line:
                event.set()

    with EngineCache().building(key):
        processes = [subprocess.Popen([*KILN, "optimize", str(block), "-o", str(tmp_path / f"out{i}"), "--bench-runs", "0"],
                                      stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=os.environ.copy())
                     for i in range(2)]  # fmt: skip
        readers = [threading.Thread(target=follow, args=(p, logs[i], waiting[i])) for i, p in enumerate(processes)]
        for reader in readers:
            reader.start()
        assert all(event.wait(120) for event in waiting), logs
    codes = [p.wait(120) for p in processes]
    for reader in readers:
        reader.join()
    outcomes = sorted("hit" if any("cache hit" in line for line in log) else "miss" if any("cache miss" in line for line in log) else "?" for log in logs)
    assert codes == [0, 0] and outcomes == ["hit", "miss"], logs
    assert [e["key"] for e in EngineCache().list()] == [key]
    assert files(tmp_path / "out0") == files(tmp_path / "out1")


def test_kiln_cache_lists_shows_and_prunes_entries(block, tmp_path, capsys):
    _, _, fp32 = optimize(block, tmp_path / "a", capsys)
    _, _, fp16 = optimize(block, tmp_path / "b", capsys, "--precision", "fp16")
    assert main(["cache", "list"]) == 0
    text = capsys.readouterr().out
    assert "2 entries" in text and fp32["cache"]["key"] in text and fp16["cache"]["key"] in text and " fp16 " in text
    assert main(["cache", "info", fp16["cache"]["key"][:8]]) == 0
    text = capsys.readouterr().out
    assert f"entry {fp16['cache']['key']}" in text and ": whole" in text and "options.precision: fp16" in text
    assert main(["cache", "info", "zzzz"]) == 2
    assert f"kiln: error: no entry of {EngineCache().root} has a key starting 'zzzz'" in capsys.readouterr().err
    report = EngineCache().entries / fp16["cache"]["key"] / "out" / "report.md"
    report.write_text("edited")
    assert main(["cache", "prune", "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert pruned["removed"] == [f"{fp16['cache']['key']}: report.md does not match its sha256"] and pruned["entries"] == 1
    with EngineCache().building(fp32["cache"]["key"]):  # an entry another kiln is using is left alone
        assert main(["cache", "prune", "--max-size", "0", "-q"]) == 0
    capsys.readouterr()
    assert [e["key"] for e in EngineCache().list()] == [fp32["cache"]["key"]]
    assert main(["cache", "prune", "--max-size", "0"]) == 0
    assert "least recently used" in capsys.readouterr().out and EngineCache().list() == []
    assert main(["cache", "prune", "--max-size", "12Q"]) == 2
    assert "'12Q' is not a size: give bytes, or a number with K, M, G or T (500M, 20G)" in capsys.readouterr().err
