"""`kiln export triton`: a built engine as a model of a Triton model repository.

    REPO/NAME/config.pbtxt       from the engine's manifest (config.py)
    REPO/NAME/N/model.onnx       onnxruntime: the model; with external data, the folder model.onnx/
                                 holding the model and its data files, as Triton's ONNX Runtime backend expects
    REPO/NAME/N/model.plan       tensorrt: the plan; plans for several GPUs are model.smXY.plan, chosen
                                 by compute capability (cc_model_filenames)
    REPO/NAME/N/model.py         python: kiln's runtime (model.py of this package) over N/engine/, a copy
                                 of the engine directory

The version folder is written whole under a temporary name and renamed into place; another version of
the model is left as it is.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from kiln.optimizer.errors import InputError
from kiln.optimizer.onnx_files import model_files
from kiln.optimizer.outdir import atomic_file, check_not_link, staged_dir
from kiln.optimizer.triton.config import ExportOptions, config_text, is_plan, model_config
from kiln.targets.manifest import BuildConfig
from kiln.targets.tensorrt import PLAN

# Triton finds a model by its folder's name and addresses it in URLs (/v2/models/NAME): kiln takes the
# names both allow, and leaves out names starting with a dot (Triton skips hidden folders).
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
MODEL_PY = Path(__file__).with_name("model.py")


def check_name(name: str) -> None:
    if not MODEL_NAME.fullmatch(name) or len(name) > 200:
        raise InputError(f"{name!r} is not a name Triton can serve a model under",
                         hint="use letters, digits, _ . and -, not starting with . or -, e.g. --name dit_xl")  # fmt: skip


def default_name(engine_dir: Path) -> str:
    """The OUTDIR's name, with the characters Triton does not take as _."""
    folder = engine_dir.resolve()
    folder = folder.parent if folder.name == "engine" else folder
    return re.sub(r"[^A-Za-z0-9_.-]", "_", folder.name).lstrip(".-") or "model"


def export(engines: list[tuple[Path, BuildConfig]], repo: Path, name: str, version: int, options: ExportOptions, force: bool) -> Path:
    """Write the engines (one, or TensorRT plans of one model for several GPUs) as version `version` of
    model `name` in repo; the version folder."""
    check_name(name)
    if version < 1:
        raise InputError(f"--version {version}: Triton's model versions are whole numbers from 1")
    if len(engines) > 1 and options.backend != "tensorrt":
        raise InputError(f"{len(engines)} engines given: only TensorRT plans of one model for several GPUs go in one version",
                         hint="export each engine under its own --name")  # fmt: skip
    config = engines[0][1]
    if any(not is_plan(c) or (c.inputs, c.outputs) != (config.inputs, config.outputs) for _, c in engines[1:]):
        raise InputError("the engines given together are not TensorRT plans of one model (the same inputs and outputs)",
                         hint="export each engine under its own --name")  # fmt: skip
    filenames = plan_names(engines) if len(engines) > 1 else None
    message = model_config(name, config, options, filenames)
    model_dir = repo / name
    target = model_dir / str(version)
    check_not_link(model_dir, "model folder")
    if target.exists() and not force:
        raise InputError(f"{target} exists: version {version} of model {name!r} is in the repository already",
                         hint=f"pass --version {max(versions(model_dir), default=0) + 1} for a new version, or --force to replace this one")  # fmt: skip
    text = config_text(message)
    others = sorted(set(versions(model_dir)) - {version})
    if others and not force and _read(model_dir / "config.pbtxt") not in (None, text):
        raise InputError(f"model {name!r} has version(s) {', '.join(map(str, others))} with another config.pbtxt, and Triton serves every "
                         "version of a model with one config", hint="export it under another --name, or pass --force to replace the config")  # fmt: skip
    with staged_dir(target) as stage:
        if options.backend == "python":
            shutil.copy2(MODEL_PY, stage / "model.py")
            _copy_tree(engines[0][0], stage / "engine")
        elif options.backend == "tensorrt":
            for (directory, _), filename in zip(engines, (filenames or {"": "model.plan"}).values(), strict=True):
                _copy(directory / PLAN, stage / filename)
        else:
            _copy_onnx(engines[0][0] / config.model, stage)
    with atomic_file(model_dir / "config.pbtxt") as tmp:
        tmp.write_text(text)
    return target


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def plan_names(engines: list[tuple[Path, BuildConfig]]) -> dict[str, str]:
    """Compute capability -> plan file, one plan per GPU."""
    names: dict[str, str] = {}
    for directory, config in engines:
        capability = config.built_with.get("compute_capability")
        if not capability:
            raise InputError(f"{directory}: the engine's manifest records no compute capability", hint="rebuild it with `kiln optimize` on its GPU")
        if capability in names:
            raise InputError(f"two plans are for compute capability {capability}", hint="give one engine per GPU")
        names[capability] = f"model.sm{capability.replace('.', '')}.plan"
    return names


def versions(model_dir: Path) -> list[int]:
    """The model's versions in the repository: its folders named by a number."""
    return [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []


def _copy_onnx(model: Path, stage: Path) -> None:
    """model.onnx, or with external data the folder form Triton's ONNX Runtime backend loads."""
    files = model_files(model)
    if len(files) == 1:
        _copy(model, stage / "model.onnx")
        return
    (stage / "model.onnx").mkdir()
    for file in files:
        _copy(file, stage / "model.onnx" / ("model.onnx" if file == model else file.relative_to(model.parent)))


def _copy_tree(source: Path, destination: Path) -> None:
    shutil.copytree(source, destination, copy_function=_copy, ignore=shutil.ignore_patterns(".*"))


def _copy(source, destination) -> None:
    """A copy, not a hard link: onnx refuses external data files with several links (a hard-link attack)."""
    Path(destination).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, destination)
