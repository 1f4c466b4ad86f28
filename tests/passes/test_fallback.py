"""The quality fallback's search: budgets, the fewest layers kept, determinism, budgets it cannot meet."""

from __future__ import annotations

import pytest

from kiln.passes.fallback import Budget, parse_budget, search


@pytest.mark.parametrize("text, budget", [("psnr>=35", Budget("psnr", 35.0)), (" ssim >= 0.99 ", Budget("ssim", 0.99)),
                                          ("rel_l2<=5e-2", Budget("rel_l2", 0.05)), ("max_abs<=0.1", Budget("max_abs", 0.1))])  # fmt: skip
def test_budgets(text, budget):
    assert parse_budget(text) == budget
    assert str(parse_budget(str(budget))) == str(budget)


@pytest.mark.parametrize("text, message", [
    ("psnr>35", "quality budget 'psnr>35' is not one of psnr>=DB, ssim>=S, rel_l2<=E or max_abs<=E"),
    ("lpips<=0.1", "is not one of"),
    ("psnr<=35", "quality budget 'psnr<=35': psnr is bounded from below (>=)"),
    ("rel_l2>=0.1", "rel_l2 is bounded from above (<=)"),
    ("psnr>=3..5", "'3..5' is not a number"),
])  # fmt: skip
def test_bad_budgets(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.").replace("*", r"\*")):
        parse_budget(text)


LAYERS = [f"l{i}" for i in range(10)]
COST = {"l0": 0.5, "l1": 4.0, "l2": 0.2, "l3": 2.5, "l4": 0.2, "l5": 1.0, "l6": 0.1, "l7": 3.0, "l8": 0.2, "l9": 0.3}


def _evaluate(calls: list):
    """PSNR falls by each quantized layer's cost from 45 dB."""

    def evaluate(quantized: set[str]) -> tuple[float, float]:
        calls.append(frozenset(quantized))
        return 45.0 - sum(COST[name] for name in quantized), float(len(quantized))

    return evaluate


def test_keeps_the_most_sensitive_layers_first_and_as_few_as_needed():
    calls = []
    result = search(LAYERS, _evaluate(calls), parse_budget("psnr>=37"))
    # 45 - 12 = 33 with all quantized; keeping l1 (the costliest, 4.0) alone gives 37: enough.
    assert result.met and result.kept == ["l1"] and result.quantized == [n for n in LAYERS if n != "l1"]
    assert result.sensitivity["l1"] == 41.0 and result.curve[0].quality == 33.0
    assert len(calls) == 1 + len(LAYERS) + 1 + 3  # all, sensitivity, all kept, bisection (5, 2, 1 kept)
    again = search(LAYERS, _evaluate([]), parse_budget("psnr>=37"))
    assert again.to_json() == result.to_json()


def test_budget_met_with_everything_quantized_keeps_nothing():
    result = search(LAYERS, _evaluate([]), parse_budget("psnr>=30"))
    assert result.met and result.kept == [] and len(result.curve) == 1 and result.sensitivity == {}


def test_budget_beyond_reach_keeps_everything_and_says_so():
    result = search(LAYERS, _evaluate([]), parse_budget("psnr>=46"))
    assert not result.met and sorted(result.kept) == sorted(LAYERS)
    assert result.kept[:3] == ["l1", "l7", "l3"]


def test_lower_is_better_metrics_and_ties_in_graph_order():
    def evaluate(quantized):
        return 0.01 * len(quantized), None

    result = search(["a", "b", "c", "d"], evaluate, parse_budget("rel_l2<=0.02"))
    assert result.met and result.kept == ["a", "b"]  # equal sensitivities: graph order decides
