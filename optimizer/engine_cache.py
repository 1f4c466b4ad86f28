"""The engine cache: what `kiln optimize` writes, stored under a key of everything that makes it.

The key is a sha256 over its parts: the model's bytes, the options that change the engine (passes,
precision, quantization with the calibration data's bytes, profiles, import settings), the target,
kiln's own code, the versions of the libraries that build and run it, and, for a GPU target, the machine
(GPU, compute capability, driver, CUDA and cuDNN): everything that makes an engine non-portable. Change
any part and the key changes; a miss names the parts that differ from the nearest entry.

Layout under $KILN_CACHE_DIR (default ~/.cache/kiln, or $XDG_CACHE_HOME/kiln):
    entries/KEY/entry.json    the key's parts, each file's sha256, when it was built; written last
    entries/KEY/out/          the OUTDIR as `kiln optimize` wrote it
    locks/KEY.lock            held by the one process building KEY; another waits, then hits
    timing/                   TensorRT timing caches, one per target and TensorRT version, shared by builds

An entry is made in a temporary folder and renamed into place whole. One whose files fail their hash
is removed and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kiln.calibration.cache import kiln_cache_root
from kiln.optimizer.errors import InputError
from kiln.optimizer.onnx_files import find_model, hash_directory, hash_files, model_files
from kiln.targets.versions import library_versions, providing_distribution

ENTRY_FILE = "entry.json"
ENTRY_SCHEMA = "kiln-cache-entry/1"
OUT = "out"
# Besides the libraries kiln imports always: those whose installed version is part of every key.
INSTALLED_DISTRIBUTIONS = ("torch", "diffusers", "transformers", "tensorflow", "tf2onnx", "nvidia-modelopt", "tensorrt")


def model_hash(model_arg: Path) -> str:
    """sha256 over the model's files: a directory's every file, or an ONNX file and its external data."""
    if model_arg.is_dir():
        return hash_directory(model_arg)
    return hash_files(model_arg.parent, model_files(find_model(model_arg)))


def kiln_source_hash() -> str:
    """sha256 of kiln's own Python sources: an engine built by other code is not the same engine."""
    digest = hashlib.sha256()
    for package in ("optimizer", "passes", "targets", "calibration"):
        root = Path(importlib.import_module(f"kiln.{package}").__file__).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def key_versions() -> dict[str, str]:
    """The versions of what builds and runs engines: the imported core libraries, with the distribution
    ONNX Runtime came from (targets/versions.py), and the installed importers and TensorRT (package
    metadata: importing them only to ask would cost seconds)."""
    import onnxruntime

    found = {**library_versions(), "onnxruntime-distribution": providing_distribution(onnxruntime) or "unknown"}
    for name in INSTALLED_DISTRIBUTIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def flatten(parts: dict, prefix: str = "") -> dict[str, object]:
    """{"options": {"precision": "fp16"}} -> {"options.precision": "fp16"}: the leaves a miss compares."""
    flat = {}
    for name, value in parts.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def differences(old: dict, new: dict) -> list[str]:
    """The leaves of two keys' parts that differ, as 'name: old -> new' (or 'added'/'removed')."""
    a, b = flatten(old), flatten(new)
    found = []
    for name in sorted(set(a) | set(b)):
        if name not in a:
            found.append(f"{name}: added ({_short(b[name])})")
        elif name not in b:
            found.append(f"{name}: removed (was {_short(a[name])})")
        elif a[name] != b[name]:
            found.append(f"{name}: {_short(a[name])} -> {_short(b[name])}")
    return found


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:16] + "..."


@dataclasses.dataclass
class Lookup:
    """What a lookup found: the entry's OUTDIR on a hit, else why it missed."""

    key: str
    hit: Path | None
    reason: str  # a hit: when the entry was built; a miss: what differs from the nearest entry

    @property
    def line(self) -> str:
        return f"cache {'hit' if self.hit else 'miss'}: {self.reason}"

    def to_json(self) -> dict:
        return {"status": "hit" if self.hit else "miss", "key": self.key, "reason": self.reason}


