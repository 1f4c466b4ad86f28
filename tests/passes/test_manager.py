"""PassManager: per-pass records, failures that name the pass, instrumentation hooks."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from passes_helpers import parse

from passes import (
    KilnPass,
    PassFailed,
    PassManager,
    PassRecord,
    RemoveDeadNodes,
    RemoveIdentity,
    SortTopologically,
    count_nodes,
    op_counts,
)

MODEL = """
g (float[2,3] x) => (float[2,3] y)
{
  [id_in] x_in = Identity(x)
  [dead] d = Mul(x_in, x_in)
  [relu] r = Relu(x_in)
  [id_out] y = Identity(r)
}
"""


class Explode(KilnPass):
    """Raises from call."""

    name = "explode"

    def call(self, model):
        raise ValueError("boom")


class AddsAnIdentity(KilnPass):
    """Breaks its own contract: promises no Identity is left, then adds one."""

    name = "adds-an-identity"

    def call(self, model):
        graph = model.graph
        out = graph.outputs[0]
        copy = ir.node("Identity", [out], name="sneaky")
        graph.append(copy)
        graph.outputs[0] = copy.outputs[0]
        copy.outputs[0].name, out.name = out.name, f"{out.name}_pre"
        return ir.passes.PassResult(model, True)

    def ensures(self, model):
        for node in model.graph:
            if node.op_type == "Identity":
                raise ir.passes.PostconditionError(f"Identity {node.name!r} left")


class EnsuresAsserts(KilnPass):
    """An ensures() that fails with a plain AssertionError (onnx-ir wraps it)."""

    name = "asserts"

    def call(self, model):
        return ir.passes.PassResult(model, False)

    def ensures(self, model):
        assert count_nodes(model) == 0, "graph is not empty"


class RequiresNothingLeft(KilnPass):
    name = "needs-empty"

    def requires(self, model):
        if count_nodes(model):
            raise ir.passes.PreconditionError(f"{count_nodes(model)} nodes present")

    def call(self, model):  # pragma: no cover - never reached
        raise AssertionError("call ran despite the failed precondition")


class CountingPass(KilnPass):
    """Records stats, details and a warning; returns modified=False."""

    name = "counting"

    def call(self, model):
        self.stats["nodes_seen"] = count_nodes(model)
        self.details["ops"] = op_counts(model)
        self.warnings.append("just counting")
        return ir.passes.PassResult(model, False)


def test_one_record_per_pass_with_node_counts_and_timing():
    model = parse(MODEL)
    passes = [RemoveIdentity(), RemoveDeadNodes(), CountingPass(), SortTopologically()]

    result, records = PassManager(passes).run(model)

    assert result is model
    assert all(isinstance(r, PassRecord) for r in records)
    assert [r.name for r in records] == ["remove-identity", "remove-dead-nodes", "counting", "topological-sort"]
    assert [(r.nodes_before, r.nodes_after) for r in records] == [(4, 2), (2, 1), (1, 1), (1, 1)]
    assert [r.modified for r in records] == [True, True, False, False]
    assert all(isinstance(r.seconds, float) and r.seconds >= 0 for r in records)
    assert records[0].stats == {"identities_removed": 2}
    assert records[1].stats == {"nodes_removed": 1}
    assert records[2].stats == {"nodes_seen": 1}
    assert records[2].details == {"ops": {"Relu": 1}}
    assert records[2].warnings == ["just counting"]
    assert records[3].stats == {} and records[3].details == {} and records[3].warnings == []
    assert op_counts(model) == {"Relu": 1}

    as_json = records[2].to_json()
    assert as_json == {
        "name": "counting",
        "seconds": records[2].seconds,
        "nodes_before": 1,
        "nodes_after": 1,
        "modified": False,
        "stats": {"nodes_seen": 1},
        "details": {"ops": {"Relu": 1}},
        "warnings": ["just counting"],
    }


def test_records_are_copies_and_a_rerun_resets_the_pass():
    counting = CountingPass()
    manager = PassManager([counting])
    _, (first,) = manager.run(parse(MODEL))
    counting.stats["nodes_seen"] = 99
    counting.warnings.append("later")
    assert first.stats == {"nodes_seen": 4}
    assert first.warnings == ["just counting"]
    _, (second,) = manager.run(parse(MODEL))
    assert second.warnings == ["just counting"]  # not accumulated across runs
    assert second.stats == {"nodes_seen": 4}


def test_empty_manager_returns_the_model_unchanged():
    model = parse(MODEL)
    result, records = PassManager([]).run(model)
    assert result is model and records == []
    assert count_nodes(model) == 4


def test_a_pass_that_raises_is_reported_by_name():
    model = parse(MODEL)
    with pytest.raises(PassFailed) as excinfo:
        PassManager([RemoveIdentity(), Explode(), SortTopologically()]).run(model)
    error = excinfo.value
    assert str(error) == "pass 'explode' failed: ValueError: boom"
    assert error.pass_name == "explode"
    assert isinstance(error.cause, ValueError)
    assert error.__cause__ is error.cause
    assert op_counts(model) == {"Mul": 1, "Relu": 1}  # the pass before it ran


def test_a_pass_that_breaks_its_ensures_is_reported_by_name():
    model = parse(MODEL)
    with pytest.raises(PassFailed) as excinfo:
        PassManager([RemoveIdentity(), AddsAnIdentity()]).run(model)
    error = excinfo.value
    assert error.pass_name == "adds-an-identity"
    assert str(error) == "pass 'adds-an-identity' failed: PostconditionError: Identity 'sneaky' left"
    assert isinstance(error.cause, ir.passes.PostconditionError)


def test_a_builtin_pass_that_breaks_its_ensures_is_reported_by_name():
    class LazyRemoveIdentity(RemoveIdentity):
        name = "lazy-remove-identity"

        def call(self, model):
            return ir.passes.PassResult(model, False)

    with pytest.raises(PassFailed) as excinfo:
        PassManager([LazyRemoveIdentity()]).run(parse(MODEL))
    assert str(excinfo.value) == (
        "pass 'lazy-remove-identity' failed: PostconditionError: Identity node 'id_in' was not removed"
    )


def test_an_ensures_that_asserts_is_wrapped_and_named():
    with pytest.raises(PassFailed) as excinfo:
        PassManager([EnsuresAsserts()]).run(parse(MODEL))
    error = excinfo.value
    assert str(error) == "pass 'asserts' failed: PostconditionError: Post-condition for pass 'EnsuresAsserts' failed"
    assert isinstance(error.cause.__cause__, AssertionError)
    assert "graph is not empty" in str(error.cause.__cause__)


def test_a_failed_precondition_is_reported_by_name():
    with pytest.raises(PassFailed) as excinfo:
        PassManager([RequiresNothingLeft()]).run(parse(MODEL))
    assert str(excinfo.value) == "pass 'needs-empty' failed: PreconditionError: 4 nodes present"


def test_hooks_are_called_in_order():
    model = parse(MODEL)
    events = []

    def before(pass_):
        events.append(("before", pass_.name, count_nodes(model)))

    def after(record, seen):
        assert seen is model
        events.append(("after", record.name, record.nodes_after))

    passes = [RemoveIdentity(), RemoveDeadNodes(), SortTopologically()]
    _, records = PassManager(passes, before_each=before, after_each=after).run(model)

    assert events == [
        ("before", "remove-identity", 4),
        ("after", "remove-identity", 2),
        ("before", "remove-dead-nodes", 2),
        ("after", "remove-dead-nodes", 1),
        ("before", "topological-sort", 1),
        ("after", "topological-sort", 1),
    ]
    assert len(records) == 3


class VerifyFailed(Exception):
    pass


def test_an_exception_from_after_each_propagates_unchanged():
    model = parse(MODEL)
    raised = VerifyFailed("verify-each: remove-identity broke parity")
    seen = []

    def after(record, _model):
        seen.append(record.name)
        if record.name == "remove-identity":
            raise raised

    manager = PassManager(
        [RemoveIdentity(), RemoveDeadNodes()],
        before_each=lambda p: seen.append(f"before {p.name}"),
        after_each=after,
    )
    with pytest.raises(VerifyFailed) as excinfo:
        manager.run(model)
    assert excinfo.value is raised  # not wrapped in PassFailed
    assert seen == ["before remove-identity", "remove-identity"]  # the next pass never started
    assert op_counts(model) == {"Mul": 1, "Relu": 1}
