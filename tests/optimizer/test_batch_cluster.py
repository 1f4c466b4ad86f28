"""`kiln batch` on a local Ray instance with CPU actors: outputs the same as `kiln decode`'s, a worker that
dies mid-job (its job run again, its output written once and whole), a resumed run that runs only what is
missing, a job failing on its input while the others finish, and bad manifests refused before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("pandas")

sys.path.insert(0, str(Path(__file__).parent))
from cluster_models import build, toy_decoder  # noqa: E402

KILN = [sys.executable, "-c", "import sys; from kiln.optimizer.cli import main; sys.exit(main(sys.argv[1:]))"]
FRAMES = {"a": 3, "b": 5, "c": 2, "d": 4}


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch")
    return build(toy_decoder(root / "dec.onnx"), root / "vae", "batch=1..2..4", "height=8", "width=8")


def kiln(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*KILN, *map(str, args)], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def write_manifest(folder: Path, lines: list[str]) -> Path:
    (folder / "lat").mkdir(parents=True, exist_ok=True)
    for name, count in FRAMES.items():
        np.save(folder / "lat" / f"{name}.npy", np.random.default_rng(count).standard_normal((count, 4, 8, 8)).astype(np.float32))
    (folder / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "jobs.jsonl"


def visible(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_killed_worker_and_a_resumed_run_write_each_output_once_and_whole(decoder, tmp_path):
    manifest = write_manifest(tmp_path, ["lat/a.npy", '{"input": "lat/b.npy", "output": "clips/b"}', "# a comment", '{"input": "lat/c.npy", "format": "jpg"}'])
    out, marker = tmp_path / "out", tmp_path / "crashed"
    done = kiln("batch", decoder, manifest, "-o", out, "--workers", "2", env={"KILN_CRASH_ONCE": str(marker)})
    assert done.returncode == 0, done.stderr
    assert marker.exists()  # a worker died mid-job, after writing part of its output
    summary = json.loads((out / "batch.json").read_text())
    assert [(r["line"], r["status"], r["output"], r.get("frames")) for r in summary["jobs"]] == [
        (1, "done", "lat/a", 3), (2, "done", "clips/b", 5), (4, "done", "lat/c", 2)]  # fmt: skip
    assert summary["partials_removed"] == 1  # the dead worker's, removed at the end
    files = visible(out)
    assert not [f for f in files if "kiln-partial" in f]
    assert [f for f in files if f.startswith("lat/a/")] == [f"lat/a/frame_{i:06d}.png" for i in range(3)]
    assert [f for f in files if f.startswith("lat/c/")] == [f"lat/c/frame_{i:06d}.jpg" for i in range(2)]
    # The same frames as `kiln decode` writes for that file.
    assert kiln("decode", decoder, tmp_path / "lat" / "b.npy", "-o", tmp_path / "direct", "-q").returncode == 0
    for i in range(5):
        assert (out / "clips" / "b" / f"frame_{i:06d}.png").read_bytes() == (tmp_path / "direct" / f"frame_{i:06d}.png").read_bytes()

    # Resume: one output gone, a partial planted as a killed run would leave it, one job added.
    for path in (out / "lat" / "a").iterdir():
        path.unlink()
    (out / "lat" / "a").rmdir()
    (out / "clips" / ".b.kiln-partial-0123456789ab").mkdir()
    manifest.write_text(manifest.read_text() + "lat/d.npy\n")
    stamp = (out / "clips" / "b" / "frame_000000.png").stat().st_mtime_ns
    again = kiln("batch", decoder, manifest, "-o", out, "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert [(r["line"], r["status"]) for r in summary["jobs"]] == [(1, "done"), (2, "skipped"), (4, "skipped"), (5, "done")]
    assert summary["partials_removed"] == 1 and "removed 1 partial output(s)" in again.stderr
    assert (out / "clips" / "b" / "frame_000000.png").stat().st_mtime_ns == stamp  # not rewritten
    assert len(list((out / "lat" / "a").iterdir())) == 3 and len(list((out / "lat" / "d").iterdir())) == 4


def test_a_job_failing_on_its_input_does_not_stop_the_others(decoder, tmp_path):
    manifest = write_manifest(tmp_path, ["lat/a.npy", "lat/nan.npy", "lat/c.npy"])
    bad = np.zeros((2, 4, 8, 8), np.float32)
    bad[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "lat" / "nan.npy", bad)
    done = kiln("batch", decoder, manifest, "-o", tmp_path / "out", "-q")
    assert done.returncode == 2
    assert "kiln: error: 1 job(s) failed; line 2: " in done.stderr and "holds NaN or infinite values" in done.stderr
    assert sorted(os.listdir(tmp_path / "out" / "lat")) == ["a", "c"]


@pytest.mark.parametrize("lines, message", [
    (["lat/../../x.npy"], "line 1: \"input\" 'lat/../../x.npy' leaves the input root"),
    (["lat/a.npy", "lat/missing.npy"], "line 2: \"input\" 'lat/missing.npy' does not exist"),
    (["lat/a.npy", '{"input": "lat/b.npy", "output": "lat/a"}'], "line 2: output 'lat/a' is also line 1's"),
    (['{"input": "lat/a.npy", "output": "../../elsewhere"}'], "line 1: \"output\" '../../elsewhere' leaves the output root"),
    (['{"input": "lat/a.npy"'], "line 1: not JSON"),
    (["# only a comment"], "lists no jobs"),
])  # fmt: skip
def test_a_bad_manifest_is_refused_before_anything_is_written(decoder, tmp_path, lines, message):
    manifest = write_manifest(tmp_path, lines)
    done = kiln("batch", decoder, manifest, "-o", tmp_path / "out")
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_more_workers_than_this_machine_has_cpus_are_refused(decoder, tmp_path):
    """Each worker takes a CPU; Ray started here counts at most os.cpu_count() of them."""
    n = os.cpu_count() + 1
    manifest = write_manifest(tmp_path, [f'{{"input": "lat/a.npy", "output": "a{i}"}}' for i in range(n)])
    done = kiln("batch", decoder, manifest, "-o", tmp_path / "out", "--workers", n)
    assert done.returncode == 2, done.stderr
    assert f"kiln: error: {n} worker(s), each a CPU, need {n} CPUs; the Ray cluster has " in done.stderr
    assert not (tmp_path / "out").exists()