class EngineCache:
    def __init__(self, root: Path | None = None):
        self.root = root or kiln_cache_root()
        self.entries, self.locks, self.timing = self.root / "entries", self.root / "locks", self.root / "timing"

    def _make(self) -> None:
        try:
            for folder in (self.entries, self.locks, self.timing):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot use the engine cache {self.root}: {exc.strerror or exc}",
                             hint="set KILN_CACHE_DIR to a writable folder, or pass --no-cache") from None  # fmt: skip

    @contextlib.contextmanager
    def building(self, key: str, waiting=None) -> Iterator[None]:
        """Hold KEY's lock for a lookup and the build after it: a second builder of KEY waits here (calling
        waiting() first), then finds the first one's entry."""
        with self._locked(key, wait=True, waiting=waiting):
            yield

    def lookup(self, key: str, parts: dict) -> Lookup:
        """KEY's entry if it is whole; a damaged one is removed (and the miss says so)."""
        entry = self.entries / key
        if entry.is_dir():
            problem = self.damage(entry)
            if problem is None:
                os.utime(entry / ENTRY_FILE)  # last used, for prune
                built = json.loads((entry / ENTRY_FILE).read_text())["built"]
                return Lookup(key, entry / OUT, f"the engine built {built} (entry {key})")
            shutil.rmtree(entry, ignore_errors=True)
            return Lookup(key, None, f"entry {key} was damaged ({problem}), so it was removed and is rebuilt")
        return Lookup(key, None, self._nearest(parts))

    def _nearest(self, parts: dict) -> str:
        """What differs between parts and the stored entry closest to them."""
        best = None
        for entry in self._records():
            found = differences(entry["parts"], parts)
            rank = (entry["parts"].get("model") != parts.get("model"), len(found))  # the same model first
            if best is None or rank < best[0]:
                best = (rank, entry["key"], found)
        if best is None:
            return "the cache is empty"
        _, key, found = best
        if any(d.startswith("model:") for d in found):
            return "no entry for this model (or this version of its files)"
        return f"the nearest entry ({key}) differs in " + "; ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")

    def damage(self, entry: Path) -> str | None:
        """Why entry cannot be used (an unreadable record, a file missing, changed or added), or None."""
        try:
            record = json.loads((entry / ENTRY_FILE).read_text())
            files = record["files"]
            if record.get("schema") != ENTRY_SCHEMA or not isinstance(files, dict):
                return f"{ENTRY_FILE} is not a kiln cache record"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{ENTRY_FILE} cannot be read ({type(exc).__name__})"
        out = entry / OUT
        present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} if out.is_dir() else set()
        for name, digest in sorted(files.items()):
            if name not in present:
                return f"{name} is missing"
            if file_digest(out / name) != digest:
                return f"{name} does not match its sha256"
        extra = sorted(present - set(files))
        return f"{extra[0]} was not in the entry when it was stored" if extra else None

    def store(self, key: str, parts: dict, outdir: Path, source: str) -> None:
        """Copy outdir (kiln optimize's files there only) into KEY's entry, whole or not at all; source
        names the model it was built from, for `kiln cache list`."""
        from kiln.optimizer.outdir import KILN_ENTRIES

        self._make()
        tmp = Path(tempfile.mkdtemp(dir=self.entries, prefix=f".{key}."))
        try:
            for name in sorted(KILN_ENTRIES):
                path = outdir / name
                if path.is_dir():
                    shutil.copytree(path, tmp / OUT / name)
                elif path.is_file():
                    (tmp / OUT).mkdir(exist_ok=True)
                    shutil.copy2(path, tmp / OUT / name)
            files = {p.relative_to(tmp / OUT).as_posix(): file_digest(p) for p in sorted((tmp / OUT).rglob("*")) if p.is_file()}
            record = {"schema": ENTRY_SCHEMA, "key": key, "parts": parts, "files": files, "source": source,
                      "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
            (tmp / ENTRY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            shutil.rmtree(self.entries / key, ignore_errors=True)  # a damaged one: we hold its lock
            os.rename(tmp, self.entries / key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _records(self) -> Iterator[dict]:
        """Every whole-looking entry's record (hashes not checked)."""
        for entry in sorted(self.entries.iterdir()) if self.entries.is_dir() else []:
            if entry.name.startswith("."):
                continue
            try:
                record = json.loads((entry / ENTRY_FILE).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("schema") == ENTRY_SCHEMA and isinstance(record.get("parts"), dict):
                yield record

    def list(self) -> list[dict]:
        """Every whole-looking entry's record with its size and last use, newest use first."""
        found = []
        for record in self._records():
            entry = self.entries / str(record.get("key"))
            with contextlib.suppress(OSError):
                record["bytes"] = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
                record["last_used"] = (entry / ENTRY_FILE).stat().st_mtime
                found.append(record)
        return sorted(found, key=lambda r: -r["last_used"])

    def prune(self, max_bytes: int | None) -> list[str]:
        """Remove leftovers (unfinished and damaged entries), then, with max_bytes, the least recently used
        entries until the rest fit. Returns what was removed, one line each."""
        removed = []
        for entry in sorted(self.entries.iterdir()) if self.entries.is_dir() else []:
            key = entry.name.split(".")[1] if entry.name.startswith(".") else entry.name
            with self._idle(key) as idle:  # an entry being built or copied is left alone
                why = "an unfinished entry" if entry.name.startswith(".") else self.damage(entry)
                if idle and why:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(f"{entry.name}: {why}")
        if max_bytes is not None:
            kept = self.list()
            total = sum(r["bytes"] for r in kept)
            while kept and total > max_bytes:
                oldest = kept.pop()
                with self._idle(oldest["key"]) as idle:
                    if idle:
                        shutil.rmtree(self.entries / oldest["key"], ignore_errors=True)
                        total -= oldest["bytes"]
                        removed.append(f"{oldest['key']}: least recently used ({oldest['bytes'] / 1e6:.1f} MB)")
        return removed

    @contextlib.contextmanager
    def _idle(self, key: str) -> Iterator[bool]:
        """Hold KEY's lock if no other process holds it; yields whether it was free."""
        with self._locked(key, wait=False) as free:
            yield free

    @contextlib.contextmanager
    def _locked(self, key: str, wait: bool, waiting=None) -> Iterator[bool]:
        """KEY's file lock, held while the body runs: if another process holds it, wait for it (calling
        waiting() first), or without wait yield False at once."""
        self._make()
        with open(self.locks / f"{key}.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                if waiting is not None:
                    waiting()
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
