"""Sampling loops give the model the timesteps its pipeline would: the scheduler's, over 1000, or scaled to
[0, 1] for models whose pipelines pass t / 1000 (the importer records which)."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from kiln.optimizer.sampling import sample_loop, timestep_max  # noqa: E402


def _timesteps_seen(top: float) -> list[float]:
    seen = []

    def run(feeds):
        seen.append(float(feeds["timestep"][0]))
        return np.zeros_like(feeds["hidden_states"])

    sample_loop(run, {"hidden_states": np.ones((1, 2, 4, 4), np.float32)}, "float32", steps=4, timestep_max=top)
    return seen


def test_timesteps_follow_the_models_range():
    over_1000, over_1 = _timesteps_seen(1000.0), _timesteps_seen(1.0)
    assert max(over_1000) > 500 and max(over_1) <= 1.0
    np.testing.assert_allclose(over_1, np.array(over_1000) / 1000, rtol=1e-6)


def test_timestep_max_from_the_import_record():
    assert timestep_max({"timestep_max": 1.0}) == 1.0
    assert timestep_max({"format": "onnx"}) == 1000.0
