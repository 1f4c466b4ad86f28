"""The wheel is what users install: it must hold every module under `kiln.`, work in a bare venv, and
import no heavy framework until a command needs one. The source tree cannot show this: from a checkout,
modules import fine even when the wheel leaves them out."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("optimizer", "passes", "targets", "calibration")  # installed as kiln.<folder>
HEAVY = {"torch", "tensorflow", "tf2onnx", "diffusers", "tensorrt", "modelopt", "cv2", "ray"}
# Modules that are written in an optional framework, and so need its extra to import at all; nothing
# else imports them at module level. FILM's reference architecture is TensorFlow modules ([tf]); kiln
# serve's deployments are Ray Serve classes ([cluster]).
NEEDS_EXTRA = {"kiln.optimizer.examples.film_net": "tensorflow", "kiln.optimizer.serve.cluster": "ray",
               "kiln.optimizer.triton.model": "triton_python_backend_utils"}  # Triton's Python backend provides it


def _py_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if "__pycache__" not in p.parts)


def _run(cmd: list, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"`{' '.join(map(str, cmd))}` exited {proc.returncode}\n"
        f"--- stdout:\n{proc.stdout[-3000:]}\n--- stderr:\n{proc.stderr[-6000:]}"
    )
    return proc


# Imports every module of the installed kiln, one at a time, so a failure or a heavy import is pinned on
# the module that caused it. Prints {"path": [...], "failed": {module: error}, "heavy": {module: [names]}}.
IMPORT_ALL = """
import importlib, json, pkgutil, sys, traceback
import kiln
HEAVY = set(sys.argv[1].split(","))
failed, heavy = {}, {}
def onerror(name):
    failed[name] = traceback.format_exc(limit=-2)
for info in pkgutil.walk_packages(kiln.__path__, "kiln.", onerror=onerror):
    before = HEAVY & set(sys.modules)
    try:
        importlib.import_module(info.name)
    except BaseException:
        failed[info.name] = traceback.format_exc(limit=-2)
    if new := (HEAVY & set(sys.modules)) - before:
        heavy[info.name] = sorted(new)
print(json.dumps({"path": list(kiln.__path__), "failed": failed, "heavy": heavy}))
"""


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_bare_venv(tmp_path):
    # 1. The wheel holds every source module, under kiln/ only. setuptools' build/lib is never cleaned, so a module deleted from the tree would still ship; keep the
    # scratch dirs in tmp (fresh each run, and the checkout untouched) via distutils' extra config file.
    dist, scratch = tmp_path / "dist", tmp_path / "setuptools-build"
    scratch.mkdir()
    (tmp_path / "build.cfg").write_text(f"[build]\nbuild_base = {scratch}\n[egg_info]\negg_base = {scratch}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}  # pip config kept
    build_env = {**env, "DIST_EXTRA_CONFIG": str(tmp_path / "build.cfg")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, ROOT], cwd=tmp_path, env=build_env)
    (wheel,) = dist.glob("kiln_ml-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"kiln/" + p.relative_to(ROOT).as_posix() for p in _py_files(*SOURCES)}
    assert not expected - names, f"{wheel.name} lacks: {sorted(expected - names)}"
    stray = sorted(n for n in names if n.split("/")[0] in SOURCES)
    assert not stray, f"{wheel.name} has top-level entries that would shadow other packages: {stray[:20]}"

    # 2. A fresh venv with only the core dependencies, run from outside the checkout with no PYTHONPATH,
    # so nothing can be imported from the source tree.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    py, kiln = venv / "bin" / "python", venv / "bin" / "kiln"
    _run([py, "-m", "pip", "install", wheel], cwd=tmp_path, env=env, timeout=900)

    # 3. The README's quick start, end to end.
    assert "kiln optimize" in _run([kiln, "--help"], cwd=tmp_path, env=env).stdout
    _run([kiln, "example", "block", "ex"], cwd=tmp_path, env=env)
    _run([kiln, "optimize", "ex/model.onnx", "-o", "out", "--json"], cwd=tmp_path, env=env)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "ok", json.dumps(report, indent=1)[:3000]
    x = np.random.default_rng(0).standard_normal((2, 8, 64)).astype(np.float32)  # [batch, seq, 64]
    np.savez(tmp_path / "in.npz", x=x)
    _run([kiln, "run", "out", "--inputs", "in.npz", "--output", "out.npz"], cwd=tmp_path, env=env)
    with np.load(tmp_path / "out.npz") as outputs:
        assert outputs.files, "out.npz holds no outputs"
        for name in outputs.files:
            assert outputs[name].shape[:2] == (2, 8) and np.isfinite(outputs[name]).all(), name

    # 4. Every installed module imports with the core dependencies alone, and pulls in no heavy framework:
    # those are optional extras, imported lazily by the commands that need them.
    result = json.loads(_run([py, "-c", IMPORT_ALL, ",".join(sorted(HEAVY))], cwd=tmp_path, env=env).stdout)
    assert all(str(venv) in p for p in result["path"]), f"kiln imported from outside the venv: {result['path']}"
    problems = [f"{m} fails to import in a bare venv:\n{err}" for m, err in result["failed"].items()
                if f"No module named '{NEEDS_EXTRA.get(m)}'" not in err]  # fmt: skip
    problems += [f"{m} imports {', '.join(names)} at import time" for m, names in result["heavy"].items()]
    assert not problems, "\n".join(problems)


def test_setuptools_packages_list_every_subpackage():
    # [tool.setuptools] packages is an explicit list, so a new subpackage is silently left out of the wheel
    # (optimizer.importers once was) while tests from the checkout still pass.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        "kiln." + ".".join(init.parent.relative_to(ROOT).parts)
        for init in _py_files(*SOURCES)
        if init.name == "__init__.py"
    }
    assert not found - listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"


def test_no_bare_imports_of_the_old_top_level_names():
    # In a checkout `import passes` still works (the repo root is on sys.path), but no `passes` is installed.
    bad = []
    for path in _py_files(*SOURCES, "tests", "benchmarks"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]  # relative imports (level > 0) are fine
            else:
                continue
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {m}" for m in modules if m.split(".")[0] in SOURCES]
    assert not bad, "import these as kiln.<name>:\n" + "\n".join(bad)
