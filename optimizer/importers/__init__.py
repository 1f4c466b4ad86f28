"""Importers: turn what the user has (ONNX, a TensorFlow SavedModel, a diffusers model directory) into the
ONNX model kiln optimizes."""

from __future__ import annotations

from pathlib import Path

from kiln.optimizer.importers.diffusers import import_diffusers, is_diffusers_dir
from kiln.optimizer.importers.savedmodel import import_saved_model, is_saved_model
from kiln.optimizer.onnx_files import find_model


def import_model(path: Path, workdir: Path, options) -> tuple[Path, dict | None, list[str]]:
    """(ONNX path, source description or None for plain ONNX, notes). workdir must outlive the ONNX path."""
    if is_saved_model(path):
        return import_saved_model(path, workdir, options)
    if is_diffusers_dir(path):
        return import_diffusers(path, workdir, options)
    return find_model(path), None, []
