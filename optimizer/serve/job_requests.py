"""A job (interpolate a clip, decode latents) sent by a client of `kiln serve` or listed in a `kiln batch`
manifest: its paths kept under the roots configured at start, and its output written whole or not at
all: the job writes into a hidden temporary beside the output, renamed into place at the end. An output
that exists is whole, and a temporary left by a killed worker is never taken for one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from kiln.optimizer.errors import InputError
from kiln.optimizer.serve.protocol import ProtocolError

KINDS = ("interpolate", "decode")
PARTIAL = ".kiln-partial-"  # in the name of every temporary a job writes
# Fault injection for the reliability tests: a worker that finds this variable set to a path that does
# not exist yet creates it and dies mid-job, after writing part of its output (once per path).
CRASH_ONCE = "KILN_CRASH_ONCE"


@dataclasses.dataclass(frozen=True)
class Roots:
    input: Path
    output: Path

    @classmethod
    def of(cls, input_root: Path, output_root: Path) -> Roots:
        for what, root in (("input", input_root), ("output", output_root)):
            if not root.is_dir():
                raise InputError(f"the {what} root {root} is not a directory", hint=f"create it, or pass another --{what}-root")
        return cls(input_root.resolve(), output_root.resolve())


def confined(root: Path, text, what: str) -> Path:
    """root/text with every link resolved, refused when it leaves root (an absolute path, `..`, a symbolic
    link out)."""
    if not isinstance(text, str) or not text:
        raise ProtocolError(f'"{what}" must be a path relative to the {what} root')
    path = Path(text)
    if path.is_absolute():
        raise ProtocolError(f'"{what}" {text!r} is absolute; give a path relative to the {what} root')
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise ProtocolError(f'"{what}" {text!r} leaves the {what} root (it resolves to {resolved})')
    if PARTIAL in resolved.name:
        raise ProtocolError(f'"{what}" {text!r} names a temporary kiln writes; choose another name')
    return resolved


@contextlib.contextmanager
def staged(output: Path) -> Iterator[Path]:
    """A hidden temporary path beside output (with its suffix, so a video stays a video), renamed to output
    when the block succeeds and removed when it fails."""
    tmp = output.with_name(f".{output.stem}{PARTIAL}{uuid.uuid4().hex[:12]}{output.suffix}")
    try:
        yield tmp
        if output.exists():
            raise ProtocolError(f"{output.name} was written by another job meanwhile", status=409)
        os.rename(tmp, output)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def remove_partials(folder: Path) -> int:
    """Remove the temporaries that killed workers left in folder (and below it); return how many."""
    removed = 0
    for path in sorted(folder.rglob(f"*{PARTIAL}*"), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def run_job(backend, kind: str, spec: dict, roots: Roots, reuse: bool = False) -> dict:
    """Run one job on backend. spec has "input" and "output" (relative to the roots) and the job's options
    (factor, fps, format; chunk for decode). An output that exists is refused (409), or returned as it is
    when reuse (a retried job whose first run finished)."""
    from kiln.optimizer.serve.jobs import decode, interpolate

    if kind not in KINDS:
        raise ProtocolError(f"unknown job {kind!r}; kiln runs {', '.join(KINDS)}", status=404)
    if not isinstance(spec, dict):
        raise ProtocolError("a job is a JSON object with \"input\" and \"output\"")
    allowed = {"input", "output", "format", "fps", *(("factor",) if kind == "interpolate" else ("chunk",))}
    if unknown := sorted(set(spec) - allowed):
        raise ProtocolError(f"{kind} takes {', '.join(sorted(allowed))}, not {', '.join(unknown)}")
    source = confined(roots.input, spec.get("input"), "input")
    output = confined(roots.output, spec.get("output"), "output")
    if not source.exists():
        raise ProtocolError(f'"input" {spec["input"]!r}: no such file or folder under the input root')
    relative = str(output.relative_to(roots.output))
    if output.exists() or output.is_symlink():
        if reuse:
            return {"job": kind, "output": relative, "reused": True}
        raise ProtocolError(f'"output" {relative!r} exists; give another name, or remove it first', status=409)
    options = {"fmt": _choice(spec, "format", ("png", "jpg"), "png"), "fps": _number(spec, "fps", float)}
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with staged(output) as tmp:
            if kind == "interpolate":
                result = interpolate(backend, source, tmp, _number(spec, "factor", int) or 2, **options)
            else:
                result = decode(backend, source, tmp, _number(spec, "chunk", int), fps=options["fps"] or 24.0, fmt=options["fmt"])
            _crash_once()
    except InputError as exc:  # the job's own checks: a clip too short, a decoder that is not one
        raise ProtocolError(exc.message + (f" ({exc.hint})" if exc.hint else "")) from None
    keep = ("frames", "expected_frames", "fps", "wall_s", "warnings")
    return {"job": kind, "output": relative, "reused": False, **{k: result[k] for k in keep if k in result}}


def _choice(spec: dict, key: str, choices: tuple[str, ...], default: str) -> str:
    value = spec.get(key, default)
    if value not in choices:
        raise ProtocolError(f'"{key}" must be one of {", ".join(choices)}, got {value!r}')
    return value


def _number(spec: dict, key: str, kind: type):
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf or (kind is int and value != int(value)):
        raise ProtocolError(f'"{key}" must be a positive {"whole number" if kind is int else "number"}, got {value!r}')
    return kind(value)


def _crash_once() -> None:
    marker = os.environ.get(CRASH_ONCE)
    if marker and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(70)  # as a killed worker: no cleanup, the temporary left as it is
