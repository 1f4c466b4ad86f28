"""Automatic mixed precision: the fewest quantized layers to keep in float so that a quality budget holds.

The search, deterministic for a given evaluation:
1. Every candidate quantized: if the budget holds, nothing is kept.
2. Sensitivity: the quality with only that layer quantized, one evaluation per layer.
3. Layers ordered from most to least sensitive (ties in graph order); the shortest prefix of that order
   whose layers kept in float meet the budget, found by bisection over the prefix length.

Every evaluation (what was kept, the quality, the latency) is recorded: the quality-latency curve.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

# metric -> whether larger is better
METRICS = {"psnr": True, "ssim": True, "rel_l2": False, "max_abs": False}
_BUDGET = re.compile(r"^\s*(psnr|ssim|rel_l2|max_abs)\s*(>=|<=)\s*([0-9.eE+-]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Budget:
    metric: str
    bound: float

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    def met(self, value: float) -> bool:
        return value >= self.bound if self.higher_is_better else value <= self.bound

    def __str__(self) -> str:
        return f"{self.metric}{'>=' if self.higher_is_better else '<='}{self.bound:g}"


def parse_budget(text: str) -> Budget:
    """'psnr>=35', 'ssim>=0.99', 'rel_l2<=0.05' or 'max_abs<=0.1'; ValueError says what is accepted."""
    match = _BUDGET.match(text)
    accepted = "psnr>=DB, ssim>=S, rel_l2<=E or max_abs<=E"
    if not match:
        raise ValueError(f"quality budget {text!r} is not one of {accepted}")
    metric, op, number = match.groups()
    if (op == ">=") != METRICS[metric]:
        raise ValueError(f"quality budget {text!r}: {metric} is bounded {'from below (>=)' if METRICS[metric] else 'from above (<=)'}")
    try:
        return Budget(metric, float(number))
    except ValueError:
        raise ValueError(f"quality budget {text!r}: {number!r} is not a number") from None


@dataclasses.dataclass
class Evaluation:
    kept: list[str]  # layers in float
    quality: float
    latency_ms: float | None = None

    def to_json(self) -> dict:
        return {"kept": len(self.kept), "layers_kept": list(self.kept), "quality": self.quality, "latency_ms": self.latency_ms}


@dataclasses.dataclass
class Fallback:
    budget: Budget
    candidates: list[str]
    kept: list[str]  # the candidates kept in float
    met: bool
    sensitivity: dict[str, float]  # quality with only that layer quantized
    curve: list[Evaluation]
    evaluated_on: str = ""  # the inputs quality was measured on, for the report

    @property
    def quantized(self) -> list[str]:
        return [name for name in self.candidates if name not in self.kept]

    def to_json(self) -> dict:
        return {"budget": str(self.budget), "met": self.met, "candidates": len(self.candidates), "kept": self.kept,
                "evaluated_on": self.evaluated_on, "sensitivity": self.sensitivity, "curve": [e.to_json() for e in self.curve]}  # fmt: skip


def search(candidates: Sequence[str], evaluate: Callable[[set[str]], tuple[float, float | None]], budget: Budget) -> Fallback:
    """evaluate(quantized layer names) -> (quality, latency ms or None)."""
    curve: list[Evaluation] = []
    everything = set(candidates)

    def run(kept: Sequence[str]) -> float:
        quality, latency = evaluate(everything - set(kept))
        curve.append(Evaluation(list(kept), quality, latency))
        return quality

    if budget.met(run([])):
        return Fallback(budget, list(candidates), [], True, {}, curve)
    sensitivity = {name: evaluate({name})[0] for name in candidates}
    # Worst quality first; sorted() is stable, so ties stay in graph order.
    order = sorted(candidates, key=lambda n: sensitivity[n], reverse=not budget.higher_is_better)
    if not budget.met(run(order)):
        return Fallback(budget, list(candidates), list(order), False, sensitivity, curve)
    lo, hi = 0, len(order)  # the budget fails with lo layers kept and holds with hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if budget.met(run(order[:mid])):
            hi = mid
        else:
            lo = mid
    return Fallback(budget, list(candidates), list(order[:hi]), True, sensitivity, curve)
