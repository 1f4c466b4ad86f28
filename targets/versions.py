"""Versions of the libraries that are actually imported, read from the modules themselves.

Package metadata can name another copy than the one that runs: on a machine with both onnxruntime and
onnxruntime-gpu installed, `importlib.metadata.version("onnxruntime")` gave the CPU build's 1.30.0 while
the session ran onnxruntime-gpu 1.31.1. So a version here is the module's `__version__`, and the
distribution is the installed one whose files hold the imported module.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import platform
from pathlib import Path

# module -> (name in reports, the distributions that may provide it; importlib.metadata matches - and _ alike)
LIBRARIES = {
    "onnx": ("onnx", ("onnx",)),
    "onnx_ir": ("onnx-ir", ("onnx-ir",)),
    "onnxscript": ("onnxscript", ("onnxscript",)),
    "onnxruntime": ("onnxruntime", ("onnxruntime", "onnxruntime-gpu")),
    "numpy": ("numpy", ("numpy",)),
    "ml_dtypes": ("ml_dtypes", ("ml-dtypes",)),
    "google.protobuf": ("protobuf", ("protobuf",)),
}


def providing_distribution(module) -> str | None:
    """The installed distribution whose files hold the imported module (None if none does)."""
    return _providing(module.__name__, Path(module.__file__).resolve().parent)


@functools.cache  # every build reports it; reading the metadata of each installed distribution took 80 ms
def _providing(module_name: str, here: Path) -> str | None:
    for dist in (d for name in LIBRARIES[module_name][1] for d in importlib.metadata.distributions(name=name)):
        try:
            if Path(dist.locate_file(module_name.replace(".", "/"))).resolve() == here:
                return dist.metadata["Name"]
        except (OSError, TypeError):
            continue
    return None


def runtime_versions() -> dict[str, str]:
    """The ONNX Runtime that runs engines here: version, distribution, location and providers."""
    import onnxruntime as ort

    return {
        "onnxruntime": ort.__version__,
        "distribution": providing_distribution(ort) or "unknown",
        "path": str(Path(ort.__file__).parent),
        "providers": ",".join(ort.get_available_providers()),
    }


def library_versions() -> dict[str, str]:
    """python, kiln and each library's imported version."""
    found = {"python": platform.python_version()}
    try:
        found["kiln-ml"] = importlib.metadata.version("kiln-ml")
    except importlib.metadata.PackageNotFoundError:
        pass
    for module_name, (name, _) in LIBRARIES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found[name] = str(getattr(module, "__version__", "unknown"))
    return found
