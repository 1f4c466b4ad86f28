"""One case through kiln, and many cases in worker processes that a crash cannot take down.

A case runs `kiln optimize` in-process (the CLI's own `main`, exit codes and messages as a user gets
them), verifying at the test's own inputs, then `kiln run` on each of its data sets, compared with
the test's expected outputs. Its outcome is one of
  verified  kiln built an engine and it gives the expected outputs
  refused   kiln said no with exit 2 (bad input: an op, type or construct it does not take)
  failed    kiln's verification failed (exit 3), or the engine's outputs differ from the expected
  internal  exit 1, a traceback or "internal error" on stderr, a signal or a hang: kiln's bug
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import re
import signal
import tempfile
import time
import traceback
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from .cases import Case

STATUSES = ("verified", "refused", "failed", "internal")


def kiln(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the kiln CLI, run in this process."""
    from kiln.optimizer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


# ONNX Runtime's reasons for not loading a model, by the op they name.
_ORT_REASONS = (
    (r"(?:Could not find an implementation|Failed to find kernel) for (\w+)", "ONNX Runtime has no CPU kernel for {}"),
    (r"([\w.]*:?\w+)\(-?\d+\) is not a registered function/op", "ONNX Runtime does not know {}"),
)


def short_reason(message: str) -> str:
    """A refusal's message without its specifics (paths, names, numbers), so refusals group by kind."""
    for pattern, reason in _ORT_REASONS:
        match = re.search(pattern, message)
        if match:
            return reason.format(match.group(1))
    text = re.sub(r"^\S+\.onnx:?\s*", "", message.strip().splitlines()[0])
    text = re.sub(r"(?<!\w)'[^']*'|\"[^\"]*\"", "…", text)
    text = re.sub(r"\b\d+\b", "N", text)
    text = re.split(r"[;(]", text)[0].strip().rstrip(":,")
    return text[:90]


