"""Running one fuzz case and judging what kiln did.

A case is a command line over files laid out in a sandbox directory. It runs in-process (fast) or, for
a signal or an injected full disk, as a child process. Whatever the input, kiln must:
- exit 0, 2, 3 or 130;
- print no traceback and no "internal error";
- on exit 2, print one error message that names what is wrong and where;
- change nothing in the sandbox but its declared output, leave no temporary file anywhere, and leave
  that output whole: as it was, or complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from kiln.optimizer.cli import main

ALLOWED_EXIT_CODES = {0, 2, 3, 130}
# What kiln's atomic writes leave while they work: mkstemp/mkdtemp names beside the destination.
TEMPORARY = re.compile(r"^\..*(\.tmp|\.kiln-\w+|\.old-\w+|\.kiln-tmp.*)$")
IMAGE_SUFFIXES = (".png", ".jpg")


@dataclasses.dataclass
class Case:
    command: str
    kind: str  # what was done to the input, for the counts
    argv: list[str]
    output: Path | None = None  # the one path the command may change
    signal: tuple[int, float] | None = None  # (signal, seconds after start), sent to a child process
    file_size_limit: int | None = None  # RLIMIT_FSIZE of a child process: a disk that fills up

    @property
    def label(self) -> str:
        return f"{self.command}/{self.kind}: kiln {' '.join(self.argv)}"


@dataclasses.dataclass
class Outcome:
    code: int
    out: str
    err: str


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with what it is: a directory, a link and its target, or a file's sha256."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                entries[key] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                entries[key] = "dir"
            else:
                entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def run_in_process(case: Case, capture: Callable[[], tuple[str, str]]) -> Outcome:
    code = main(case.argv + ["-q"])
    out, err = capture()
    return Outcome(code, out, err)


def run_child(case: Case) -> Outcome:
    """The command as its own process: the real signal handlers, a real file-size limit."""
    def limit():
        if case.file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.file_size_limit, case.file_size_limit))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kiln.optimizer.cli", *case.argv, "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=limit)  # fmt: skip
    if case.signal:
        signum, after = case.signal
        try:
            proc.wait(timeout=after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signum)
    out, err = proc.communicate(timeout=600)
    return Outcome(proc.returncode, out, err)


def judge(case: Case, outcome: Outcome, sandbox: Path, before: dict[str, str]) -> list[str]:
    """What kiln did wrong in this case; empty if nothing."""
    problems = []
    code, err = outcome.code, outcome.err
    if code not in ALLOWED_EXIT_CODES:
        problems.append(f"exit code {code}")
    if "Traceback" in err or "internal error" in err:
        problems.append("a traceback or an internal error")
    errors = [line for line in err.splitlines() if line.startswith("kiln: error:")]
    if code == 2:
        if len(errors) != 1:
            problems.append(f"{len(errors)} error messages, not one")
        elif not _names_where(errors[0], case.argv):
            problems.append("the message names no path, option or value from the command line")
    if code == 130 and not re.search(r"^kiln: (interrupted|error: interrupted)", err, re.MULTILINE):
        problems.append("exit 130 without saying it was interrupted")
    after = snapshot(sandbox)
    inside = case.output is not None and case.output.is_relative_to(sandbox)
    output = str(case.output.relative_to(sandbox)) if inside else None

    # A link to a folder is a folder to write into (`kiln example block link/`): what it points to is output too.
    target = case.output.resolve() if inside and case.output.is_symlink() else None
    linked = str(target.relative_to(sandbox.resolve())) if target and target.is_relative_to(sandbox.resolve()) else None

    def within(key: str) -> bool:
        return any(root is not None and (key == root or key.startswith(root + os.sep)) for root in (output, linked))

    def mine(key: str) -> bool:  # the output, and the new folders kiln made to hold it
        return within(key) or (output is not None and key not in before and output.startswith(key + os.sep))

    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k) and not mine(k)}
    if changed:
        problems.append(f"changed outside its output: {sorted(changed)[:4]}")
    leftovers = [k for k in after if TEMPORARY.match(Path(k).name)]
    if leftovers:
        problems.append(f"left temporary files: {leftovers[:4]}")
    if inside:
        problems += _output_whole(case, code, {k: v for k, v in before.items() if within(k)}, {k: v for k, v in after.items() if within(k)})
    return problems


def _names_where(message: str, argv: list[str]) -> bool:
    """The message names something the user gave (a path or a file in it, an option, a value), or a
    quoted name from inside a file (an input, an array, a dim)."""
    for arg in argv:
        if len(arg) >= 3 and (arg in message or ("/" in arg and Path(arg).name in message)):
            return True
    return bool(re.search(r"'[^']*'|kiln \w+:|--\w", message))


def _output_whole(case: Case, code: int, before: dict[str, str], after: dict[str, str]) -> list[str]:
    output = case.output
    if case.command == "optimize":
        if code in (0, 3):
            try:
                report = json.loads((output / "report.json").read_text())
            except (OSError, ValueError):
                return ["exit 0/3 without a readable report.json"]
            missing = [f for f in (*report["model"]["files"], *report["target"]["files"], "report.md") if not (output / f).exists()]
            return [f"OUTDIR lacks {missing}"] if missing else []
        return [] if before == after else ["OUTDIR changed although the command failed"]
    if case.command == "compare":
        # Points are kept as they are done (a rerun resumes), so a failed sweep may leave some: each whole.
        broken = [str(p.relative_to(output)) for p in output.rglob("*.json") if not _json_reads(p)]
        if code == 0 and not (output / "compare.json").is_file():
            return ["exit 0 without compare.json"]
        return [f"half-written {broken[:3]}"] if broken else []
    if case.command in ("interpolate", "decode") and not output.suffix:
        # Frames: each one whole, whatever stopped the job (frames already there may be rewritten with --force).
        broken = [p.name for p in output.glob("frame_*") if p.suffix in IMAGE_SUFFIXES and not _decodes(p)]
        return [f"half-written frames {broken[:3]}"] if broken else []
    if code != 0 and before != after:
        return ["the output changed although the command failed"]
    return []


def _json_reads(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def _decodes(path: Path) -> bool:
    import cv2

    return cv2.imread(str(path)) is not None


def run_case(case: Case, sandbox: Path, capture: Callable[[], tuple[str, str]]) -> tuple[Outcome, list[str]]:
    before = snapshot(sandbox)
    if case.signal or case.file_size_limit is not None:
        outcome = run_child(case)
    else:
        outcome = run_in_process(case, capture)
    return outcome, judge(case, outcome, sandbox, before)


SIGNALS = (signal.SIGINT, signal.SIGTERM)
