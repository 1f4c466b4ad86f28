"""Verification: the optimized engine against the original model on ONNX Runtime CPU in fp32."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from kiln.calibration import DataError, quality, read_npz
from kiln.optimizer.errors import InputError, first_line
from kiln.optimizer.onnx_files import save_model
from kiln.targets.align import Alignment
from kiln.targets import Engine, EngineSet, Profile
from kiln.targets.engine import session_options
from kiln.targets.profile import profile_label

REFERENCE = "ONNX Runtime CPU, fp32, the original model with graph optimizations off"
PROFILE_SEED_STRIDE = 1000  # profile K's checks draw seeds from seed + K * this: no two checks share data


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
    options = session_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(os.fspath(model_path), options, providers=["CPUExecutionProvider"])


def run_session(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def compare(got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> tuple[bool, dict[str, float]]:
    """Elementwise |got - want| <= atol + rtol * |want|; max_rel is max_abs over the largest |want|."""
    if got.shape != want.shape:
        return False, {"max_abs": float("inf"), "max_rel": float("inf")}
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    # NaN where NaN is expected, and the same infinity, are no difference (inf - inf would be NaN).
    same = (np.isnan(got64) & np.isnan(want64)) | (got64 == want64)
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(got64 - want64))
    max_abs = float(diff.max()) if diff.size else 0.0
    finite = np.abs(want64[np.isfinite(want64)])
    scale = float(finite.max()) if finite.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    # NaN where the reference is a number fails here, as NaN compares false.
    # An infinite reference must be matched exactly (its tolerance would be infinite).
    with np.errstate(invalid="ignore"):
        close = np.isfinite(want64) & (diff <= atol + rtol * np.abs(want64))
    ok = bool(np.all(close | same))
    return ok, {"max_abs": max_abs, "max_rel": max_rel}


def check_outputs(
    got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], atol: float = 0.0, rtol: float = 0.0,
    rel_l2: float | None = None,
) -> tuple[bool, dict[str, dict[str, float]]]:
    """Each output elementwise within atol + rtol * |want|, or, given rel_l2 (quantized engines), with
    ||got - want|| / ||want|| at most rel_l2."""
    passed, errors = True, {}
    for name, expected in want.items():
        if name not in got:
            return False, {name: {"max_abs": float("inf"), "max_rel": float("inf")}}
        value = np.asarray(got[name])
        ok, errors[name] = compare(value, expected, atol, rtol)
        if rel_l2 is not None:
            errors[name]["rel_l2"] = quality.rel_l2(value, expected) if value.shape == expected.shape else float("inf")
            ok = bool(np.isfinite(value).all()) and errors[name]["rel_l2"] <= rel_l2
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
    sample: bool = False  # the user's --verify-inputs, not seeded random data
    profile: int | None = None  # of an engine of several profiles: the one this case checks (None: whichever runs it)


EXPECTED_FILE = "kiln-verify.npz"  # a deferred build's verification cases, for `kiln verify`
DEFERRED_NOTE = "built without its GPU, so not yet verified"  # the report's note, until `kiln verify`


def save_expected(path: Path, expected: list[Expected]) -> None:
    """The cases (their feeds and the original's outputs) in one .npz, whole or not at all."""
    from kiln.optimizer.outdir import atomic_file

    arrays, index = {}, []
    for i, case in enumerate(expected):
        index.append({"corner": case.corner, "shapes": {k: list(v) for k, v in case.shapes.items()}, "error": case.error,
                      "sample": case.sample, "feeds": list(case.feeds), "want": list(case.want) if case.want is not None else None,
                      "profile": case.profile})  # fmt: skip
        arrays.update({f"{i}/feed/{k}": v for k, v in case.feeds.items()})
        arrays.update({f"{i}/want/{k}": v for k, v in (case.want or {}).items()})
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, index=np.array(json.dumps(index)), **arrays)


