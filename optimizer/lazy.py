"""Optional frameworks are found and imported only when a command needs them."""

from __future__ import annotations

import importlib
import importlib.util

from kiln.optimizer.errors import InputError
from kiln.optimizer.signals import signals_deferred


def check_installed(modules: list[str], extra: str, why: str) -> None:
    """Raise InputError naming the kiln extra to install if any module is missing (imports nothing)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(
            f"{why} needs {', '.join(missing)}, which is not installed",
            hint=f"pip install 'kiln-ml[{extra}]'",
        )


def require(module: str, extra: str, why: str):
    """Import module, or raise InputError naming the kiln extra that provides it."""
    check_installed([module.split(".")[0]], extra, why)
    with signals_deferred():  # a signal inside torch's or TensorFlow's C++ start-up can abort the process
        return importlib.import_module(module)
