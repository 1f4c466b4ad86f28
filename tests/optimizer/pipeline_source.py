"""Definitions from diffusers pipelines whose modules cannot be imported here (they import transformers, or a
loader mixin this diffusers lacks), taken from the installed source: the functions and constants named are parsed
out of the file and run on their own, so tests compare kiln's in-graph layouts with the pipelines' own code."""

from __future__ import annotations

import ast
import importlib.util
import types
from pathlib import Path


def pipeline_definitions(module: str, *names: str, **namespace) -> types.SimpleNamespace:
    """names (module-level constants, functions, static methods of its classes) from diffusers' module, e.g.
    "pipelines.ideogram4.pipeline_ideogram4", with namespace as their globals (torch, np, imported constants)."""
    path = Path(importlib.util.find_spec("diffusers").origin).parent / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    constants = [n for n in tree.body if isinstance(n, ast.Assign) and {getattr(t, "id", None) for t in n.targets} & set(names)]
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in names]
    for function in functions:
        function.decorator_list = []  # staticmethod, torch.no_grad: plain functions here
    found = [getattr(t, "id", None) for n in constants for t in n.targets if getattr(t, "id", None) in names]
    found += [f.name for f in functions]
    assert sorted(found) == sorted(names), f"{module}: {sorted(names)} not each defined once, found {sorted(found)}"
    scope = dict(namespace)
    exec(compile(ast.Module(body=[*constants, *functions], type_ignores=[]), str(path), "exec"), scope)
    return types.SimpleNamespace(**{name: scope[name] for name in names})