def load_expected(path: Path) -> list[Expected]:
    """What save_expected wrote, or an InputError saying the file is missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            cases = []
            for i, case in enumerate(json.loads(str(data["index"]))):
                want = {k: data[f"{i}/want/{k}"] for k in case["want"]} if case["want"] is not None else None
                cases.append(Expected(case["corner"], {k: tuple(v) for k, v in case["shapes"].items()},
                                      {k: data[f"{i}/feed/{k}"] for k in case["feeds"]}, want, case["error"], case["sample"], case.get("profile")))  # fmt: skip
            return cases
    except FileNotFoundError:
        raise InputError(f"{path} is missing: it holds the cases a deferred build is verified on",
                         hint="rebuild with `kiln optimize` (without the GPU), then `kiln verify` on it") from None  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path} is damaged ({type(exc).__name__}: {exc})", hint="rebuild with `kiln optimize`") from None


def sample_inputs(paths: list[str], profile: Profile, alignment: Alignment | None = None):
    """("sample NAME.npz", shapes, feeds) for each --verify-inputs file, checked against the model's
    inputs: every input by name, its dtype and static dims, and its dynamic dims inside the profile."""
    samples = []
    takes = ", ".join(f"{s.name} {s.dtype} {list(s.shape)}" for s in profile.inputs)
    for path in map(Path, paths):
        try:
            feeds = read_npz(path)
        except DataError as exc:
            raise InputError(f"--verify-inputs {exc}", hint="write it with numpy.savez(path, NAME=array, ...)") from None
        names = {spec.name for spec in profile.inputs}
        missing, extra = sorted(names - set(feeds)), sorted(set(feeds) - names)
        if missing or extra:
            what = "; ".join(filter(None, [missing and f"missing {missing}", extra and f"unexpected {extra}"]))
            raise InputError(f"--verify-inputs {path}: {what}", hint=f"the model takes {takes}")
        for spec in profile.inputs:
            array = feeds[spec.name]
            if array.dtype.name != spec.dtype or len(array.shape) != len(spec.shape) or any(
                isinstance(want, int) and want != got for want, got in zip(spec.shape, array.shape)
            ):
                raise InputError(f"--verify-inputs {path}: input {spec.name!r} is {array.dtype.name} {list(array.shape)}, "
                                 f"the model takes {spec.dtype} {list(spec.shape)}", hint=f"the model takes {takes}")  # fmt: skip
        shapes = {name: tuple(feeds[name].shape) for name in names}
        problem = profile.contains(alignment.padded_shapes(shapes) if alignment else shapes)
        if problem:
            raise InputError(f"--verify-inputs {path}: {problem}", hint="widen the dim's range with --shapes NAME=MIN..MAX")
        samples.append((f"sample {path.name}", shapes, feeds))
    return samples


def expected_outputs(
    reference: ort.InferenceSession, profile: Profile, seed: int, alignment: Alignment | None = None, samples=(),
    profiles: tuple[Profile, ...] = (),
) -> list[Expected]:
    """The reference's outputs at each profile corner (of each of profiles, if several, run on that
    profile's own session), at an unaligned shape when the engine pads, and on each of samples (from
    `sample_inputs`).

    Computed before the engine exists, so the reference session can be dropped first: a large model's
    weights are then held once, not twice."""
    cases = [(*case, False, None) for case in corner_inputs(profile, seed)] if not profiles else []
    for index, member in enumerate(profiles):
        cases += [(profile_label(index, member, corner), shapes, feeds, False, index)
                  for corner, shapes, feeds in corner_inputs(member, seed + PROFILE_SEED_STRIDE * (index + 1))]  # fmt: skip
    if alignment:
        cases.append((*padded_inputs(profile, alignment, seed), False, None))
    cases += [(*case, True, None) for case in samples]
    expected = []
    for corner, shapes, feeds, sample, index in cases:
        try:
            want = _run_reference(reference, feeds, alignment)
        except Exception as exc:  # a reference that cannot run is a failed check, named with its shape
            error = f"the original model failed: {type(exc).__name__}: {exc}"
            expected.append(Expected(corner, shapes, feeds, None, error, sample=sample, profile=index))
            continue
        undeclared = None if sample else _undeclared_shape(reference, want)
        if undeclared:
            # The output's size depends on the input values (ConstantOfShape, Slice bounds, a window length):
            # random values give a size the model says it never has, and an engine may rely on what it says.
            error = f"the original model gave {undeclared} on random inputs; they are not values it takes"
            expected.append(Expected(corner, shapes, feeds, None, error, profile=index))
        else:
            expected.append(Expected(corner, shapes, feeds, want, sample=sample, profile=index))
    return expected


def _undeclared_shape(reference: ort.InferenceSession, outputs: Mapping[str, np.ndarray]) -> str | None:
    """'output NAME of shape [..], not the [..] it declares' for the first output off its declared static dims."""
    for declared in reference.get_outputs():
        got = np.shape(outputs[declared.name])
        dims = declared.shape if isinstance(declared.shape, list) else None
        if dims is not None and (len(dims) != len(got) or any(isinstance(d, int) and d != g for d, g in zip(dims, got))):
            return f"output {declared.name!r} of shape {list(got)}, not the {dims} it declares"
    return None


def verify_engine(engine: Engine, expected: list[Expected], tolerance: Mapping[str, float]) -> list[ShapeCheck]:
    """The engine against the reference's outputs, check by check."""
    checks = []
    for case in expected:
        as_lists = {k: list(v) for k, v in case.shapes.items()}
        if case.want is None:
            checks.append(ShapeCheck(case.corner, as_lists, False, {}, case.error))
            continue
        runner = engine.members[case.profile] if case.profile is not None and isinstance(engine, EngineSet) else engine
        try:
            got = runner.run(runner.as_input_types(case.feeds))
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
                return f"the ONNX checker rejects the model: {first_line(exc)}"
            try:
                session = reference_session(path)
                got = run_session(session, self.feeds)
            except Exception as exc:
                return f"ONNX Runtime cannot run the model: {first_line(exc)}"
        ok, errors = check_outputs(got, self.want, **tolerance)
        if not ok:
            worst = max(errors, key=lambda k: errors[k]["max_abs"])
            return f"output {worst!r} differs at the {self.corner} shape (max abs error {errors[worst]['max_abs']:.3g})"
        return None
