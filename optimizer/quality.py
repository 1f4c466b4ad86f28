"""How close an engine (or a framework) comes to the fp32 model, on inputs held out from calibration.

The fp32 reference (ONNX Runtime's CPU, graph optimizations off) runs once on every such input; each
engine then only runs itself. The inputs: the verification inputs; the samples held out of a recorded
calibration set; and, for diffusers models, QUALITY_SAMPLES samples drawn through short seeded sampling
loops, judged on their final latents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kiln import targets
from kiln.calibration import Sample, quality
from kiln.optimizer.sampling import STEPS, is_diffusion, quality_loops, sample_loop, timestep_dtype, timestep_max

QUALITY_SEED_OFFSET = 20_000  # away from calibration's seeds
LPIPS = "not computed: LPIPS needs pretrained network weights, and no installed package ships them"

Run = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclasses.dataclass
class Outputs:
    """What a runner gave on the reference's inputs, in the reference's order."""

    cases: list[dict[str, np.ndarray]]
    held_out: list[dict[str, np.ndarray]]
    latents: list[np.ndarray]


@dataclasses.dataclass
class QualityReference:
    cases: list[dict[str, np.ndarray]]  # verification inputs
    held_out: list[dict[str, np.ndarray]]  # calibration samples held out
    loops: list[dict[str, np.ndarray]]  # starting inputs of sampling loops (diffusers models)
    want: Outputs
    output: str  # the model's first output: the prediction a sampling loop steps with
    timestep_dtype: str | None
    seed: int
    timestep_max: float = 1000.0

    @classmethod
    def compute(cls, model_path: Path, expected: Sequence, profile: targets.Profile, source: dict, seed: int,
                held_out: Sequence[Sample] = ()) -> QualityReference:  # fmt: skip
        """expected: the verification cases (verify.Expected) whose reference outputs are known already."""
        from kiln.optimizer.verify import reference_session, run_session

        known = [e for e in expected if e.want is not None]
        session = reference_session(model_path)
        run = lambda feeds: run_session(session, feeds)  # noqa: E731
        diffusion = is_diffusion(profile, source)
        reference = cls(
            cases=[e.feeds for e in known], held_out=[s.feeds for s in held_out],
            loops=quality_loops(profile, seed) if diffusion else [], want=Outputs([e.want for e in known], [], []),
            output=session.get_outputs()[0].name, timestep_dtype=timestep_dtype(profile) if diffusion else None, seed=seed,
            timestep_max=timestep_max(source),
        )  # fmt: skip
        reference.want.held_out = [run(feeds) for feeds in reference.held_out]
        reference.want.latents = reference._latents(run)
        return reference

    def outputs(self, run: Run) -> Outputs:
        return Outputs([run(f) for f in self.cases], [run(f) for f in self.held_out], self._latents(run))

    def _latents(self, run: Run) -> list[np.ndarray]:
        return [sample_loop(lambda f: run(f)[self.output], feeds, self.timestep_dtype, timestep_max=self.timestep_max)
                for feeds in self.loops]  # fmt: skip

    def metrics(self, got: Outputs) -> dict:
        """Per output on the verification inputs and on the held-out samples (each metric's mean), and on
        the sampling loops' final latents."""
        result = {"held_out": _mean_by_output([quality.compare_outputs(g, w) for g, w in zip(got.cases, self.want.cases)]),
                  "lpips": LPIPS}  # fmt: skip
        if self.held_out:
            rows = [quality.compare_outputs(g, w) for g, w in zip(got.held_out, self.want.held_out)]
            result["calibration_held_out"] = {"samples": len(rows), "outputs": _mean_by_output(rows)}
        if self.loops:
            rows = [quality.compare_outputs({"latents": g}, {"latents": w})["latents"] for g, w in zip(got.latents, self.want.latents)]
            result["sampling"] = {"samples": sum(len(f) for f in got.latents), "loops": len(self.loops), "steps": STEPS,
                                  "seed": self.seed, **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}}  # fmt: skip
        return result


def engine_runner(engine: targets.Engine) -> Run:
    return lambda feeds: engine.run(engine.as_input_types(feeds))


def _mean_by_output(rows: list[dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Per output, each metric's mean over cases (rows of quality.compare_outputs)."""
    return {name: {k: float(np.mean([r[name][k] for r in rows])) for k in rows[0][name]} for name in rows[0]} if rows else {}