def compare(got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> str | None:
    """None when got matches want (floats within atol + rtol * |want|, anything else exactly), else why not."""
    if got.dtype != want.dtype:
        return f"dtype {got.dtype}, expected {want.dtype}"
    if got.shape != want.shape:
        return f"shape {list(got.shape)}, expected {list(want.shape)}"
    if want.dtype.kind not in "fc":
        return None if np.array_equal(got, want) else f"{int(np.sum(got != want))} of {want.size} values differ"
    g, w = got.astype(np.float64), want.astype(np.float64)
    same = (g == w) | (np.isnan(g) & np.isnan(w))  # equal infinities and NaN where NaN is expected
    with np.errstate(invalid="ignore"):
        close = same | (np.isfinite(w) & (np.abs(g - w) <= atol + rtol * np.abs(w)))
    if close.all():
        return None
    diff = np.abs(g - w)[~close]
    return f"{int((~close).sum())} of {want.size} values differ, max abs {float(np.nanmax(diff, initial=0.0)):.3g}"


def _error(stdout: str) -> dict:
    try:
        return json.loads(stdout).get("error") or {}
    except (ValueError, AttributeError):
        return {}


def _outcome(status: str, reason: str, message: str = "", hint: str | None = None) -> dict:
    return {"status": status, "reason": reason, "message": message, "hint": hint}


def _crashed(stderr: str) -> bool:
    return "Traceback" in stderr or "internal error" in stderr


def run_case(case: Case, precision: str) -> dict:
    """Outcome of one case at one precision (see the module docstring)."""
    from kiln.optimizer.config import TOLERANCES

    with tempfile.TemporaryDirectory(prefix="kiln-conformance-") as tmp:
        tmp = Path(tmp)
        model, outdir = tmp / "model.onnx", tmp / "out"
        model.write_bytes(case.model)
        sets = []
        if case.arrays_only():
            for k, (inputs, outputs) in enumerate(case.data_sets):
                path = tmp / f"inputs_{k}.npz"
                np.savez(path, **inputs)
                sets.append((path, outputs))
        # --no-cache: each case is built once, and thousands of entries would only slow the misses.
        argv = ["optimize", str(model), "-o", str(outdir), "--precision", precision, "--bench-runs", "0", "--json", "--no-cache"]
        for path, _ in sets:
            argv += ["--verify-inputs", str(path)]
        code, stdout, stderr = kiln(argv)
        error = _error(stdout)
        message, hint = error.get("message", ""), error.get("hint")
        if _crashed(stderr) or code not in (0, 2, 3):
            return _outcome("internal", f"exit {code}", message or stderr.strip()[-2000:], hint)
        if code == 2:
            return _outcome("refused", short_reason(message), message, hint)
        if code == 3:
            # On the test's own inputs, the original model on ONNX Runtime is the one that fails.
            own = "the original model failed" in message and "at the sample" in message
            return _outcome("failed", "ONNX Runtime itself fails on the test's inputs" if own else "kiln's verification failed", message, hint)
        if not sets:
            return _outcome("failed", "kiln took a model whose test data are not arrays")
        tolerance = TOLERANCES[precision]
        for k, (path, expected) in enumerate(sets):
            inputs = case.data_sets[k][0]
            if all(np.isfinite(a).all() for a in inputs.values() if a.dtype.kind in "fc"):
                got_path = tmp / f"got_{k}.npz"
                code, stdout, stderr = kiln(["run", str(outdir), "--inputs", str(path), "--output", str(got_path), "--json"])
                if _crashed(stderr) or code != 0:
                    status = "failed" if code in (2, 3) and not _crashed(stderr) else "internal"
                    return _outcome(status, f"kiln run exit {code}", _error(stdout).get("message", stderr.strip()[-2000:]))
                with np.load(got_path) as loaded:
                    got = {name: loaded[name] for name in loaded.files}
            else:  # `kiln run` refuses NaN and infinite inputs by design; the tests of isnan and the like have them
                from kiln.optimizer.run import open_engine

                got = open_engine(outdir).run(inputs)
            for name, want in expected.items():
                problem = "missing" if name not in got else compare(np.asarray(got[name]), np.asarray(want), **tolerance)
                if problem:
                    return _outcome("failed", _who_differs(case, inputs, name, want, tolerance),
                                    f"data set {k}, output {name!r}: {problem}")  # fmt: skip
    return _outcome("verified", "")


def _who_differs(case: Case, inputs: dict, name: str, want: np.ndarray, tolerance: dict) -> str:
    """Whether ONNX Runtime itself (the original model, no optimizations) already differs from the
    expected output, or only kiln's engine does."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(case.model, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    reference = dict(zip(names, session.run(names, inputs), strict=True))
    if compare(np.asarray(reference[name]), np.asarray(want), **tolerance):
        return "ONNX Runtime itself differs from the test's outputs"
    return "the engine differs from the test's outputs"


def _worker(conn, quiet: bool) -> None:
    if quiet:  # ONNX Runtime logs to file descriptor 2 directly; kiln's own messages are captured anyway
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    while True:
        task = conn.recv()
        if task is None:
            return
        case, precision = task
        start = time.perf_counter()
        try:
            outcome = run_case(case, precision)
        except Exception:  # the runner's own bug, or one that escaped kiln's main: counted, not lost
            outcome = _outcome("internal", "raised out of kiln's main", traceback.format_exc()[-2000:])
        conn.send({"name": case.name, "precision": precision, "seconds": time.perf_counter() - start, **outcome})


class _Worker:
    """A process running cases one at a time; spawned (not forked), so it holds none of the parent's threads."""

    def __init__(self, context, quiet: bool):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, quiet), daemon=True)
        self.process.start()
        child.close()
        self.task = None
        self.started = 0.0

    def give(self, task) -> None:
        self.task, self.started = task, time.monotonic()
        self.conn.send(task)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _died(process) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"worker exited with {code}"


def run_cases(cases: list[Case], precisions: list[str], jobs: int = 1, timeout: float = 300.0,
              quiet: bool = True, on_result=None) -> list[dict]:  # fmt: skip
    """Every case at every precision in `jobs` worker processes; a worker that dies (a signal inside
    ONNX Runtime) or runs past `timeout` seconds on a case is replaced, and that case counted internal."""
    context = multiprocessing.get_context("spawn")
    pending = deque((case, p) for case in cases for p in precisions)
    workers = [_Worker(context, quiet) for _ in range(max(1, min(jobs, len(pending))))]
    results = []

    def record(result: dict) -> None:
        results.append(result)
        if on_result:
            on_result(result)

    try:
        while pending or any(w.task for w in workers):
            for w in workers:
                if w.task is None and pending:
                    w.give(pending.popleft())
            busy = [w for w in workers if w.task]
            wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=1.0)
            for i, w in enumerate(workers):
                if w.task is None:
                    continue
                case, precision = w.task
                if w.conn.poll():
                    try:
                        record(w.conn.recv())
                        w.task = None
                        continue
                    except (EOFError, OSError):  # the pipe closed: the worker is dying
                        w.process.join(5)
                dead = not w.process.is_alive()
                late = time.monotonic() - w.started > timeout
                if dead or late:
                    reason = _died(w.process) if dead else f"no result after {timeout:.0f} s"
                    record({"name": case.name, "precision": precision, "seconds": time.monotonic() - w.started,
                            **_outcome("internal", reason.split(" after")[0], reason)})  # fmt: skip
                    w.process.kill()
                    w.process.join()
                    workers[i] = _Worker(context, quiet)
    finally:
        for w in workers:
            w.stop()
    return results
