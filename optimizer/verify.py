"""Verification: the optimized engine against the original model on ONNX Runtime CPU in fp32."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from kiln.optimizer.onnx_files import save_model
from kiln.targets.align import Alignment
from kiln.targets import Engine, Profile

REFERENCE = "ONNX Runtime CPU, fp32, the original model with graph optimizations off"


@dataclasses.dataclass
class ShapeCheck:
    corner: str
    shapes: dict[str, list[int]]
    passed: bool
    outputs: dict[str, dict[str, float]]
    error: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def reference_session(model_path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(model_path), options, providers=["CPUExecutionProvider"])


def run_session(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def compare(got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> tuple[bool, dict[str, float]]:
    """Elementwise |got - want| <= atol + rtol * |want|; max_rel is max_abs over the largest |want|."""
    if got.shape != want.shape:
        return False, {"max_abs": float("inf"), "max_rel": float("inf")}
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    both_nan = np.isnan(got64) & np.isnan(want64)
    diff = np.where(both_nan, 0.0, np.abs(got64 - want64))
    max_abs = float(diff.max()) if diff.size else 0.0
    finite = np.abs(want64[np.isfinite(want64)])
    scale = float(finite.max()) if finite.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    # NaN where the reference is a number fails here, as NaN compares false.
    ok = bool(np.all((diff <= atol + rtol * np.abs(want64)) | both_nan))
    return ok, {"max_abs": max_abs, "max_rel": max_rel}


def check_outputs(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], atol: float, rtol: float
) -> tuple[bool, dict[str, dict[str, float]]]:
    passed, errors = True, {}
    for name, expected in want.items():
        if name not in got:
            return False, {name: {"max_abs": float("inf"), "max_rel": float("inf")}}
        ok, errors[name] = compare(np.asarray(got[name]), expected, atol, rtol)
        passed &= ok
    return passed, errors


def corner_inputs(profile: Profile, seed: int):
    """(corner, shapes, feeds) for opt and each combination of the dims' extremes, each with its own seed."""
    for i, (corner, shapes) in enumerate(profile.check_points()):
        yield corner, shapes, profile.random_inputs(shapes, seed + i)


def padded_inputs(profile: Profile, alignment: Alignment, seed: int):
    """("opt, padded", shapes, feeds): the opt shape shrunk off the alignment, so the engine must pad."""
    sizes = profile.sizes("opt") if profile.dims else {}
    spatial = {spec.shape[axis] for spec in profile.inputs for axis in alignment.inputs.get(spec.name, ())}
    for dim in spatial & set(sizes):
        sizes[dim] = max(1, sizes[dim] - alignment.multiple // 2 - 1)
    shapes = profile.shapes(sizes)
    return "opt, padded", shapes, profile.random_inputs(shapes, seed + len(profile.check_points()))


@dataclasses.dataclass
class Expected:
    """What the original model computes on one check's inputs (or why it could not)."""

    corner: str
    shapes: dict[str, tuple[int, ...]]
    feeds: dict[str, np.ndarray]
    want: dict[str, np.ndarray] | None
    error: str | None = None


def expected_outputs(
    reference: ort.InferenceSession, profile: Profile, seed: int, alignment: Alignment | None = None
) -> list[Expected]:
    """The reference's outputs at each profile corner, and at an unaligned shape when the engine pads.

    Computed before the engine exists, so the reference session can be dropped first: a large model's
    weights are then held once, not twice."""
    cases = list(corner_inputs(profile, seed))
    if alignment:
        cases.append(padded_inputs(profile, alignment, seed))
    expected = []
    for corner, shapes, feeds in cases:
        try:
            expected.append(Expected(corner, shapes, feeds, _run_reference(reference, feeds, alignment)))
        except Exception as exc:  # a reference that cannot run is a failed check, named with its shape
            expected.append(Expected(corner, shapes, feeds, None, f"the original model failed: {type(exc).__name__}: {exc}"))
    return expected


def verify_engine(engine: Engine, expected: list[Expected], tolerance: Mapping[str, float]) -> list[ShapeCheck]:
    """The engine against the reference's outputs, check by check."""
    checks = []
    for case in expected:
        as_lists = {k: list(v) for k, v in case.shapes.items()}
        if case.want is None:
            checks.append(ShapeCheck(case.corner, as_lists, False, {}, case.error))
            continue
        try:
            got = engine.run(engine.as_input_types(case.feeds))
        except Exception as exc:  # a failing run is a failed check, named with its shape
            checks.append(ShapeCheck(case.corner, as_lists, False, {}, f"{type(exc).__name__}: {exc}"))
            continue
        passed, errors = check_outputs(got, case.want, **tolerance)
        checks.append(ShapeCheck(case.corner, as_lists, passed, errors))
    return checks


def _run_reference(reference: ort.InferenceSession, feeds, alignment: Alignment | None) -> dict[str, np.ndarray]:
    if alignment is None:
        return run_session(reference, feeds)
    return alignment.run_padded(lambda padded: run_session(reference, padded), feeds)


class StepVerifier:
    """--verify-each: after a pass, the model must pass the checker, load in ORT and match the original."""

    def __init__(self, reference: ort.InferenceSession, profile: Profile, seed: int):
        corners = dict(profile.corners())  # opt may coincide with min (and be dropped), or be 'static'
        self.corner = "opt" if "opt" in corners else next(iter(corners))
        shapes = corners[self.corner]
        self.feeds = profile.random_inputs(shapes, seed)
        self.want = run_session(reference, self.feeds)

    def check(self, model: ir.Model, tolerance: Mapping[str, float]) -> str | None:
        """None if the model is sound, else what is wrong."""
        with tempfile.TemporaryDirectory(prefix="kiln-verify-each-") as tmp:
            path = Path(tmp) / "model.onnx"
            save_model(model, path)
            try:
                onnx.checker.check_model(os.fspath(path))
            except onnx.checker.ValidationError as exc:
                return f"the ONNX checker rejects the model: {str(exc).splitlines()[0]}"
            try:
                session = reference_session(path)
                got = run_session(session, self.feeds)
            except Exception as exc:
                return f"ONNX Runtime cannot run the model: {str(exc).splitlines()[0]}"
        ok, errors = check_outputs(got, self.want, **tolerance)
        if not ok:
            worst = max(errors, key=lambda k: errors[k]["max_abs"])
            return f"output {worst!r} differs at the {self.corner} shape (max abs error {errors[worst]['max_abs']:.3g})"
        return None
