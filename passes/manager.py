"""Runs a list of passes, timing each, counting nodes, and naming the pass that failed.

A PassManager is itself a pass, so managers nest: one can be a step of another manager, or run inside
a pass (FreezeShapes runs its rounds through one).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable, Sequence

import onnx_ir as ir

from kiln.passes.base import KilnPass, count_nodes


class PassFailed(RuntimeError):
    """A pass raised or broke its own requires/ensures contract.

    Inside nested managers pass_name is the path to the pass that failed, outermost first
    ("freeze-shapes/fold-constants"), and cause is that pass's own exception.
    """

    def __init__(self, pass_name: str, cause: BaseException):
        super().__init__(f"pass {pass_name!r} failed: {type(cause).__name__}: {cause}")
        self.pass_name = pass_name
        self.cause = cause


@dataclasses.dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    modified: bool
    stats: dict[str, int]
    details: dict[str, object]
    warnings: list[str]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# Called after each pass with its record and the model; may raise to stop the run (--verify-each).
AfterPassHook = Callable[[PassRecord, ir.Model], None]


def _name(pass_: ir.passes.PassBase) -> str:
    return getattr(pass_, "name", "") or type(pass_).__name__


class PassManager(KilnPass):
    """Run passes in order; instrumentation hooks see each result, passes themselves never print.

    `run(model)` returns (model, records). Called like any pass, `manager(model)` returns a PassResult
    and leaves the records in `manager.records`; that is how a manager nests inside another manager
    or inside a pass.

    steps > 1 repeats the list up to `steps` rounds and stops after the first round that changed
    nothing. A round changed the model when one of its passes reported modified, or, when
    `fingerprint` is given, when fingerprint(model) differs before and after the round: for lists that
    undo and redo work every round (forgetting and re-inferring shapes), whose passes always report
    modified.

    Records: one per pass run, in order, rounds one after another. A nested manager is one pass to
    the manager around it, and its record holds the inner records as
        stats = {"rounds": rounds run}
        details = {"passes": [inner PassRecord.to_json(), ...]}   # recursively, for deeper nesting
        warnings = the inner warnings, each once, in order
    so the report keeps the tree; the hooks of a manager see its own passes only.
    """

    summary = "run passes in order, recording each one's time and node counts"

    def __init__(
        self,
        passes: Sequence[ir.passes.PassBase],
        before_each: Callable[[KilnPass], None] | None = None,
        after_each: AfterPassHook | None = None,
        *,
        steps: int = 1,
        fingerprint: Callable[[ir.Model], Hashable] | None = None,
        name: str = "passes",
    ):
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be at least 1, not {steps}")
        self.passes = list(passes)
        self.before_each = before_each
        self.after_each = after_each
        self.steps = steps
        self.fingerprint = fingerprint
        self.name = name
        self.records: list[PassRecord] = []

    @property
    def in_place(self) -> bool:
        # A functional pass in the list returns a new model, and so does the manager.
        return all(p.in_place for p in self.passes)

    @property
    def changes_input(self) -> bool:
        return self.in_place or any(p.changes_input for p in self.passes)

    def run(self, model: ir.Model) -> tuple[ir.Model, list[PassRecord]]:
        result = self(model)
        return result.model, list(self.records)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.records = []
        modified = False
        rounds = 0
        for _ in range(self.steps):
            rounds += 1
            before = self.fingerprint(model) if self.fingerprint else None
            model, changed = self._round(model)
            if self.fingerprint:
                changed = self.fingerprint(model) != before
            modified |= changed
            if not changed:
                break
        self.stats = {"rounds": rounds}
        self.details = {"passes": [r.to_json() for r in self.records]}
        self.warnings = list(dict.fromkeys(w for r in self.records for w in r.warnings))
        return ir.passes.PassResult(model, modified)

    def _round(self, model: ir.Model) -> tuple[ir.Model, bool]:
        changed = False
        for pass_ in self.passes:
            name = _name(pass_)
            if self.before_each:
                self.before_each(pass_)
            before = count_nodes(model)
            start = time.perf_counter()
            try:
                result = pass_(model)
            except PassFailed as exc:  # from a nested manager: keep the path to the pass that failed
                raise PassFailed(f"{name}/{exc.pass_name}", exc.cause) from exc.cause
            except Exception as exc:
                raise PassFailed(name, exc) from exc
            model = result.model
            record = PassRecord(
                name=name,
                seconds=time.perf_counter() - start,
                nodes_before=before,
                nodes_after=count_nodes(model),
                modified=bool(result.modified),
                stats=dict(getattr(pass_, "stats", {})),
                details=dict(getattr(pass_, "details", {})),
                warnings=list(getattr(pass_, "warnings", [])),
            )
            changed |= record.modified
            self.records.append(record)
            if self.after_each:
                self.after_each(record, model)
        return model, changed
