"""Runs a list of passes, timing each, counting nodes, and naming the pass that failed."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import onnx_ir as ir

from passes.base import KilnPass, count_nodes


class PassFailed(RuntimeError):
    """A pass raised or broke its own requires/ensures contract."""

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


class PassManager:
    """Run passes in order; instrumentation hooks see each result, passes themselves never print."""

    def __init__(
        self,
        passes: Sequence[KilnPass],
        before_each: Callable[[KilnPass], None] | None = None,
        after_each: AfterPassHook | None = None,
    ):
        self.passes = list(passes)
        self.before_each = before_each
        self.after_each = after_each

    def run(self, model: ir.Model) -> tuple[ir.Model, list[PassRecord]]:
        records = []
        for pass_ in self.passes:
            if self.before_each:
                self.before_each(pass_)
            before = count_nodes(model)
            start = time.perf_counter()
            try:
                result = pass_(model)
            except Exception as exc:
                raise PassFailed(pass_.name, exc) from exc
            model = result.model
            record = PassRecord(
                name=pass_.name,
                seconds=time.perf_counter() - start,
                nodes_before=before,
                nodes_after=count_nodes(model),
                modified=bool(result.modified),
                stats=dict(pass_.stats),
                details=dict(pass_.details),
                warnings=list(pass_.warnings),
            )
            records.append(record)
            if self.after_each:
                self.after_each(record, model)
        return model, records
