"""Atomic writes: build next to the destination, rename into place at the end, never half-write."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kiln.optimizer.errors import InputError
from kiln.optimizer.signals import signals_deferred

# What `kiln optimize` writes into OUTDIR: model.onnx, ENGINE_DIR/ (the target's engine and its
# manifest), report.json and report.md, and for a build deferred to its GPU, kiln-verify.npz (its cases).
ENGINE_DIR = "engine"
REPORT_FILE = "report.json"
REPORT_SCHEMA = "kiln-report"
# Everything `kiln optimize` puts in OUTDIR; anything else there is the user's and is never deleted.
KILN_ENTRIES = frozenset({"model.onnx", "model.onnx.data", ENGINE_DIR, REPORT_FILE, "report.md", "kiln-verify.npz"})


# Writing into a staged directory fails for want of room or rights, not because of a bug in kiln.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp and mkdtemp create 0600 files and 0700 directories; what kiln leaves behind gets the
# permissions any other program's files would get under the user's umask.
_UMASK = _umask()


def follow_umask(path: Path) -> None:
    """Give a file kiln made in a temporary place (or a library made 0600) the umask's permissions."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)


def check_not_link(path: Path, what: str) -> None:
    """kiln writes by renaming a new file into place, which would replace a link, not what it points to."""
    if path.is_symlink():
        raise InputError(
            f"{what} {path} is a symbolic link (to {os.readlink(path)}); kiln replaces what it writes by renaming, "
            "which would replace the link itself",
            hint="give the path the link points to, or remove the link",
        )


def cannot_write(path: Path, exc: OSError) -> InputError:
    where = f" ({exc.filename})" if exc.filename and os.fspath(exc.filename) != os.fspath(path) else ""
    return InputError(f"cannot write {path}: {exc.strerror or exc}{where}",
                      hint="check that its directory exists, is writable and has free space")  # fmt: skip


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside path; it replaces path only if the block succeeds. Failing to
    write (a missing or read-only directory, a full disk) is an InputError naming path."""
    check_not_link(path, "output")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def is_kiln_output(directory: Path) -> bool:
    try:
        report = json.loads((directory / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("schema") == REPORT_SCHEMA


def check_outdir(outdir: Path, model_path: Path, force: bool) -> None:
    """Refuse an OUTDIR whose replacement would lose something the user had."""
    check_not_link(outdir, "output directory")
    if model_path.resolve().is_relative_to(outdir.resolve()):
        raise InputError(
            f"output directory {outdir} holds the input model {model_path}; replacing it would delete the model",
            hint="choose an output directory outside the model's",
        )
    if not outdir.exists():
        return
    if not outdir.is_dir():
        raise InputError(f"output path {outdir} exists and is a file", hint="choose a directory path for -o")
    if force or not any(outdir.iterdir()):
        return
    if not is_kiln_output(outdir):
        raise InputError(
            f"output directory {outdir} exists and is not a kiln output; kiln will not replace it",
            hint="choose a new directory, or pass --force to replace it",
        )
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in outdir.iterdir() if p.name not in KILN_ENTRIES)
    if others:
        listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise InputError(
            f"output directory {outdir} is a kiln output but also holds {listed}, which kiln did not write; "
            "replacing it would delete them",
            hint="move them out of it, choose a new directory, or pass --force to replace it with everything in it",
        )


@contextlib.contextmanager
def staged_dir(outdir: Path) -> Iterator[Path]:
    """Yield an empty directory beside outdir; it becomes outdir only if the block succeeds."""
    check_not_link(outdir, "output directory")
    try:
        outdir.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=outdir.parent, prefix=f".{outdir.name}.kiln-"))
    except OSError as exc:
        raise cannot_write(outdir, exc) from None
    try:
        os.chmod(stage, 0o777 & ~_UMASK)
        try:
            yield stage
        except OSError as exc:
            if exc.errno not in _NO_ROOM:
                raise
            raise cannot_write(outdir, exc) from None
        with signals_deferred():  # the old OUTDIR is in place, or the new one: never neither
            backup = None
            if outdir.exists():
                backup = Path(tempfile.mkdtemp(dir=outdir.parent, prefix=f".{outdir.name}.old-"))
                os.replace(outdir, backup / "old")
            os.replace(stage, outdir)
            if backup:
                shutil.rmtree(backup, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
