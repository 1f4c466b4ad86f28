"""PassManager: per-pass records, failures that name the pass, instrumentation hooks."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from passes_helpers import parse

from kiln.passes import (
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


# --- nesting and fixed points -----------------------------------------------------------------------


class RemoveOneRelu(KilnPass):
    """Removes the first Relu it finds, one per call: a fixed point needs as many rounds as Relus."""

    name = "remove-one-relu"

    def call(self, model):
        graph = model.graph
        for node in graph:
            if node.op_type == "Relu" and not node.outputs[0].is_graph_output():
                node.outputs[0].replace_all_uses_with(node.inputs[0])
                graph.remove(node, safe=True)
                self.stats["removed"] = 1
                return ir.passes.PassResult(model, True)
        self.stats["removed"] = 0
        return ir.passes.PassResult(model, False)


class AlwaysModified(KilnPass):
    """Touches the model and says so every time, though the model ends as it was."""

    name = "always-modified"

    def call(self, model):
        model.graph.doc_string = "touched"
        model.graph.doc_string = None
        return ir.passes.PassResult(model, True)


RELUS = """
g (float[2,3] x) => (float[2,3] y)
{
  [r1] a = Relu(x)
  [r2] b = Relu(a)
  [r3] c = Relu(b)
  [neg] y = Neg(c)
}
"""


def test_a_manager_is_an_onnx_ir_pass():
    model = parse(MODEL)
    manager = PassManager([RemoveIdentity(), RemoveDeadNodes()])
    assert isinstance(manager, ir.passes.InPlacePass) and isinstance(manager, KilnPass)
    result = manager(model)
    assert isinstance(result, ir.passes.PassResult)
    assert result.model is model and result.modified is True
    assert [r.name for r in manager.records] == ["remove-identity", "remove-dead-nodes"]
    assert manager.stats == {"rounds": 1}
    assert manager(model).modified is False  # nothing left to do; records are the new run's
    assert [r.modified for r in manager.records] == [False, False]


def test_a_nested_managers_record_holds_the_inner_records():
    model = parse(MODEL)
    inner = PassManager([RemoveIdentity(), CountingPass()], name="cleanup")
    _, records = PassManager([inner, SortTopologically()]).run(model)

    assert [r.name for r in records] == ["cleanup", "topological-sort"]
    nested = records[0].to_json()
    assert nested == {
        "name": "cleanup",
        "seconds": nested["seconds"],
        "nodes_before": 4,
        "nodes_after": 2,
        "modified": True,
        "stats": {"rounds": 1},
        "details": {
            "passes": [
                {
                    "name": "remove-identity",
                    "seconds": nested["details"]["passes"][0]["seconds"],
                    "nodes_before": 4,
                    "nodes_after": 2,
                    "modified": True,
                    "stats": {"identities_removed": 2},
                    "details": {},
                    "warnings": [],
                },
                {
                    "name": "counting",
                    "seconds": nested["details"]["passes"][1]["seconds"],
                    "nodes_before": 2,
                    "nodes_after": 2,
                    "modified": False,
                    "stats": {"nodes_seen": 2},
                    "details": {"ops": {"Mul": 1, "Relu": 1}},
                    "warnings": ["just counting"],
                },
            ]
        },
        "warnings": ["just counting"],  # the inner warnings reach the report through the outer record
    }
    assert records[0].details["passes"] == [r.to_json() for r in inner.records]


def test_records_nest_as_deep_as_the_managers():
    innermost = PassManager([CountingPass()], name="innermost")
    middle = PassManager([innermost], name="middle")
    _, (record,) = PassManager([middle]).run(parse(MODEL))
    assert record.name == "middle"
    (inner,) = record.details["passes"]
    assert inner["name"] == "innermost"
    assert [r["name"] for r in inner["details"]["passes"]] == ["counting"]
    assert record.warnings == inner["warnings"] == ["just counting"]


def test_a_manager_nests_in_onnx_irs_own_manager():
    model = parse(MODEL)
    kiln_manager = PassManager([RemoveIdentity(), RemoveDeadNodes()])
    result = ir.passes.PassManager([kiln_manager])(model)
    assert result.modified is True
    assert op_counts(model) == {"Relu": 1}
    assert [r.name for r in kiln_manager.records] == ["remove-identity", "remove-dead-nodes"]


def test_fixed_point_rounds_stop_when_a_round_changes_nothing():
    model = parse(RELUS)
    manager = PassManager([RemoveOneRelu(), CountingPass()], steps=10)
    result, records = manager.run(model)
    assert op_counts(result) == {"Neg": 1}
    # Three rounds remove a Relu each, the fourth finds none and ends the run.
    assert manager.stats == {"rounds": 4}
    assert [r.name for r in records] == ["remove-one-relu", "counting"] * 4
    assert [r.stats for r in records[::2]] == [{"removed": 1}] * 3 + [{"removed": 0}]
    assert [(r.nodes_before, r.nodes_after) for r in records[::2]] == [(4, 3), (3, 2), (2, 1), (1, 1)]
    assert manager.warnings == ["just counting"]  # once, not once per round


def test_fixed_point_stops_at_steps():
    model = parse(RELUS)
    manager = PassManager([RemoveOneRelu()], steps=2)
    assert manager(model).modified is True
    assert manager.stats == {"rounds": 2}
    assert op_counts(model) == {"Neg": 1, "Relu": 1}


def test_a_fingerprint_decides_when_a_pass_always_reports_modified():
    model = parse(RELUS)
    plain = PassManager([AlwaysModified()], steps=4)
    plain(model)
    assert plain.stats == {"rounds": 4}  # never stops early: every round claims a change

    fingerprinted = PassManager([RemoveOneRelu(), AlwaysModified()], steps=10, fingerprint=count_nodes)
    assert fingerprinted(model).modified is True
    assert fingerprinted.stats == {"rounds": 4}
    assert all(r.modified for r in fingerprinted.records if r.name == "always-modified")
    again = PassManager([AlwaysModified()], steps=10, fingerprint=count_nodes)
    assert again(model).modified is False  # the one round left the fingerprint as it was
    assert again.stats == {"rounds": 1}


def test_a_failure_in_a_nested_manager_names_the_path_to_the_pass():
    model = parse(MODEL)
    inner = PassManager([RemoveIdentity(), Explode()], name="cleanup")
    with pytest.raises(PassFailed) as excinfo:
        PassManager([PassManager([inner], name="outer-group")]).run(model)
    error = excinfo.value
    assert error.pass_name == "outer-group/cleanup/explode"
    assert str(error) == "pass 'outer-group/cleanup/explode' failed: ValueError: boom"
    assert isinstance(error.cause, ValueError)
    assert error.__cause__ is error.cause


def test_hooks_see_their_own_managers_passes():
    seen = []
    inner = PassManager(
        [RemoveIdentity(), RemoveDeadNodes()],
        before_each=lambda p: seen.append(f"inner before {p.name}"),
        after_each=lambda r, m: seen.append(f"inner after {r.name}"),
        name="cleanup",
    )
    PassManager(
        [inner, SortTopologically()],
        before_each=lambda p: seen.append(f"outer before {p.name}"),
        after_each=lambda r, m: seen.append(f"outer after {r.name}"),
    ).run(parse(MODEL))
    assert seen == [
        "outer before cleanup",
        "inner before remove-identity",
        "inner after remove-identity",
        "inner before remove-dead-nodes",
        "inner after remove-dead-nodes",
        "outer after cleanup",
        "outer before topological-sort",
        "outer after topological-sort",
    ]


def test_a_functional_pass_makes_the_manager_functional():
    model = parse(MODEL)
    manager = PassManager([ir.passes.functionalize(RemoveIdentity())])
    assert manager.in_place is False
    result, (record,) = manager.run(model)
    assert result is not model
    assert op_counts(model)["Identity"] == 2 and "Identity" not in op_counts(result)
    assert (record.nodes_before, record.nodes_after) == (4, 2)


def test_steps_must_be_positive():
    with pytest.raises(ValueError, match="steps must be at least 1"):
        PassManager([], steps=0)
